"""restart.image_fid: NFE bookkeeping, per-seed images, and an end-to-end run through the real runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.errors import ReproError
from repro.restart import image_experiments as IE
from repro.spec import Cell, load_table

SMOKE_SETTINGS = {"dataset": "mnist", "checkpoints": {"vp": "random:tiny-songunet", "edm": "random:tiny-songunet"}}


def _paper_nfes(table: str) -> list[int]:
    spec = load_table(table)
    return [IE.plan_image_fid(c)["nfe"] for c in spec.cells("paper") if c.seed == 0]


def test_paper_specs_list_every_published_nfe() -> None:
    # Analytic NFE of each configuration (resolve_sampler raises if a cell's nfe disagrees with it).
    assert _paper_nfes("restart.table3") == [519, 115, 75, 55, 43, 27, 24, 21, 18, 43, 43]
    assert _paper_nfes("restart.table5") == [623, 535, 385, 203, 165, 99, 67, 39]
    assert sorted(set(_paper_nfes("restart.table2"))) == [35, 63, 127, 128, 255, 256, 511, 512, 1023, 1024]


def test_spec_nfe_mismatch_is_an_error() -> None:
    with pytest.raises(ReproError, match="costs 43"):
        IE.resolve_sampler({"sampler": "restart", "nfe": 45, "n_main": 18, "intervals": [[3, 2, 0.06, 0.3]]}, {})
    with pytest.raises(ReproError, match="odd"):
        IE.resolve_sampler({"sampler": "heun", "nfe": 36}, {})


def test_sampler_settings_follow_the_paper() -> None:
    sde = IE.resolve_sampler({"sampler": "edm_sde", "nfe": 35}, {"dataset": "imagenet64"})
    assert sde.kwargs == {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    rs = IE.resolve_sampler({"sampler": "restart", "nfe": 43, "n_main": 18, "intervals": [[3, 2, 0.06, 0.3]]}, {})
    assert rs.kwargs["restart_gamma"] == 0.0 and rs.kwargs["s_noise"] == 1.0  # pure-ODE Restart unless the spec says otherwise
    dpm = IE.resolve_sampler({"sampler": "dpm_solver3_restart", "nfe": 27, "n_main": 8, "intervals": [[3, 1, 0.06, 0.3]]}, {})
    assert dpm.kwargs["inner_solver"] == "dpm_solver3" and dpm.sigmas[0].item() == pytest.approx(152.17, abs=0.01)


def test_edm_seed_ranges() -> None:
    assert IE.image_seeds(0, 50000, 0, np.array([0, 49999])) == [0, 49999]
    assert IE.image_seeds(2, 50000, 0, np.array([0, 49999])) == [100000, 149999]


@pytest.mark.parametrize("sampler, extra", [("edm_sde", {"nfe": 5}), ("restart", {"nfe": 9, "n_main": 3, "intervals": [[2, 2, 0.06, 0.3]]})])
def test_images_do_not_depend_on_batch_composition(sampler: str, extra: dict) -> None:
    params = {"model": "edm", "sampler": sampler, **extra}
    net = IE.build_random_network("tiny-songunet", params, SMOKE_SETTINGS).eval()
    plan = IE.resolve_sampler(params, SMOKE_SETTINGS)
    together, nfe = IE.generate_images(net, plan, [7, 8, 9, 10], "cpu")
    first, _ = IE.generate_images(net, plan, [7, 8], "cpu")
    second, _ = IE.generate_images(net, plan, [9, 10], "cpu")
    assert nfe == plan.expected_nfe
    split = torch.cat([first, second])
    # Same images up to float round-off at the uint8 truncation boundary.
    assert (together.int() - split.int()).abs().max() <= 1
    assert (together != split).float().mean() < 0.01
    assert (together[0] != together[1]).float().mean() > 0.1  # different seeds, different images


class _Pixels:
    """A cheap stand-in feature extractor for the end-to-end test (4x4 average-pooled pixels)."""

    name = "test-pixels"
    outputs = ("pool",)

    def __init__(self, device="cpu", **_):
        self.device = device

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        x = x if x.dim() == 4 else x[:, None]
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)}

    def provenance(self) -> dict:
        return {"extractor": self.name}


@pytest.fixture()
def pixel_extractor():
    from repro.metrics.extractors import EXTRACTORS, ExtractorSpec

    if "test-pixels" not in EXTRACTORS:
        EXTRACTORS.register("test-pixels", ExtractorSpec("test-pixels", lambda device="cpu", **kw: _Pixels(device, **kw), ("pool",)))
    return "test-pixels"


def _smoke_cell(sampler_params: dict, extractor: str) -> Cell:
    settings = dict(SMOKE_SETTINGS, ref_stats="dataset:mnist-test", ref_limit=200, extractors=[extractor],
                    num_samples=12, batch_size=4, shard_size=6)
    return Cell("restart.test", "smoke", "restart.image_fid", {"model": "vp", **sampler_params}, 1, settings)


def test_end_to_end_through_the_runner(tmp_path: Path, pixel_extractor: str) -> None:
    from repro.runner import run_cell

    cell = _smoke_cell({"sampler": "restart", "nfe": 7, "n_main": 3, "intervals": [[2, 1, 0.06, 0.3]]}, pixel_extractor)
    record = run_cell(cell, "spechash", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert record["status"] == "ok", record["error"]
    assert np.isfinite(record["metrics"]["fid"]) and record["metrics"]["fid"] > 0
    assert record["extra"]["nfe_counted"] == 7 and record["extra"]["restart_gamma"] == 0.0
    assert record["extra"]["protocol"]["seed_range"] == [12, 23]  # seed set 1 of 12 samples
    saved = json.loads(next((tmp_path / "results").rglob("*.json")).read_text())
    assert saved["metrics"] == record["metrics"]
    # Per-image seeds: another batch size gives the same images, hence the same FID.
    cell2 = Cell(cell.table, cell.scale, cell.kind, cell.params, cell.seed, dict(cell.settings, batch_size=6))
    record2 = run_cell(cell2, "spechash", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert record2["metrics"]["fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-3)


def test_counted_nfe_must_match_the_analytic_count(tmp_path: Path, pixel_extractor: str, monkeypatch) -> None:
    from repro.restart import samplers
    from repro.runner import run_cell

    real = samplers.sampler_nfe
    monkeypatch.setattr(samplers, "sampler_nfe", lambda name, n, **kw: real(name, n, **kw) + 1)
    cell = _smoke_cell({"sampler": "heun", "steps": 3}, pixel_extractor)
    record = run_cell(cell, "spechash", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert record["status"] == "failed" and "counted 5 network evaluations" in record["error"]


class _CoarsePixels(_Pixels):
    """A second stand-in extractor (2x2 pooling), playing the slow Inception that sees only some images."""

    name = "test-coarse-pixels"

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        x = x if x.dim() == 4 else x[:, None]
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)}


def test_feature_limits_and_kid(tmp_path: Path, pixel_extractor: str) -> None:
    """A limited extractor sees exactly the first n images of the seed set (same FID as a run of n samples), the
    other extractor sees all of them, and KID is computed against the cached reference features."""
    from repro.metrics.extractors import EXTRACTORS, ExtractorSpec
    from repro.runner import run_cell

    if "test-coarse-pixels" not in EXTRACTORS:
        EXTRACTORS.register("test-coarse-pixels", ExtractorSpec("test-coarse-pixels", lambda device="cpu", **kw: _CoarsePixels(device), ("pool",)))
    params = {"model": "vp", "sampler": "heun", "steps": 3}
    both = dict(SMOKE_SETTINGS, ref_stats="dataset:mnist-test", ref_limit={pixel_extractor: 200, "test-coarse-pixels": 100},
                extractors=[pixel_extractor, "test-coarse-pixels"], feature_limits={"test-coarse-pixels": 5},
                kid=["test-coarse-pixels"], num_samples=12, batch_size=4, shard_size=6)
    run = dict(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    record = run_cell(Cell("restart.test", "smoke", "restart.image_fid", params, 0, both), "h", **run)
    assert record["status"] == "ok", record["error"]
    m = record["metrics"]
    assert set(m) >= {"fid", "fid_test_coarse_pixels", "kid_test_coarse_pixels", "kid_test_coarse_pixels_std"}
    assert record["extra"]["metrics_provenance"]["fid_test_coarse_pixels"]["num_samples"] == 5
    assert record["extra"]["metrics_provenance"]["fid"]["num_samples"] == 12

    alone = dict(SMOKE_SETTINGS, ref_stats="dataset:mnist-test", ref_limit=100, extractors=["test-coarse-pixels"],
                 kid="test-coarse-pixels", num_samples=5, batch_size=5, shard_size=5)
    ref = run_cell(Cell("restart.test", "smoke", "restart.image_fid", params, 0, alone), "h", **run)
    assert ref["status"] == "ok", ref["error"]
    assert m["fid_test_coarse_pixels"] == pytest.approx(ref["metrics"]["fid"], rel=1e-6)
    assert m["kid_test_coarse_pixels"] == pytest.approx(ref["metrics"]["kid"], rel=1e-6, abs=1e-9)

    bad = dict(both, kid=["inception-fid-helper"])
    failed = run_cell(Cell("restart.test", "smoke", "restart.image_fid", params, 0, bad), "h", **run)
    assert failed["status"] == "failed" and "settings.kid" in failed["error"]


# ------------------------------------------------------------------------------- Stable Diffusion Restart loop


# (formula steps, steps the official fork evaluates): with 30 main steps t_min = 0.1 lands on timestep 1, where the
# fork skips the last Heun correction of each restart (restart.sd notes), so w = 3, 5, 8 take 64, not 66.
@pytest.mark.parametrize("guidance, steps, counted", [(2, 62, 62), (3, 66, 64), (5, 66, 64), (8, 66, 64)])
def test_sd_restart_loop_counts_table10_steps(guidance: int, steps: int, counted: int) -> None:
    from repro.restart import sd_experiments as SD
    from repro.restart.samplers import NoiseSource

    cfg = SD.SD_RESTART_CONFIGS[guidance]
    assert SD.sd_restart_steps(cfg["n_main"], cfg["intervals"]) == steps
    schedule = SD.DiscreteSchedule.scaled_linear()
    seen_t = []

    def eps_fn(x_in, t, cond):
        seen_t.append(t)
        return torch.zeros_like(x_in)

    den = SD.CFGDenoiser(eps_fn, schedule, cond=None, uncond=None, guidance=guidance)
    x_unit = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x, taken, expected = SD.run_sampler("restart", {"guidance": guidance}, den, schedule, x_unit, NoiseSource([0, 1]))
    assert taken == expected == counted and den.model_evals == 2 * counted
    assert all(0.0 <= t <= 999.0 for t in seen_t)
    # With eps = 0 the denoiser returns x, so the ODE keeps x: the result is the scaled latent plus restart noise.
    assert torch.isfinite(x).all()


def test_sd_sigma_to_timestep_inverts_the_schedule() -> None:
    from repro.restart.sd_experiments import DiscreteSchedule

    schedule = DiscreteSchedule.scaled_linear()
    for t in (0, 1, 250, 999):
        assert schedule.t_of_sigma(schedule.sigma_at(t)) == pytest.approx(t, abs=1e-6)
    sig = schedule.ddim_sigmas(30)
    assert len(sig) == 31 and sig[-1] == 0.0 and sig[0] == pytest.approx(schedule.sigma_at(958))  # diffusers "leading": 29 * (1000 // 30) + 1
