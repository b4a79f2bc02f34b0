"""nox sessions. Every session runs in the ONE shared environment made by ``bash scripts/setup.sh``
(``.venv``, with a ~6 GB torch), so no session reinstalls torch: run them as ``.venv/bin/nox -s NAME``.

Sessions: tests (default), lint, one session per table id parametrized by scale (e.g.
``nox -s "restart.table2(scale='small')"``), reproduce (the main job), report, bench, gpu_check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"  # the shared .venv; see the module docstring

ROOT = Path(__file__).resolve().parent
PY = sys.executable  # the interpreter running nox, i.e. .venv/bin/python
TABLE_IDS = sorted(p.stem for p in (ROOT / "repro" / "tables").glob("*.toml"))


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """The test suite (CPU, < 30 minutes on 2 cores)."""
    session.run(PY, "-m", "pytest", "-q", *session.posargs)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    session.run(PY, "-m", "ruff", "check", "repro", "tests", "benchmarks", "noxfile.py")


def _make_table_session(table_id: str) -> None:
    @nox.session(name=table_id, tags=["tables"])
    @nox.parametrize("scale", ["smoke", "small", "paper"])
    def run_table(session: nox.Session, scale: str) -> None:
        session.run(PY, "-m", "repro", "run", table_id, "--scale", scale, *session.posargs)
        session.run(PY, "-m", "repro", "report", table_id)

    run_table.__doc__ = f"Run {table_id} at one scale and refresh its report."


for _table_id in TABLE_IDS:
    _make_table_session(_table_id)


@nox.session
def reproduce(session: nox.Session) -> None:
    """The main job, offline on embedded defaults: every table at smoke scale into build/results, a check
    against the committed smoke baselines, and the reports (committed small results + this run's smoke)."""
    out = ROOT / "build"
    session.run(PY, "-m", "repro", "run", "--all", "--scale", "smoke", "--results", str(out / "results"), "--no-progress", success_codes=[0, 1])
    session.run(PY, "-m", "repro", "compare", "--results", str(out / "results"), "--baseline", str(ROOT / "results"), "--scale", "smoke")
    session.run(PY, "-m", "repro", "report", "--results", str(ROOT / "results"), "--out", str(out / "reports"))
    session.log(f"reports written to {out / 'reports'}/index.md")


@nox.session
def report(session: nox.Session) -> None:
    """Regenerate results/reports from the committed results (no compute)."""
    session.run(PY, "-m", "repro", "report", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark ratios against peers (k-diffusion samplers, scikit-learn SparseCoder), full size.

    OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads from spinning on a shared machine."""
    env = {"REPRO_BENCH_FULL": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    session.run(PY, "-m", "pytest", "benchmarks", "--benchmark-enable", "--benchmark-only", "-p", "no:randomly", "-s", *session.posargs, env=env)


@nox.session
def gpu_check(session: nox.Session) -> None:
    """On a GPU machine: every paper-scale code path on random weights at paper shapes, with timings."""
    session.run(PY, "-m", "repro.gpu_check", *session.posargs)
