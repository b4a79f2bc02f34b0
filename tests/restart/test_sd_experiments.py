"""restart.sd_fid_clip at its paper code path, on a tiny randomly initialised Stable Diffusion pipeline folder.

The folder has SD v1.5's layout and scheduler config (PNDM, scaled_linear 0.00085-0.012, steps_offset 1,
set_alpha_to_one false, clip_sample false) and is loaded by ``load_sd`` exactly like the real weights; only the
network sizes differ. The references are diffusers' own pipeline / schedulers and a VP-space transcription of the
official fork's Restart block (Newbeeer/diffusion_restart_sampling, diffuser/.../pipeline_stable_diffusion.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.errors import MissingResource, ReproError
from repro.restart import sd_experiments as SD
from repro.restart import sd_tiny as T
from repro.restart.samplers import NoiseSource

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

PROMPTS = ["a photo of a cat sitting on a red sofa", "two buses parked next to a tall building"]
SD15_SCHEDULER = T.SD15_SCHEDULER


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return T.build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))  # the package's builder (the smoke scale's random:tiny-sd)


@pytest.fixture(scope="module")
def pipe(tiny_sd: Path):
    return SD.load_sd({"model_path": str(tiny_sd)}, "cpu")


class QueueNoise:
    """Hands out pre-drawn noise tensors in order, to our loops (randn_like) and to the references alike."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.draws.pop(0).to(x.dtype)


def _ours(pipe, sampler: str, params: dict, x_unit: torch.Tensor, noise) -> tuple[torch.Tensor, int, SD.CFGDenoiser]:
    schedule = SD.DiscreteSchedule.from_diffusers(pipe.scheduler)
    with torch.no_grad():
        den = SD.CFGDenoiser(SD.sd_eps_fn(pipe, "cpu"), schedule, SD.sd_encode(pipe, PROMPTS, "cpu"),
                             SD.sd_encode(pipe, [""] * len(PROMPTS), "cpu"), params["guidance"])
        x, steps, expected = SD.run_sampler(sampler, params, den, schedule, x_unit.to(torch.float64), noise)
    assert steps == expected and den.model_evals == 2 * steps
    return x, steps, den


def _guided_eps(pipe, w: float):
    """The pipeline's CFG step: one U-Net call on [uncond; cond] at the integer timestep."""
    emb = torch.cat([SD.sd_encode(pipe, [""] * len(PROMPTS), "cpu"), SD.sd_encode(pipe, PROMPTS, "cpu")])

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        out = pipe.unet(torch.cat([x, x]), torch.tensor(t), encoder_hidden_states=emb).sample
        u, c = out.chunk(2)
        return u + w * (c - u)

    return eps


def _x_unit(seed: int = 0) -> torch.Tensor:
    return NoiseSource([seed, seed + 1]).randn((2, 4, 16, 16))


# ------------------------------------------------------------------------------------------ loading, schedule


