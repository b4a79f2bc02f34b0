import textwrap

import pandas as pd
import pytest

from repro.claims import evaluate_claim
from repro.report import render_index, render_table, tolerance_for, verdict_for
from repro.results import aggregate, result_path, write_result
from repro.spec import load_table

PUBLISHED = """
table = "test.tbl"
paper = "restart"
title = "A test table"
arxiv = "0000.00000"
version = "v1"
notes = ["a known inconsistency"]

[[cells]]
row = "offset 0"
column = "mean"
metric = "mean"
value = 0.0
direction = "lower"
params = { offset = 0.0 }
source = { arxiv = "0000.00000", version = "v1", table = "Table 1", row = "offset 0", column = "mean" }

[[cells]]
row = "offset 1"
column = "mean"
metric = "mean"
value = 5.0
direction = "lower"
params = { offset = 1.0 }
source = { arxiv = "0000.00000", version = "v1", table = "Table 1", row = "offset 1", column = "mean" }

[[cells]]
row = "offset 9"
column = "mean"
metric = "mean"
value = 9.0
direction = "lower"
params = { offset = 9.0 }
source = { arxiv = "0000.00000", version = "v1", table = "Table 1", row = "offset 9", column = "mean" }

[[cells]]
row = "baseline"
column = "mean"
metric = "mean"
value = 3.0
direction = "lower"
target = false
note = "copied from another paper"
source = { table = "Table 1", row = "baseline", column = "mean" }

[[claims]]
id = "c1"
text = "the paper says the mean grows"
source = { table = "Table 1" }
"""


def fake_results(spec, results_dir, scale, values):
    """Write result files by hand: values[(offset, seed)] = mean."""
    for (offset, seed), mean in values.items():
        from repro.spec import Cell

        cell = Cell(spec.id, scale, spec.kind, {"offset": offset}, seed, spec.scale_settings("smoke"))
        write_result(result_path(results_dir, spec.id, scale, cell.cell_id), {
            "schema": 1, "table": spec.id, "scale": scale, "kind": spec.kind, "cell_id": cell.cell_id,
            "params": cell.params, "seed": seed, "settings": cell.settings, "status": "ok",
            "metrics": {"mean": mean, "energy": 1.0}, "error": None, "extra": {"sampler_note": "x"},
            "provenance": {"git": {"commit": "abc1234567", "dirty": False}, "machine": {"device_name": "cpu"}, "wall_seconds": 1.0},
        })


@pytest.fixture()
def report_env(harness_env, tmp_path):
    tables = tmp_path / "paper_tables"
    tables.mkdir()
    (tables / "test.tbl.toml").write_text(textwrap.dedent(PUBLISHED))
    spec = load_table("test.tbl")
    spec.scales["paper"] = {"seeds": [0, 1]}
    return spec, tables, harness_env["results"], tmp_path / "out"


def test_report_compares_published_and_checks_claims(report_env):
    spec, tables, results, out = report_env
    fake_results(spec, results, "paper", {(0.0, 0): 0.01, (0.0, 1): -0.01, (1.0, 0): 1.0, (1.0, 1): 1.2})
    fake_results(spec, results, "smoke", {(0.0, 0): 0.0, (1.0, 0): 1.0, (2.0, 0): 2.0})
    summary = render_table(spec, results, out, tables)
    text = (out / "test.tbl.md").read_text()
    assert "| offset 0 | mean | mean | ↓ 0 | 0 ± 0.014 (n=2) | 0 | PASS |" in text
    assert "| offset 1 | mean | mean | ↓ 5 |" in text and "FAIL" in text
    assert "| offset 9 | mean | mean | ↓ 9 | — | — | NOT RUN |" in text
    assert "copied from another paper" in text and "a known inconsistency" in text and "the paper says the mean grows" in text
    assert "✅ holds" in text and "❌ fails" in text
    assert summary["verdicts"] == {"PASS": 1, "FAIL": 1, "NOT RUN": 1}
    assert summary["claims"] == {"paper": {"holds": 1, "fails": 1}, "smoke": {"holds": 1, "fails": 1}}, "claims are checked at every scale with results"
    assert (out / "plots" / "test.tbl-smoke-0.png").stat().st_size > 1000
    assert "](plots/test.tbl-smoke-0.png)" in text
    # A plot the report no longer links (e.g. removed from the spec) is deleted; other tables' plots stay.
    (out / "plots" / "test.tbl-smoke-7.png").write_bytes(b"stale")
    (out / "plots" / "test.tbl2-smoke-0.png").write_bytes(b"other table")
    render_table(spec, results, out, tables)
    assert not (out / "plots" / "test.tbl-smoke-7.png").exists() and (out / "plots" / "test.tbl2-smoke-0.png").exists()
    assert (out / "plots" / "test.tbl-smoke-0.png").exists()
    index = render_index([summary], out).read_text()
    assert "[test.tbl](test.tbl.md)" in index and "PASS 1, FAIL 1, NOT RUN 1" in index and "smoke: holds 1, fails 1; paper: holds 1, fails 1" in index


