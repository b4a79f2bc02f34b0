"""Result files: one JSON per cell, written atomically; loading and aggregation over seeds."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repro.spec import canonical_json

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = Path("results")


def result_path(results_dir: Path, table: str, scale: str, cell_id: str) -> Path:
    return Path(results_dir) / table / scale / f"{cell_id}.json"


def partial_dir(results_dir: Path, table: str, scale: str, cell_id: str) -> Path:
    """Where a running cell keeps its shards; ignored by git, removed once the cell is written."""
    return Path(results_dir) / ".partial" / table / scale / cell_id


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else repr(value)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    return obj


def write_result(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(record), indent=1, sort_keys=True) + "\n").encode())


def read_result(path: Path) -> dict[str, Any] | None:
    """A result record, or None when the file is missing or unreadable (treated as not done)."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("schema") == SCHEMA_VERSION else None


def is_complete(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status") == "ok" and isinstance(record.get("metrics"), dict)


def load_results(results_dir: Path, table: str | None = None, scale: str | None = None) -> list[dict[str, Any]]:
    root = Path(results_dir)
    pattern = f"{table or '*'}/{scale or '*'}/*.json"
    records = []
    for path in sorted(root.glob(pattern)):
        if path.parts[-3].startswith("."):
            continue
        record = read_result(path)
        if record is not None:
            record["_path"] = str(path)
            records.append(record)
    return records


def param_value_key(value: Any) -> Any:
    """Scalars stay comparable; lists and tables become canonical JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return canonical_json(value)
    return value


def aggregate(records: Iterable[dict[str, Any]], metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per parameter combination: each metric's mean, std (ddof=1), n, min and max over seeds.

    Failed cells are excluded; they are reported separately by the reporter.
    """
    groups: dict[str, dict[str, Any]] = {}
    for rec in records:
        if not is_complete(rec):
            continue
        key = canonical_json(rec["params"])
        group = groups.setdefault(key, {"params": rec["params"], "values": {}, "seeds": []})
        group["seeds"].append(rec.get("seed"))
        for name, value in rec["metrics"].items():
            if metrics is not None and name not in metrics:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                group["values"].setdefault(name, []).append(float(value))
    rows = []
    for group in groups.values():
        row: dict[str, Any] = {k: param_value_key(v) for k, v in group["params"].items()}
        row["_params"] = group["params"]
        row["_seeds"] = sorted(s for s in group["seeds"] if s is not None)
        for name, values in group["values"].items():
            arr = np.asarray(values, dtype=float)
            row[name] = float(arr.mean())
            row[f"{name}__std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
            row[f"{name}__n"] = len(arr)
            row[f"{name}__min"] = float(arr.min())
            row[f"{name}__max"] = float(arr.max())
        rows.append(row)
    return pd.DataFrame(rows)


def select(df: pd.DataFrame, where: dict[str, Any] | None) -> pd.DataFrame:
    """Rows whose parameters equal every key of ``where`` (missing parameter columns never match)."""
    if df.empty or not where:
        return df
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        if key not in df.columns:
            return df.iloc[0:0]
        wanted = param_value_key(value)
        column = df[key]
        mask &= column.apply(lambda v, w=wanted: _equal(v, w))
    return df[mask]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, float(b), rel_tol=1e-12, abs_tol=0.0) if not (isinstance(a, float) and math.isnan(a)) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b
