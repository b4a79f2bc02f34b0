import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro.results import load_results, read_result, result_path
from repro.runner import plan_table, run_table
from repro.spec import load_table

ROOT = Path(__file__).resolve().parents[2]


def metrics_by_cell(results_dir, table="test.tbl", scale="smoke"):
    return {r["cell_id"]: r["metrics"] for r in load_results(results_dir, table, scale) if r["status"] == "ok"}


def repro_cmd(*args):
    return [sys.executable, "-m", "repro", *args]


def test_run_writes_one_json_per_cell_with_provenance(harness_env):
    spec = load_table("test.tbl")
    summary = run_table(spec, "smoke", results_dir=harness_env["results"], show_progress=False, log=lambda m: None)
    assert [s["status"] for s in summary] == ["ok"] * 6
    cell = spec.cells("smoke")[0]
    record = read_result(result_path(harness_env["results"], "test.tbl", "smoke", cell.cell_id))
    assert record["table"] == "test.tbl" and record["scale"] == "smoke" and record["params"] == cell.params
    prov = record["provenance"]
    for key in ("spec_hash", "git", "packages", "machine", "seeds", "wall_seconds", "work"):
        assert key in prov, key
    assert prov["work"]["samples"] == 40 and prov["work"]["shards"] == 8
    assert "torch" in prov["packages"] and prov["machine"]["cpu"]
    assert not (harness_env["results"] / ".partial" / "test.tbl" / "smoke" / cell.cell_id).exists(), "shards are removed once the cell is written"


def test_rerun_skips_completed_cells(harness_env):
    spec = load_table("test.tbl")
    run_table(spec, "smoke", results_dir=harness_env["results"], show_progress=False, log=lambda m: None)
    path = result_path(harness_env["results"], "test.tbl", "smoke", spec.cells("smoke")[0].cell_id)
    before = path.stat().st_mtime_ns
    summary = run_table(spec, "smoke", results_dir=harness_env["results"], show_progress=False, log=lambda m: None)
    assert {s["status"] for s in summary} == {"cached"}
    assert path.stat().st_mtime_ns == before
    summary = run_table(spec, "smoke", results_dir=harness_env["results"], force=True, only="offset=1.0", show_progress=False, log=lambda m: None)
    assert [s["status"] for s in summary] == ["ok", "ok"]


def test_failed_cell_is_recorded_and_never_mistaken_for_a_result(harness_env, tmp_path):
    from repro.spec import load_spec

    text = (harness_env["specs"] / "test.tbl.toml").read_text().replace("offset = [0.0, 1.0, 2.0]", "offset = [0.0]\nfail = [false, true]")
    path = tmp_path / "specs" / "test.tbl.toml"
    path.write_text(text)
    spec = load_spec(path)
    summary = run_table(spec, "smoke", results_dir=harness_env["results"], show_progress=False, log=lambda m: None)
    assert sorted(s["status"] for s in summary) == ["failed", "failed", "ok", "ok"]
    failed = [r for r in load_results(harness_env["results"], "test.tbl", "smoke") if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["metrics"] is None and "fails on purpose" in r["error"] for r in failed)
    # A rerun retries failures (they are not cached) and keeps the good ones.
    summary = run_table(spec, "smoke", results_dir=harness_env["results"], show_progress=False, log=lambda m: None)
    assert sorted(s["status"] for s in summary) == ["cached", "cached", "failed", "failed"]
    # The CLI exits non-zero when a cell failed.
    env = {**os.environ, "REPRO_SPECS": str(tmp_path / "specs")}
    proc = subprocess.run(repro_cmd("run", "test.tbl", "--scale", "smoke", "--results", str(harness_env["results"]), "--no-progress"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "FAILED" in proc.stderr


def test_killed_run_resumes_with_identical_results(harness_env):
    """Kill `repro run` in the middle of a cell's shards, rerun, and compare with an uninterrupted run."""
    results_killed = harness_env["tmp"] / "killed"
    results_clean = harness_env["tmp"] / "clean"
    env = {**os.environ, "REPRO_TEST_SHARD_DELAY": "0.15"}
    cmd = repro_cmd("run", "test.tbl", "--scale", "smoke", "--results", str(results_killed), "--no-progress")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = results_killed / ".partial" / "test.tbl" / "smoke"
    deadline = time.time() + 60
    # Wait until the second cell has some, but not all, of its shards on disk.
    while time.time() < deadline:
        done = list((results_killed / "test.tbl" / "smoke").glob("*.json")) if (results_killed / "test.tbl" / "smoke").exists() else []
        shards = list(partial.glob("*/values/shard-*.npz")) if partial.exists() else []
        if len(done) >= 1 and 2 <= len(shards) <= 6:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    kept_shards = list(partial.glob("*/values/shard-*.npz"))
    assert kept_shards, "the kill happened while a cell had saved shards"
    done_before = len(list((results_killed / "test.tbl" / "smoke").glob("*.json")))
    assert 1 <= done_before < 6
    resumed = subprocess.run(cmd, env={**os.environ}, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("cached") == done_before
    clean = subprocess.run(repro_cmd("run", "test.tbl", "--scale", "smoke", "--results", str(results_clean), "--no-progress"), cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert metrics_by_cell(results_killed) == metrics_by_cell(results_clean)
    assert len(metrics_by_cell(results_clean)) == 6


def test_plan_lists_cells_with_cost_and_status(harness_env):
    spec = load_table("test.tbl")
    rows = plan_table(spec, "smoke", results_dir=harness_env["results"])
    assert len(rows) == 6 and all(r["nfe"] == 1 and r["samples"] == 40 and r["status"] == "pending" for r in rows)
    out = subprocess.run(repro_cmd("plan", "test.tbl", "--scale", "smoke", "--json", "--results", str(harness_env["results"])), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["cells"]) == 6


def test_torchrun_world_size_invariance(harness_env):
    """2 gloo processes split the shards, yet give the same metrics as 1 process."""
    pytest.importorskip("torch.distributed")
    one, two = harness_env["tmp"] / "ws1", harness_env["tmp"] / "ws2"
    base = ["run", "test.tbl", "--scale", "smoke", "--no-progress", "--device", "cpu"]
    r1 = subprocess.run(repro_cmd(*base, "--results", str(one)), cwd=ROOT, capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "repro", *base, "--results", str(two)]
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert metrics_by_cell(one) == metrics_by_cell(two)
    records = load_results(two, "test.tbl", "smoke")
    assert {r["provenance"]["world_size"] for r in records} == {2}
