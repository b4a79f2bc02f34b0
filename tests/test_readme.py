"""The README's two commands are what CI and a fresh machine run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/nox -s tests"
MAIN_COMMAND = "bash scripts/setup.sh && .venv/bin/nox -s reproduce"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in readme and MAIN_COMMAND in readme
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_every_table_has_a_spec_and_published_numbers():
    from repro.published import published_ids
    from repro.spec import spec_paths

    expected = {f"mar.table{i}" for i in range(1, 7)} | {f"restart.table{i}" for i in range(1, 6)} | {
        "restart.sd", "restart.toy", "sparsity.synthetic", "sparsity.controls", "sparsity.layers"}
    assert set(published_ids()) == expected
    assert expected <= set(spec_paths())