def test_tiny_folder_loads_through_the_paper_path(pipe) -> None:
    schedule = SD.DiscreteSchedule.from_diffusers(pipe.scheduler)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and schedule.steps_offset == 1
    # set_alpha_to_one = False: DDIM ends on abar_0 (sigma 0.029), not on sigma 0.
    assert schedule.final_alpha_cumprod == pytest.approx(1 - 0.00085) and schedule.final_sigma == pytest.approx(0.029168, abs=1e-5)
    assert SD.DiscreteSchedule.scaled_linear().alphas_cumprod.numpy() == pytest.approx(schedule.alphas_cumprod.numpy(), rel=1e-6)
    assert pipe.tokenizer("a photo of an astronaut riding a horse").input_ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_unsupported_inputs_fail_clearly(tmp_path: Path) -> None:
    from diffusers import DDIMScheduler

    with pytest.raises(MissingResource, match="model_index.json"):
        SD.load_sd({"model_path": str(tmp_path)}, "cpu")
    with pytest.raises(ReproError, match="clip_sample"):
        SD.DiscreteSchedule.from_diffusers(DDIMScheduler())  # diffusers' DDIM default clips x0
    with pytest.raises(ReproError, match="epsilon"):
        SD.DiscreteSchedule.from_diffusers(DDIMScheduler.from_config(dict(SD15_SCHEDULER, prediction_type="v_prediction")))
    with pytest.raises(ReproError, match="leading"):
        SD.DiscreteSchedule.from_diffusers(DDIMScheduler.from_config(dict(SD15_SCHEDULER, timestep_spacing="trailing")))
    schedule = SD.DiscreteSchedule.scaled_linear(set_alpha_to_one=False)
    den = SD.CFGDenoiser(lambda x, t, c: torch.zeros_like(x), schedule, None, None, 3.0)
    sig = schedule.ddim_sigmas(30)
    with pytest.raises(ReproError, match="does not fit"):  # t_min rounds to the first grid point
        SD.restart_eps_loop(den, torch.zeros(1, 1, 2, 2, dtype=torch.float64), sig, [[3, 1, 50.0, 80.0]], QueueNoise([]))
    with pytest.raises(ReproError, match="same grid point"):
        SD.restart_eps_loop(den, torch.zeros(1, 1, 2, 2, dtype=torch.float64), sig, [[3, 1, 1.0, 9.0], [3, 1, 1.01, 9.0]], QueueNoise([]))


# ---------------------------------------------------------------------------- side by side with diffusers


def test_ddim_equals_diffusers_pipeline(pipe) -> None:
    from diffusers import DDIMScheduler

    x_unit = _x_unit()
    ours, steps, _ = _ours(pipe, "ddim", {"guidance": 3, "steps": 10}, x_unit, None)
    scheduler = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)  # what the fork's generate.py does
        with torch.no_grad():
            ref = pipe(PROMPTS, num_inference_steps=10, guidance_scale=3.0, latents=x_unit.clone(), eta=0.0,
                       output_type="latent", return_dict=False)[0]
    finally:
        pipe.scheduler = scheduler
    diff = (ours.float() - ref).abs().max().item()
    assert diff < 1e-4 * max(1.0, ref.abs().max().item()), diff  # float64 loop vs float32 pipeline (measured 1.1e-5 at |x| ~ 37)
    assert steps == 10


def test_heun_equals_diffusers_ddim_steps_with_the_forks_correction(pipe) -> None:
    from diffusers import DDIMScheduler

    x_unit = _x_unit(3)
    ours, steps, _ = _ours(pipe, "heun", {"guidance": 5, "steps": 9}, x_unit, None)
    sch = DDIMScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(5)
    ts = [int(t) for t in sch.timesteps]
    eps = _guided_eps(pipe, 5.0)
    x = x_unit.clone()
    with torch.no_grad():
        for i, t in enumerate(ts):
            e = eps(x, t)
            if i < len(ts) - 1:  # the fork's ``second_order and i < len(timesteps) - 2`` (its list ends with an extra 0)
                x_next = sch.step(e, t, x).prev_sample
                e = 0.5 * e + 0.5 * eps(x_next, ts[i + 1])
            x = sch.step(e, t, x).prev_sample
    assert steps == 9
    assert (ours.float() - x).abs().max().item() < 1e-4 * max(1.0, x.abs().max().item())


def test_ddpm_equals_diffusers_ddpm_steps_on_the_forks_grid(pipe, monkeypatch) -> None:
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    n = 8
    x_unit = _x_unit(5)
    draws = [torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
    ours, steps, _ = _ours(pipe, "ddpm", {"guidance": 3, "steps": n}, x_unit, QueueNoise(draws))
    # The fork's DDPMScheduler ignores steps_offset: timesteps 875, 750, ..., 125, 0, then a no-op step 0 -> 0.
    sch = DDPMScheduler.from_config(dict(pipe.scheduler.config), steps_offset=0)
    sch.set_timesteps(n)
    ts = [int(t) for t in sch.timesteps]
    assert ts[0] == 875 and ts[-1] == 0
    queue = list(draws)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: queue.pop(0).to(kw.get("dtype")))
    eps = _guided_eps(pipe, 3.0)
    x = x_unit.clone()
    with torch.no_grad():
        for t in ts[:-1]:  # diffusers' last step (0 -> x0) is not the fork's; the fork's last step changes nothing
            x = sch.step(eps(x, t), t, x).prev_sample
    assert steps == n and len(queue) == 1
    assert (ours.float() - x).abs().max().item() < 1e-4 * max(1.0, x.abs().max().item())