def test_small_scale_never_gets_a_numeric_verdict(report_env):
    spec, tables, results, out = report_env
    fake_results(spec, results, "smoke", {(0.0, 0): 0.0, (1.0, 0): 1.0})
    summary = render_table(spec, results, out, tables)
    assert set(summary["verdicts"]) == {"NOT RUN"}


def test_tolerance_uses_seed_spread_and_floor():
    assert tolerance_for("fid", 2.0, 0.01, 3, {}) == pytest.approx(0.1)
    assert tolerance_for("fid", 2.0, 0.2, 3, {}) == pytest.approx(0.4)
    assert tolerance_for("fid", 2.0, 0.2, 1, {}) == pytest.approx(0.1), "one seed gives no spread"
    assert tolerance_for("fid", 2.0, 0.0, 1, {"fid": 0.5}) == 0.5
    assert [verdict_for(2.0, x, 0.1) for x in (2.05, 2.15, 2.5, None)] == ["PASS", "WARN", "FAIL", "NOT RUN"]


def frame(rows):
    records = [{"status": "ok", "params": p, "seed": s, "metrics": m} for p, s, m in rows]
    return aggregate(records)


def test_claim_checkers():
    df = frame([({"s": "a", "n": n}, 0, {"fid": f}) for n, f in [(10, 9.0), (20, 5.0), (40, 4.0), (80, 3.96)]]
               + [({"s": "b", "n": n}, 0, {"fid": f}) for n, f in [(10, 20.0), (20, 8.0), (40, 3.0), (80, 2.0)]])
    ok = lambda claim: evaluate_claim(df, claim).status  # noqa: E731
    assert ok({"check": "compare", "metric": "fid", "a": {"s": "b"}, "b": {"s": "a"}, "op": "<", "reduce_a": "min", "reduce_b": "min"}) == "holds"
    assert ok({"check": "compare", "metric": "fid", "a": {"s": "b"}, "b": {"s": "a"}, "op": ">", "reduce_a": "min", "reduce_b": "min"}) == "fails"
    assert ok({"check": "compare", "metric": "fid", "a": {"s": "zzz"}, "b": {"s": "a"}}) == "insufficient data"
    assert ok({"check": "monotone", "metric": "fid", "x": "n", "direction": "decreasing", "for_each": ["s"]}) == "holds"
    assert ok({"check": "monotone", "metric": "fid", "x": "n", "direction": "increasing", "where": {"s": "a"}}) == "fails"
    assert ok({"check": "plateau", "metric": "fid", "x": "n", "where": {"s": "a"}, "last_n": 2, "rel_tol": 0.05}) == "holds"
    assert ok({"check": "plateau", "metric": "fid", "x": "n", "where": {"s": "b"}, "last_n": 2, "rel_tol": 0.05}) == "fails"
    assert ok({"check": "fraction_to_match", "metric": "fid", "a": {"s": "b"}, "b": {"s": "a"}, "x": "n", "max_fraction": 0.5}) == "holds"
    assert ok({"check": "fraction_to_match", "metric": "fid", "a": {"s": "a"}, "b": {"s": "b"}, "x": "n", "max_fraction": 0.5}) == "fails"
    u = frame([({"layer": i}, 0, {"m": v}) for i, v in enumerate([1.0, 3.0, 4.0, 3.5, 1.5])])
    assert evaluate_claim(u, {"check": "ends_extreme", "metric": "m", "x": "layer", "extreme": "min"}).status == "holds"
    assert evaluate_claim(u, {"check": "ends_extreme", "metric": "m", "x": "layer", "extreme": "max"}).status == "fails"
    t = frame([({"a": a}, 0, {"m": v}) for a, v in [(2, 1.0), (4, 2.1), (8, 3.9), (16, 5.0)]])
    verdict = evaluate_claim(t, {"check": "tracks", "metric": "m", "target_expr": "a/2", "x": "a", "rel_tol": 0.1})
    assert verdict.status == "holds" and "up to a=8" in verdict.detail and "first miss at a=16" in verdict.detail
    assert evaluate_claim(pd.DataFrame(), {"check": "compare", "metric": "fid", "a": {}, "b": {}}).status == "insufficient data"


def test_target_expression_is_restricted():
    from repro.claims import eval_target

    assert eval_target("a/2 + 1", {"a": 4}) == 3.0
    with pytest.raises(ValueError):
        eval_target("__import__('os').system('true')", {})
