"""MAR specs declare the published protocol; running them must fail clearly, never produce a number."""

from repro.results import load_results
from repro.runner import plan_table, run_table
from repro.spec import load_table


def test_mar_specs_plan_every_published_target_cell():
    from repro.published import load_published

    for i in range(1, 7):
        spec = load_table(f"mar.table{i}")
        rows = plan_table(spec, "paper")
        assert rows and all(r["samples"] >= 50000 and r["est_seconds"] > 0 for r in rows)
        targets = [c.params for c in load_published(spec.id).cells if c.target]
        cells = [c.params for c in spec.cells("paper")]
        for params in targets:
            assert any(all(cell.get(k) == v for k, v in params.items()) for cell in cells), (spec.id, params)


def test_running_mar_names_the_missing_checkpoint_and_records_a_failure(tmp_path):
    spec = load_table("mar.table4")
    summary = run_table(spec, "paper", results_dir=tmp_path, device="cpu", only="mar_b", show_progress=False, log=lambda m: None)
    assert [s["status"] for s in summary] == ["failed"]
    record = load_results(tmp_path, "mar.table4", "paper")[0]
    assert record["metrics"] is None
    assert "MissingResource" in record["error"] and "pretrained_models/mar/mar_base/checkpoint-last.pth" in record["error"]