def _fork_restart_reference(pipe, w: float, n_main: int, intervals: list, x_unit: torch.Tensor, draws: list) -> tuple[torch.Tensor, int]:
    """The fork's DDIM + Restart loop in VP space with integer timesteps (float32), transcribed from its logic:
    t_min -> argmin over the main sigmas (final timestep 0 included), t_max -> argmin over all training sigmas,
    restart timesteps round(linspace(t_min_step, t_max_step, N)) reversed, ``add_noise_between_t``, Heun = DDIM step
    with the averaged eps, except the last restart step when the restart ends on timestep <= 1. Returns (x, guided
    evaluations)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(n_main)
    ts = [int(t) for t in sch.timesteps] + [0]
    abar = sch.alphas_cumprod
    all_sigmas = ((1 - abar) / abar).sqrt()
    main_sigmas = all_sigmas[ts]
    plan = {int(torch.argmin((main_sigmas - t_min).abs())): (n_r, k, t_max) for n_r, k, t_min, t_max in intervals}
    guided = _guided_eps(pipe, w)
    evals = 0

    def eps(x, t):
        nonlocal evals
        evals += 1
        return guided(x, t)

    def ddim(x, e, t, t_prev):
        a, a_prev = abar[t], abar[t_prev]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

    x = x_unit.clone()
    queue = list(draws)
    with torch.no_grad():
        for i in range(n_main):
            x = sch.step(eps(x, ts[i]), ts[i], x).prev_sample
            if i + 1 in plan:
                n_r, k, t_max = plan[i + 1]
                max_idx = int(torch.argmin((all_sigmas - t_max).abs()))
                new_ts = torch.round(torch.linspace(ts[i + 1], max_idx, n_r).flip(0)).long().tolist()
                for _ in range(k):
                    factor = abar[new_ts[0]] / abar[new_ts[-1]]
                    x = factor.sqrt() * x + (1 - factor).sqrt() * queue.pop(0)
                    for j in range(n_r - 1):
                        e = eps(x, new_ts[j])
                        if j < n_r - 2 or new_ts[-1] > 1:
                            e = 0.5 * e + 0.5 * eps(ddim(x, e, new_ts[j], new_ts[j + 1]), new_ts[j + 1])
                        x = ddim(x, e, new_ts[j], new_ts[j + 1])
    assert not queue
    return x, evals


@pytest.mark.parametrize("guidance", [2, 3])
def test_restart_equals_the_forks_restart_block(pipe, guidance: int) -> None:
    cfg = SD.SD_RESTART_CONFIGS[guidance]
    n_main, intervals = 12, cfg["intervals"]  # Table 10's intervals on a shorter main grid (30 in the paper)
    draws = [torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(200 + i)) for i in range(4)]
    n_draws = sum(int(iv[1]) for iv in intervals)
    x_unit = _x_unit(7)
    ours, steps, _ = _ours(pipe, "restart", {"guidance": guidance, "n_main": n_main, "intervals": intervals}, x_unit, QueueNoise(draws[:n_draws]))
    ref, evals = _fork_restart_reference(pipe, float(guidance), n_main, intervals, x_unit, draws[:n_draws])
    assert steps == evals == {2: 44, 3: 46}[guidance]  # w = 3: t_min 0.1 lands on timestep 1, its last restart steps are Euler
    diff = (ours.float() - ref).abs().max().item()
    assert diff < 1e-4 * max(1.0, ref.abs().max().item()), diff


def test_paper_restart_grids_and_step_counts() -> None:
    schedule = SD.DiscreteSchedule.scaled_linear(set_alpha_to_one=False)
    main = schedule.ddim_sigmas(30)
    # w = 3: t_min 0.1 -> main grid point 29 = timestep 1 (sigma 0.041 beats timestep 34's 0.175); t_max 3 -> timestep 673.
    (rp,) = SD.plan_restarts(schedule, main, SD.SD_RESTART_CONFIGS[3]["intervals"]).values()
    steps = [round(schedule.t_of_sigma(s)) for s in rp.grid]
    assert rp.index == 29 and rp.last_euler and steps[-1] == 1 and steps[0] == 673
    assert steps == torch.linspace(1.0, 673.0, 10).round().flip(0).long().tolist()
    passes = SD.plan_restarts(schedule, main, SD.SD_RESTART_CONFIGS[2]["intervals"])
    assert {i: (round(schedule.t_of_sigma(p.grid[-1])), round(schedule.t_of_sigma(p.grid[0])), p.last_euler) for i, p in passes.items()} == {
        18: (364, 914, False), 5: (793, 934, False)}
    counted = {w: SD.sd_restart_steps_counted(schedule, cfg["n_main"], cfg["intervals"]) for w, cfg in SD.SD_RESTART_CONFIGS.items()}
    formula = {w: SD.sd_restart_steps(cfg["n_main"], cfg["intervals"]) for w, cfg in SD.SD_RESTART_CONFIGS.items()}
    assert counted == {2: 62, 3: 64, 5: 64, 8: 64} and formula == {2: 62, 3: 66, 5: 66, 8: 66}


# ------------------------------------------------------------------------------------ CLIP and aesthetic scores


def test_clip_score_is_the_mean_cosine_of_open_clip_features(tmp_path: Path) -> None:
    config, weights = T.build_tiny_clip(tmp_path, "tiny-clip-test")
    clip = SD.load_clip({"clip_model": str(config), "clip_pretrained": str(weights)}, "cpu")
    model, preprocess, tokenizer = clip
    ref_model = open_clip.create_model(config.stem, pretrained=None)
    ref_model.load_state_dict(torch.load(weights, weights_only=True))  # the saved weights, not a fresh random init
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    texts = ["a cat", "a bus", "a tree in a field"]
    scores = SD.clip_scores(clip, images, texts, "cpu")
    with torch.no_grad():
        pixels = torch.stack([preprocess(p) for p in SD._pil(images)])
        want = torch.nn.functional.cosine_similarity(ref_model.eval().encode_image(pixels), ref_model.encode_text(tokenizer(texts)), dim=-1)
    assert scores.shape == (3,) and np.allclose(scores, want.numpy(), atol=1e-5)
    assert np.all(np.abs(scores) <= 1) and len(set(np.round(scores, 6))) == 3
    with pytest.raises(MissingResource, match="unavailable"):
        SD.load_clip({"clip_model": str(config), "clip_pretrained": "no-such-tag"}, "cpu")


def test_aesthetic_mlp_layout_and_scores(tmp_path: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in SD.AestheticMLP().state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
                      "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
                      "layers.7.weight": (1, 16), "layers.7.bias": (1,)}  # the keys of sac+logos+ava1-l14-linearMSE.pth
    state = torch.load(T.build_tiny_aesthetic(tmp_path / "aes.pth", input_size=768), weights_only=True)  # the package's random head
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes and all(v.std() > 0.05 for k, v in state.items() if v.numel() > 1)
    mlp = SD.AestheticMLP.load(tmp_path / "aes.pth")
    feats = torch.randn(4, 768, generator=torch.Generator().manual_seed(0)) * 3
    feats[3] = 0
    h = feats / torch.where(feats.norm(dim=-1, keepdim=True) == 0, 1.0, feats.norm(dim=-1, keepdim=True))
    for i in (0, 2, 4, 6, 7):  # no activations in the official head (its ReLUs are commented out)
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    with torch.no_grad():
        assert torch.allclose(mlp.score(feats), h.squeeze(-1), atol=1e-5)  # row 3: a zero embedding stays zero
    with pytest.raises(MissingResource, match="improved-aesthetic-predictor"):
        SD.AestheticMLP.load(tmp_path / "missing.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ReproError, match="state dict"):
        SD.AestheticMLP.load(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------- COCO captions


def test_coco_subset_matches_data_process_recipe(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    rng = np.random.RandomState(0)
    images = [{"id": int(i), "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in rng.permutation(40) + 1]
    annotations = [{"id": 1000 + j, "image_id": int(rng.randint(1, 41)), "caption": f"caption {j} "} for j in range(90)]
    annotations += [{"id": 5000 + im["id"], "image_id": im["id"], "caption": f"only {im['id']}"} for im in images]
    coco = {"images": images, "annotations": annotations}
    # data_process.py, step by step (global numpy state, pandas sampling).
    state = np.random.get_state()
    try:
        np.random.seed(123)
        df = pd.DataFrame(images).merge(pd.DataFrame(annotations), how="left", left_on="id", right_on="image_id")[["file_name", "caption"]]
        df = df.sample(frac=1)
        want = list(df.sample(25)["caption"])
    finally:
        np.random.set_state(state)
    assert SD.coco_subset_captions(coco, 25) == want
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert SD.load_captions(tmp_path / "captions_val2014.json", n=5, subset_size=25) == want[:5]
    with pytest.raises(ReproError, match="fewer than"):
        SD.coco_subset_captions(coco, 10_000)


# ------------------------------------------------------------------------------------------ end to end


class _Pixels:
    """A cheap FID feature stand-in (4x4 average-pooled RGB): the 2048-d Inception's sqrtm alone costs ~12 s on 1 CPU."""

    name = "test-sd-pixels"
    outputs = ("pool",)

    def __init__(self, device="cpu", **_):
        self.device = device

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)}

    def provenance(self) -> dict:
        return {"extractor": self.name}


