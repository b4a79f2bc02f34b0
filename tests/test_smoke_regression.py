"""Smoke scale end to end for every table, guarded by the committed smoke baselines in results/."""

import subprocess
import sys
from pathlib import Path

from repro.cli import compare_to_baseline

ROOT = Path(__file__).resolve().parents[1]


def test_every_table_at_smoke_scale_matches_the_committed_baselines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "repro", "run", "--all", "--scale", "smoke", "--results", str(tmp_path), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = compare_to_baseline(tmp_path, ROOT / "results", "smoke", rtol=0.05, atol=1e-6)
    assert not out["failed"], out["failed"]
    assert not out["without_baseline"], f"cells without a committed baseline (commit results/*/smoke): {out['without_baseline']}"
    assert out["compared"] >= 29
    assert not out["differing"], "\n".join(out["differing"])
