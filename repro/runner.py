"""The runner: executes a table's cells at one scale, one JSON result per cell.

* A rerun skips cells whose result is complete; failed cells are recorded with their error and run again.
* Long cells save progress in shards (``RunContext.sharded``), so a killed run resumes where it stopped.
* Under ``torchrun`` every rank runs the same cells; shards are split across ranks by index and gathered,
  and work items carry their own seeds, so outputs do not depend on the number of processes.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repro.errors import ReproError
from repro.kinds import load_all_kinds
from repro.provenance import environment_provenance, sha256_file
from repro.results import SCHEMA_VERSION, atomic_write_bytes, is_complete, partial_dir, read_result, result_path, write_result
from repro.spec import Cell, Spec, content_hash

DEFAULT_CACHE_DIR = Path(os.environ.get("REPRO_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "repro"))


# ------------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str | None, dist_info: Dist):
    import torch

    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReproError(f"--device {requested} was asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", dist_info.local_rank % torch.cuda.device_count())
    return device


# ------------------------------------------------------------------------------------------ run context


@dataclass
class RunContext:
    """What a kind may use while it runs one cell (see docs/architecture.md)."""

    cell: Cell
    results_dir: Path
    cache_dir: Path
    device: Any
    dist: Dist = field(default_factory=Dist)
    show_progress: bool = True
    work: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def partial_dir(self) -> Path:
        return partial_dir(self.results_dir, self.cell.table, self.cell.scale, self.cell.cell_id)

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not self.show_progress or self.rank != 0, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)

    def record_work(self, **counts: Any) -> None:
        """Work counts into provenance, e.g. nfe=35, samples=50000, train_steps=0."""
        self.work.update(counts)

    def record_file(self, role: str, path: str | Path) -> None:
        """Record a file the result depends on (checkpoint, reference statistics) with its sha256."""
        path = Path(path)
        self.files[role] = {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}

    def record_extra(self, key: str, value: Any) -> None:
        self.extra[key] = value

    def barrier(self) -> None:
        self.dist.barrier()

    def cached_artifact(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """A folder built once by ``build(folder)`` and kept under the cache, keyed by a hash of ``key``.

        Built into a temporary folder and renamed, so a crash never leaves a half-built artifact. Under
        torchrun, rank 0 builds while the other ranks wait.
        """
        final = Path(self.cache_dir) / name / content_hash({"name": name, **key})
        if not final.exists() and self.rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            try:
                build(tmp)
                (tmp / "key.json").write_text(__import__("json").dumps(key, sort_keys=True, indent=1, default=str))
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        if not final.exists():
            raise ReproError(f"cached artifact {final} was not built")
        for f in sorted(final.iterdir()):
            if f.is_file() and f.name != "key.json":
                self.record_file(f"{name}/{f.name}", f)
        return final

    def sharded(self, name: str, n_items: int, shard_size: int, fn: Callable[[np.ndarray], dict[str, np.ndarray]], desc: str | None = None) -> dict[str, np.ndarray]:
        """Run ``fn(indices) -> {array name: array with len(indices) rows}`` over ``range(n_items)`` in shards.

        Each finished shard is saved atomically; a rerun loads finished shards instead of recomputing them.
        Shard i runs on rank i % world_size; all ranks then read every shard, concatenated in item order.
        """
        if n_items <= 0 or shard_size <= 0:
            raise ReproError(f"sharded('{name}'): n_items and shard_size must be positive, got {n_items} and {shard_size}")
        folder = self.partial_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        n_shards = (n_items + shard_size - 1) // shard_size
        mine = [i for i in range(n_shards) if i % self.world_size == self.rank]
        todo = [i for i in mine if not (folder / f"shard-{i:06d}.npz").exists()]
        bar = self.progress(total=len(mine), desc=desc or f"{name} shards", initial=len(mine) - len(todo))
        for i in todo:
            idx = np.arange(i * shard_size, min(n_items, (i + 1) * shard_size))
            out = fn(idx)
            if not isinstance(out, dict) or not out:
                raise ReproError(f"sharded('{name}'): fn must return a non-empty dict of arrays")
            buf = io.BytesIO()
            arrays = {k: np.asarray(v) for k, v in out.items()}
            for k, v in arrays.items():
                if v.shape[:1] != (len(idx),):
                    raise ReproError(f"sharded('{name}'): array '{k}' has {v.shape[:1]} rows for {len(idx)} items")
            np.savez(buf, **arrays)
            atomic_write_bytes(folder / f"shard-{i:06d}.npz", buf.getvalue())
            bar.update(1)
        bar.close()
        self.barrier()
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(n_shards):
            with np.load(folder / f"shard-{i:06d}.npz") as data:
                for k in data.files:
                    parts.setdefault(k, []).append(data[k])
        self.work.setdefault("shards", n_shards)
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------ running


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _validate_metrics(metrics: Any, cell: Cell) -> dict[str, float]:
    if not isinstance(metrics, dict) or not metrics:
        raise ReproError(f"kind '{cell.kind}' returned {type(metrics).__name__}, expected a non-empty dict of metrics")
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ReproError(f"kind '{cell.kind}' returned a non-numeric metric {name}={value!r}") from None
    return out


def run_cell(cell: Cell, spec_hash: str, *, results_dir: Path, cache_dir: Path = DEFAULT_CACHE_DIR, device: Any = None, dist_info: Dist | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run one cell and write its result (rank 0). A raised exception becomes a recorded failure."""
    dist_info = dist_info or Dist()
    kind = load_all_kinds().get(cell.kind)
    ctx = RunContext(cell, Path(results_dir), Path(cache_dir), device if device is not None else "cpu", dist_info, show_progress)
    seed_everything(cell.seed)
    started = time.time()
    error = tb = None
    metrics: dict[str, float] = {}
    try:
        metrics = _validate_metrics(kind.run(cell, ctx), cell)
        status = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, never mistaken for a result
        status = "failed"
        error = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc()
    wall = time.time() - started
    if dist_info.active:
        # Every rank must agree: a failure on any rank fails the cell. Ranks also wait here so that no rank
        # is still reading shards when rank 0 removes them.
        import torch.distributed as dist

        outcomes: list = [None] * dist_info.world_size
        dist.all_gather_object(outcomes, (status, error))
        bad = [(r, e) for r, (s, e) in enumerate(outcomes) if s != "ok"]
        if bad and status == "ok":
            status, error, metrics = "failed", f"rank {bad[0][0]}: {bad[0][1]}", {}
    record = {
        "schema": SCHEMA_VERSION,
        "table": cell.table,
        "scale": cell.scale,
        "kind": cell.kind,
        "cell_id": cell.cell_id,
        "params": cell.params,
        "seed": cell.seed,
        "settings": cell.settings,
        "status": status,
        "metrics": metrics if status == "ok" else None,
        "error": error,
        "traceback": tb,
        "extra": ctx.extra,
        "provenance": {
            "spec_hash": spec_hash,
            "seeds": [cell.seed],
            "wall_seconds": round(wall, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "work": ctx.work,
            "files": ctx.files,
            "world_size": dist_info.world_size,
            **environment_provenance(ctx.device),
        },
    }
    if dist_info.rank == 0:
        write_result(result_path(results_dir, cell.table, cell.scale, cell.cell_id), record)
        if status == "ok":
            shutil.rmtree(ctx.partial_dir, ignore_errors=True)
    dist_info.barrier()
    return record


def run_table(spec: Spec, scale: str, *, results_dir: Path, cache_dir: Path = DEFAULT_CACHE_DIR, device: str | None = None, force: bool = False, only: str | None = None, show_progress: bool = True, log=None) -> list[dict[str, Any]]:
    """Run every cell of ``spec`` at ``scale``; returns one summary dict per cell (status ok/failed/cached)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dist_info = init_distributed()
    dev = resolve_device(device, dist_info)
    cells = spec.cells(scale)
    if only:
        cells = [c for c in cells if only in c.label() or c.cell_id.startswith(only)]
    summary = []
    for i, cell in enumerate(cells, 1):
        path = result_path(results_dir, cell.table, cell.scale, cell.cell_id)
        existing = read_result(path)
        head = f"[{i}/{len(cells)}] {spec.id} {scale}"
        if is_complete(existing) and not force:
            summary.append({"cell_id": cell.cell_id, "status": "cached", "metrics": existing["metrics"], "label": cell.label()})
            if dist_info.rank == 0:
                log(f"{head} cached  {cell.label()}")
            continue
        if dist_info.rank == 0:
            log(f"{head} running {cell.label()}")
        record = run_cell(cell, spec.spec_hash, results_dir=results_dir, cache_dir=cache_dir, device=dev, dist_info=dist_info, show_progress=show_progress)
        summary.append({"cell_id": cell.cell_id, "status": record["status"], "metrics": record["metrics"], "error": record["error"], "label": cell.label()})
        if dist_info.rank == 0:
            took = record["provenance"]["wall_seconds"]
            if record["status"] == "ok":
                shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
                log(f"{head} ok      {cell.label()}  {shown}  ({took:.1f} s)")
            else:
                log(f"{head} FAILED  {cell.label()}  {record['error']}  ({took:.1f} s)")
    return summary


def plan_table(spec: Spec, scale: str, *, results_dir: Path | None = None) -> list[dict[str, Any]]:
    """Each cell with its parameters, cost estimate (samples, nfe, steps, est_seconds) and result status."""
    kind = load_all_kinds().get(spec.kind)
    rows = []
    for cell in spec.cells(scale):
        cost: dict[str, Any] = {}
        if kind.plan is not None:
            try:
                cost = dict(kind.plan(cell))
            except Exception as exc:  # a broken cost function must not hide the plan
                cost = {"plan_error": f"{type(exc).__name__}: {exc}"}
        status = "pending"
        if results_dir is not None:
            existing = read_result(result_path(results_dir, cell.table, cell.scale, cell.cell_id))
            status = "done" if is_complete(existing) else ("failed" if existing else "pending")
        rows.append({"cell_id": cell.cell_id, "params": cell.params, "seed": cell.seed, "status": status, **cost})
    return rows