def _register_pixels() -> None:
    from repro.metrics.extractors import EXTRACTORS, ExtractorSpec

    if "test-sd-pixels" not in EXTRACTORS:
        EXTRACTORS.register("test-sd-pixels", ExtractorSpec("test-sd-pixels", lambda device="cpu", **kw: _Pixels(device, **kw), ("pool",)))


def test_end_to_end_on_the_tiny_pipeline(tmp_path: Path, tiny_sd: Path) -> None:
    from repro.metrics.image_metrics import extract
    from repro.runner import run_cell
    from repro.spec import Cell

    _register_pixels()

    config, weights = T.build_tiny_clip(tmp_path, "tiny-clip-e2e")
    T.build_tiny_aesthetic(tmp_path / "aes.pth")
    g = torch.Generator().manual_seed(0)
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, 7)]
    captions = ["a dog on a beach", "a plate of food", "a man riding a bike", "a clock tower", "two cats", "a red kite in the sky"]
    coco = {"images": images, "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in zip(range(1, 7), captions)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    ref_images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    feats = extract(ref_images, "test-sd-pixels", "cpu")["pool"].astype(np.float64)
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False) + np.eye(feats.shape[1]) * 1e-2)
    settings = {"model_backend": "diffusers", "model_path": str(tiny_sd), "captions": str(tmp_path / "captions.json"), "caption_subset": 6,
                "ref_stats": str(tmp_path / "ref.npz"), "extractor": "test-sd-pixels", "clip_model": str(config),
                "clip_pretrained": str(weights), "aesthetic_weights": str(tmp_path / "aes.pth"), "aesthetic_clip_model": str(config),
                "aesthetic_clip_pretrained": str(weights), "num_samples": 4, "batch_size": 2, "shard_size": 4}
    cell = Cell("restart.sd", "test", "restart.sd_fid_clip", {"sampler": "restart", "guidance": 3, "n_main": 6, "intervals": [[3, 1, 0.1, 2.0]]}, 0, settings)
    record = run_cell(cell, "spechash", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", show_progress=False)
    assert record["status"] == "ok", record["error"]
    metrics = record["metrics"]
    assert set(metrics) == {"fid_5k", "clip_score", "aesthetic"} and all(math.isfinite(v) for v in metrics.values())
    assert metrics["fid_5k"] > 0 and -1 <= metrics["clip_score"] <= 1
    # 6 DDIM steps + one restart pass of 2 Heun steps and a last Euler step (t_min 0.1 lands on timestep 1).
    assert record["extra"]["sampler"]["steps"] == 9 and record["extra"]["scheduler"]["steps_offset"] == 1


def test_random_stand_ins_run_the_paper_path_and_are_built_once(tmp_path: Path, tiny_sd: Path) -> None:
    """The smoke scale's special values: the same kind on the package's tiny builders, each built once per cache."""
    import hashlib

    from repro.runner import run_cell
    from repro.spec import Cell

    _register_pixels()
    # The paper's model names stay in the merged settings; the stand-ins must override them.
    settings = {"model_path": "random:tiny-sd", "clip_model": "random:tiny-clip", "clip_pretrained": "laion2b_s12b_b42k",
                "aesthetic_weights": "random:tiny-aesthetic", "aesthetic_clip_model": "ViT-L-14-quickgelu", "aesthetic_clip_pretrained": "openai",
                "captions": "random:tiny-coco", "caption_subset": len(T.TINY_CAPTIONS), "ref_stats": "random:tiny-coco",
                "extractor": "test-sd-pixels", "num_samples": 2, "batch_size": 2, "shard_size": 2}
    cache = tmp_path / "cache"

    def run(params: dict, **override) -> dict:
        cell = Cell("restart.sd", "test", "restart.sd_fid_clip", params, 0, dict(settings, **override))
        return run_cell(cell, "spechash", results_dir=tmp_path / "results", cache_dir=cache, show_progress=False)

    records = [run({"sampler": "ddim", "guidance": 3, "steps": 3}), run({"sampler": "restart", "guidance": 3, "n_main": 6, "intervals": [[3, 1, 0.1, 2.0]]})]
    for rec in records:
        assert rec["status"] == "ok", rec["error"]
        assert set(rec["metrics"]) == {"fid_5k", "clip_score", "aesthetic"} and all(math.isfinite(v) for v in rec["metrics"].values())
        assert rec["extra"]["tiny_random"]["aesthetic_clip_model"] == "random:tiny-clip"
    assert [r["extra"]["sampler"]["steps"] for r in records] == [3, 9]
    for name in ("sd", "clip", "aesthetic", "coco", "ref"):  # the second cell reused every folder the first one built
        assert len(list((cache / f"restart-sd-tiny-{name}").iterdir())) == 1, name
    # Deterministic: the cached folder holds the same U-Net weights as the fixture's independent build.
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert records[1]["provenance"]["files"][f"tiny-sd/{unet}"]["sha256"] == hashlib.sha256((tiny_sd / unet).read_bytes()).hexdigest()
    (coco,) = (cache / "restart-sd-tiny-coco").iterdir()
    assert sorted(SD.load_captions(coco / "captions_val2014.json", n=16, subset_size=16)) == sorted(T.TINY_CAPTIONS)
    (ref,) = (cache / "restart-sd-tiny-ref").iterdir()
    assert int(np.load(ref / "stats.npz")["n"]) == len(T.TINY_CAPTIONS)
    bad = run({"sampler": "ddim", "guidance": 3, "steps": 3}, clip_model="random:tiny-vit")
    assert bad["status"] != "ok" and "not a known tiny stand-in" in bad["error"]
    old = run({"sampler": "ddim", "guidance": 3, "steps": 3}, model_backend="tiny-random")
    assert old["status"] != "ok" and "unknown model_backend" in old["error"]
