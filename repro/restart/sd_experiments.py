"""Experiment kind ``restart.sd_fid_clip``: Restart on Stable Diffusion v1.5 (Restart paper Tables 6-10).

Paper protocol (restart.md §1d): ``runwayml/stable-diffusion-v1-5`` at 512x512, classifier-free guidance
w in {2, 3, 5, 8}, 5K COCO val2014 captions, FID-5k against the COCO images of those captions, CLIP score with
open_clip ViT-g-14 (``laion2b_s12b_b42k``) and the LAION aesthetic score. NFE = 2 x steps (CFG evaluates the
conditional and the unconditional branch).

The paper's numbers come from the official diffusers fork (Newbeeer/diffusion_restart_sampling at 8cbcb07,
``diffuser/``: ``generate.py``, the fork's ``pipeline_stable_diffusion.py`` L640-820, ``scheduling_ddim.py``,
``scheduling_ddpm.py``, ``eval_clip_score.py``, ``data_process.py``). Our loops are written in sigma form
(sigma(t) = sqrt((1 - abar_t) / abar_t), x_sigma = x_vp / sqrt(abar_t), guided eps from the U-Net evaluated at
x_vp and the integer timestep t) and follow that code:

* DDIM (eta = 0) = Euler in sigma: diffusers' "leading" timesteps + steps_offset (958, 925, ..., 1 for 30 steps),
  the last step lands on ``final_alpha_cumprod`` (abar_0 for SD's ``set_alpha_to_one=False``, sigma_0 = 0.029, not
  sigma = 0) and the start latent is N(0, I) at VP scale (diffusers' ``init_noise_sigma = 1``);
* Heun (``--second``): the same grid with (n + 1) / 2 steps, a 2nd-order correction on every step but the last;
* DDPM: the fork's ``DDPMScheduler`` ignores ``steps_offset`` (timesteps 990, ..., 10, 0), then steps 0 -> 0 once
  more (one wasted evaluation, an exact no-op); each real step is the DDPM posterior, which in sigma form is exactly
  k-diffusion's Euler-ancestral with eta = 1 (algebra in :func:`ddpm_ancestral_loop`);
* Restart (Table 10): after the main step that lands on the grid point nearest t_min (nearest in sigma, the final
  point included), t_max is rounded to the nearest *training* timestep, the restart grid is
  ``round(linspace(t_min_step, t_max_step, N_Restart))`` in *timesteps* (an earlier version of this module used an
  EDM rho = 7 sigma grid from t_max itself: fixed), the noise is the fork's ``add_noise_between_t``
  (``x_vp sqrt(abar_max / abar_min) + sqrt(1 - abar_max / abar_min) z``, i.e. x_sigma + sqrt(sigma_max^2 -
  sigma_min^2) z), then N_Restart - 1 Heun steps (DDIM step with the averaged eps == Heun in sigma), K times. The
  fork makes the last restart step Euler when t_min's timestep is <= 1, and with 30 main steps t_min = 0.1 lands on
  timestep 1 (sigma 0.041; timestep 34 has sigma 0.175): Table 10's configs take 62 steps for w = 2 (t_min -> 364
  and 793, t_max -> 914 and 934) and 64 for w = 3, 5, 8 (t_min -> 1, t_max 3 -> 673, 2 -> 562), while the
  formula N_main + sum K * 2 * (N_Restart - 1) gives 62 / 66 and the paper prints 66 / 66 / 66 / "47".

What is verified here (tests/restart/test_sd_experiments.py), all on a tiny randomly initialised diffusers
StableDiffusionPipeline folder loaded through the same ``load_sd`` path as SD v1.5: our DDIM equals diffusers'
``StableDiffusionPipeline`` + ``DDIMScheduler`` (eta = 0) from the same latents; our Heun and DDPM equal loops
built from diffusers' own ``DDIMScheduler.step`` / ``DDPMScheduler.step`` on the fork's grids (same noise); our
Restart equals a VP-space transcription of the fork's Restart block; CLIP score and aesthetic score run on tiny
random open_clip models; the COCO caption subset equals ``data_process.py``'s pandas recipe on a synthetic
annotation file. NOT verified: anything with the real SD v1.5, ViT-g-14, ViT-L/14 or aesthetic weights (never
loaded here), the FID network (we use ``settings.extractor``; the fork used pytorch-fid's Inception), fp16 (the
fork's CLIP/aesthetic evaluation ran under CUDA autocast; we run fp32), and the paper's numbers themselves.

The smoke scale runs this same code path end to end (``load_sd``, prompt encoding, the loops, VAE decode, FID, CLIP
and aesthetic score) on tiny randomly initialised networks of SD's architectures, built offline by
:mod:`repro.restart.sd_tiny` and named in the spec by special values: ``model_path = "random:tiny-sd"`` (a diffusers
pipeline folder of SD v1.5's layout and scheduler config), ``clip_model = "random:tiny-clip"`` (a tiny open_clip ViT),
``aesthetic_weights = "random:tiny-aesthetic"`` (the official head's layout on the tiny CLIP's features) and
``captions`` / ``ref_stats = "random:tiny-coco"`` (a COCO-format file of 16 fixed captions and stats of deterministic
noise images). Only the sizes change; the smoke numbers say nothing about Stable Diffusion.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.errors import MissingResource, ReproError
from repro.kinds import register_kind

# Table 10: N_main = 30 DDIM steps; Restart intervals (N_Restart, K, t_min, t_max) per guidance weight.
SD_RESTART_CONFIGS: dict[int, dict[str, Any]] = {
    2: dict(n_main=30, intervals=[[5, 2, 1.0, 9.0], [5, 2, 5.0, 10.0]]),
    3: dict(n_main=30, intervals=[[10, 2, 0.1, 3.0]]),
    5: dict(n_main=30, intervals=[[10, 2, 0.1, 2.0]]),
    8: dict(n_main=30, intervals=[[10, 2, 0.1, 2.0]]),
}
SD_INSTALL_HINT = ("pip install -e '.[sd]' (diffusers, transformers, open_clip_torch); download runwayml/stable-diffusion-v1-5 "
                   "(CreativeML OpenRAIL-M) to a local folder and set settings.model_path (or $REPRO_SD_MODEL)")
AESTHETIC_WEIGHTS_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"


# --------------------------------------------------------------------------------------- discrete eps schedule


@dataclass
class DiscreteSchedule:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) for the model's discrete training timesteps t = 0..T-1.

    ``final_alpha_cumprod`` is abar after the last DDIM step (diffusers: 1 if ``set_alpha_to_one`` else abar_0);
    ``steps_offset`` is added to the "leading" DDIM timesteps (SD v1.5: 1)."""

    alphas_cumprod: torch.Tensor  # float64 [T]
    final_alpha_cumprod: float = 1.0
    steps_offset: int = 1

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                      set_alpha_to_one: bool = True, steps_offset: int = 1) -> DiscreteSchedule:
        """Stable Diffusion v1's betas (diffusers ``beta_schedule="scaled_linear"``); SD v1.5's config has
        ``set_alpha_to_one=False`` (see :meth:`from_diffusers`)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls(abar, 1.0 if set_alpha_to_one else float(abar[0]), steps_offset)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> DiscreteSchedule:
        """The schedule of a diffusers scheduler (SD v1.5 ships a PNDMScheduler config; the fork builds its DDIM and
        DDPM schedulers ``from_config`` of it). Raises for configs our eps-only, unclipped loops do not mirror."""
        cfg = dict(scheduler.config)
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ReproError(f"SD loops need an epsilon-prediction model, scheduler says {cfg.get('prediction_type')!r}")
        # DDIMScheduler.from_config defaults clip_sample to True when the key is absent; SD v1.5 sets it False.
        if cfg.get("clip_sample", True) or cfg.get("thresholding", False):
            raise ReproError("the scheduler config asks for x0 clipping/thresholding (clip_sample must be false, as in SD v1.5); "
                             "our loops never clip")
        if cfg.get("timestep_spacing", "leading") != "leading":
            raise ReproError(f"timestep_spacing {cfg['timestep_spacing']!r}: the official fork (and SD v1.5) use 'leading'")
        abar = scheduler.alphas_cumprod.detach().to(torch.float64).cpu()  # diffusers' float32 values, widened
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(abar[0])
        return cls(abar, final, int(cfg.get("steps_offset", 0)))

    @property
    def sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def final_sigma(self) -> float:
        return math.sqrt((1.0 - self.final_alpha_cumprod) / self.final_alpha_cumprod)

    def sigma_at(self, t: int) -> float:
        return float(self.sigmas[int(t)])

    def t_of_sigma(self, sigma: float) -> float:
        """Continuous timestep for ``sigma``: linear interpolation in log-sigma between neighbouring timesteps."""
        log_sigmas = self.sigmas.log()
        log_s = math.log(max(sigma, 1e-10))
        if log_s <= float(log_sigmas[0]):
            return 0.0
        if log_s >= float(log_sigmas[-1]):
            return float(len(log_sigmas) - 1)
        hi = int(torch.searchsorted(log_sigmas, torch.tensor(log_s, dtype=torch.float64)))
        lo = hi - 1
        w = (log_s - float(log_sigmas[lo])) / (float(log_sigmas[hi]) - float(log_sigmas[lo]))
        return lo + w

    def nearest_timestep(self, sigma: float) -> int:
        """The training timestep whose sigma is nearest (linear distance, like the fork's ``argmin |sigmas - t|``)."""
        return int(torch.argmin((self.sigmas - sigma).abs()))

    def leading_timesteps(self, n_steps: int, steps_offset: int) -> list[int]:
        """diffusers' ``set_timesteps(n)`` with "leading" spacing: (0, r, ..., (n-1) r) reversed, + offset, r = T // n."""
        T = len(self.alphas_cumprod)
        if not 1 <= n_steps <= T:
            raise ReproError(f"number of steps must be in 1..{T}, got {n_steps}")
        ts = (np.arange(0, n_steps) * (T // n_steps)).round()[::-1].astype(np.int64) + steps_offset
        return [int(t) for t in np.clip(ts, 0, T - 1)]

    def ddim_sigmas(self, n_steps: int, steps_offset: int | None = None) -> list[float]:
        """Sigmas of diffusers' DDIM ``set_timesteps(n)``, then the sigma of ``final_alpha_cumprod`` (0 when 1)."""
        offset = self.steps_offset if steps_offset is None else steps_offset
        return [self.sigma_at(t) for t in self.leading_timesteps(n_steps, offset)] + [self.final_sigma]

    def ddpm_sigmas(self, n_steps: int) -> list[float]:
        """The fork's DDPM grid: its ``set_timesteps`` has no steps_offset and appends a 0, so the n timesteps
        (..., r, 0) are followed by 0 again: n evaluations, the last one a no-op step 0 -> 0."""
        ts = self.leading_timesteps(n_steps, 0)
        return [self.sigma_at(t) for t in ts] + [self.sigma_at(0)]


EpsFn = Callable[[torch.Tensor, float, Any], torch.Tensor]  # eps(x_vp, t_continuous, cond) -> eps


class CFGDenoiser:
    """D(x; sigma) for an eps model with classifier-free guidance; counts model evaluations (2 per call).

    When cond and uncond are tensors the two branches go through the model as one batch [uncond; cond], as in
    diffusers' pipeline."""

    def __init__(self, eps_fn: EpsFn, schedule: DiscreteSchedule, cond: Any, uncond: Any, guidance: float):
        self.eps_fn, self.schedule = eps_fn, schedule
        self.cond, self.uncond, self.guidance = cond, uncond, float(guidance)
        self.model_evals = 0

    def eps(self, x_vp: torch.Tensor, t: float) -> torch.Tensor:
        if isinstance(self.cond, torch.Tensor) and isinstance(self.uncond, torch.Tensor):
            eps_u, eps_c = self.eps_fn(torch.cat([x_vp, x_vp]), t, torch.cat([self.uncond, self.cond])).chunk(2)
        else:
            eps_u, eps_c = self.eps_fn(x_vp, t, self.uncond), self.eps_fn(x_vp, t, self.cond)
        self.model_evals += 2
        return eps_u + self.guidance * (eps_c - eps_u)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        eps = self.eps(x / math.sqrt(sigma**2 + 1.0), self.schedule.t_of_sigma(sigma))
        return x - sigma * eps.to(x.dtype)


def restart_grid(schedule: DiscreteSchedule, sigma_min: float, t_max: float, n_restart: int) -> list[float]:
    """The fork's Restart grid (descending sigmas, ends at ``sigma_min``): t_max -> nearest training timestep,
    ``torch.round(torch.linspace(t_min_step, t_max_step, N))`` in float32 timesteps, flipped."""
    t_lo = int(round(schedule.t_of_sigma(sigma_min)))
    t_hi = schedule.nearest_timestep(t_max)
    if t_hi <= t_lo:
        raise ReproError(f"restart t_max {t_max:g} (timestep {t_hi}) is not above t_min (timestep {t_lo})")
    steps = torch.linspace(float(t_lo), float(t_hi), n_restart, dtype=torch.float32).round().flip(0).long()
    return [schedule.sigma_at(int(t)) for t in steps]


@dataclass
class RestartPass:
    """One Restart interval placed on the main grid: after main grid point ``index``, K times noise from
    ``grid[-1]`` to ``grid[0]`` and run back down ``grid``; ``last_euler`` when the fork's last step there is Euler."""

    index: int
    k: int
    grid: list[float]
    last_euler: bool

    @property
    def steps(self) -> int:
        return self.k * (2 * (len(self.grid) - 1) - int(self.last_euler))


def plan_restarts(schedule: DiscreteSchedule, main_sigmas: list[float], intervals: Any) -> dict[int, RestartPass]:
    """Where and how the fork restarts: t_min -> the main grid point nearest in sigma (the final point included),
    t_max -> the nearest training timestep, a timestep-linear grid between them. The fork's Heun correction inside a
    restart pass is skipped on the last step when t_min's timestep is <= 1 (``j < len - 2 or new_t_steps[-1] > 1``):
    with 30 main steps t_min = 0.1 lands on timestep 1 (sigma 0.041, nearer than timestep 34's 0.175), so the
    w = 3/5/8 configs take 64 steps, not the 66 of Table 10's formula."""
    from repro.restart.samplers import parse_restart_config

    grid_sig = torch.tensor(main_sigmas, dtype=torch.float64)
    passes: dict[int, RestartPass] = {}
    for iv in parse_restart_config(intervals):
        idx = int(torch.argmin((grid_sig - iv.t_min).abs()))
        s_min = main_sigmas[idx]
        if idx == 0 or s_min <= 0:
            # idx 0: the fork would silently never restart; sigma 0 (set_alpha_to_one=True) cannot be restarted from.
            raise ReproError(f"restart interval {iv.as_list()} does not fit the main grid (t_min rounds to grid point {idx}, sigma {s_min:g})")
        if idx in passes:
            raise ReproError(f"two restart intervals round to the same grid point {idx} (the fork keeps only the last one)")
        passes[idx] = RestartPass(idx, iv.k, restart_grid(schedule, s_min, iv.t_max, iv.n_restart), round(schedule.t_of_sigma(s_min)) <= 1)
    return passes


def restart_eps_loop(denoiser: CFGDenoiser, x: torch.Tensor, main_sigmas: list[float], intervals: Any,
                     noise: Any, main: str = "ddim") -> tuple[torch.Tensor, int]:
    """The fork's sampling loop in sigma form. ``main`` = "ddim" (Euler) or "heun" (2nd-order correction on every
    main step but the last, the fork's ``second_order``); Restart passes use Heun (see :func:`plan_restarts` for
    their last step). Returns (x in sigma space at ``main_sigmas[-1]``, steps), a step being one guided
    evaluation (NFE = 2 x steps)."""
    if main not in ("ddim", "heun"):
        raise ReproError(f"main solver must be 'ddim' or 'heun', got {main!r}")
    passes = plan_restarts(denoiser.schedule, main_sigmas, intervals)
    steps = 0

    def euler(x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        nonlocal steps
        steps += 1
        return x + (s_next - s) * (x - denoiser(x, s)) / s

    def heun(x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        # The fork: x' = DDIM(x, eps(x, t)); x_next = DDIM(x, (eps(x, t) + eps(x', t')) / 2). DDIM is Euler in sigma
        # with slope eps = (x - D) / sigma, so this is Heun in sigma.
        nonlocal steps
        d = (x - denoiser(x, s)) / s
        x_next = x + (s_next - s) * d
        d2 = (x_next - denoiser(x_next, s_next)) / s_next
        steps += 2
        return x + (s_next - s) * 0.5 * (d + d2)

    n = len(main_sigmas) - 1
    for i in range(n):
        x = (heun if main == "heun" and i < n - 1 else euler)(x, main_sigmas[i], main_sigmas[i + 1])
        rp = passes.get(i + 1)
        if rp is not None:
            for _ in range(rp.k):
                x = x + noise.randn_like(x) * math.sqrt(rp.grid[0] ** 2 - rp.grid[-1] ** 2)
                for j in range(len(rp.grid) - 1):
                    last = j == len(rp.grid) - 2
                    x = (euler if last and rp.last_euler else heun)(x, rp.grid[j], rp.grid[j + 1])
    return x, steps


def sd_restart_steps(n_main: int, intervals: Any) -> int:
    """Table 10's step count: N_main + sum K * 2 * (N_Restart - 1) (the fork evaluates fewer when t_min lands on
    timestep <= 1: :func:`sd_restart_steps_counted`)."""
    from repro.restart.samplers import parse_restart_config

    return n_main + sum(iv.k * 2 * (iv.n_restart - 1) for iv in parse_restart_config(intervals))


def sd_restart_steps_counted(schedule: DiscreteSchedule, n_main: int, intervals: Any) -> int:
    """The guided evaluations the fork's Restart loop makes on ``schedule`` (62 for w = 2, 64 for w = 3, 5, 8)."""
    return n_main + sum(rp.steps for rp in plan_restarts(schedule, schedule.ddim_sigmas(n_main), intervals).values())


def ddpm_ancestral_loop(denoiser: CFGDenoiser, x: torch.Tensor, main_sigmas: list[float], noise: Any) -> tuple[torch.Tensor, int]:
    """DDPM ancestral sampling in sigma form; one evaluation per grid step.

    Written as k-diffusion's Euler-ancestral with eta = 1, which is the DDPM posterior exactly: with
    s^2 = (1 - a) / a, s'^2 = (1 - a') / a', the posterior std over sqrt(a') is s' sqrt(s^2 - s'^2) / s = sigma_up and
    its mean over sqrt(a') is x0 + sqrt(s'^2 - sigma_up^2) eps = x + (sigma_down - s) eps. A step s -> s is a no-op."""
    steps = 0
    for s, s_next in zip(main_sigmas[:-1], main_sigmas[1:]):
        denoised = denoiser(x, s)
        steps += 1
        sigma_up = min(s_next, math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        sigma_down = math.sqrt(max(s_next**2 - sigma_up**2, 0.0))
        x = x + (sigma_down - s) * (x - denoised) / s
        if sigma_up > 0:
            x = x + noise.randn_like(x) * sigma_up
    return x, steps


def _restart_config(params: dict[str, Any]) -> dict[str, Any]:
    """The cell's Restart config: its own n_main / intervals, else Table 10's for its guidance weight."""
    cfg = SD_RESTART_CONFIGS.get(int(params["guidance"]))
    if cfg is None and "intervals" not in params:
        raise ReproError(f"no Table 10 Restart config for guidance {params['guidance']}; give n_main and intervals")
    return {"n_main": int(params.get("n_main", cfg["n_main"] if cfg else 30)), "intervals": params.get("intervals", cfg["intervals"] if cfg else [])}


def run_sampler(name: str, params: dict[str, Any], denoiser: CFGDenoiser, schedule: DiscreteSchedule, x_unit: torch.Tensor,
                noise: Any) -> tuple[torch.Tensor, int, int]:
    """Run one SD sampler from N(0, I) latents (VP scale, as diffusers' ``prepare_latents``); returns (the final VP
    latent, steps taken, steps expected)."""
    if name == "restart":
        rc = _restart_config(params)
        n_main, intervals = rc["n_main"], rc["intervals"]
        sig, expected = schedule.ddim_sigmas(n_main), sd_restart_steps_counted(schedule, n_main, intervals)
        run = lambda x: restart_eps_loop(denoiser, x, sig, intervals, noise)  # noqa: E731
    elif name in ("ddim", "ddpm", "heun"):
        expected = int(params["steps"])
        if name == "ddim":
            sig = schedule.ddim_sigmas(expected)
            run = lambda x: restart_eps_loop(denoiser, x, sig, [], noise)  # noqa: E731
        elif name == "ddpm":
            sig = schedule.ddpm_sigmas(expected)
            run = lambda x: ddpm_ancestral_loop(denoiser, x, sig, noise)  # noqa: E731
        else:
            # "Heun 51" = the fork's DDIM with --second and 26 steps: 26 evaluations + 25 corrections.
            if expected % 2 == 0:
                raise ReproError(f"heun: steps must be odd (2 * points - 1), got {expected}")
            sig = schedule.ddim_sigmas((expected + 1) // 2)
            run = lambda x: restart_eps_loop(denoiser, x, sig, [], noise, main="heun")  # noqa: E731
    else:
        raise ReproError(f"unknown SD sampler {name!r} (ddim, ddpm, heun, restart)")
    x, steps = run(x_unit * math.sqrt(sig[0] ** 2 + 1.0))  # x_sigma = x_vp / sqrt(abar)
    return x / math.sqrt(sig[-1] ** 2 + 1.0), steps, expected


def to_uint8_like_diffusers(x: torch.Tensor) -> torch.Tensor:
    """diffusers' postprocess + ``numpy_to_pil``: ``round(clamp(x / 2 + 0.5, 0, 1) * 255)`` as uint8."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------- paper-scale pieces


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingResource(f"Stable Diffusion experiments need the optional package '{module}': {SD_INSTALL_HINT}") from None


def _resolve(path: str | os.PathLike) -> Path:
    from repro.restart.image_experiments import resolve_checkpoint_path  # $VARS, ~ and $REPRO_DATA_DIR for relative paths

    return resolve_checkpoint_path(str(path))


def coco_subset_captions(coco: dict[str, Any], n_subset: int = 5000, seed: int = 123) -> list[str]:
    """The caption subset of the fork's ``data_process.py`` without pandas: images left-merged with their annotations
    (image order, then annotation order), ``np.random.seed(123)``, ``df.sample(frac=1)`` then ``df.sample(5000)``
    (pandas draws both with ``np.random.choice(len, size, replace=False)`` from the global state)."""
    by_image: dict[Any, list[str]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    rows: list[str | None] = []
    for image in coco["images"]:
        rows.extend(by_image.get(image["id"]) or [None])  # a left merge keeps an image without captions (NaN)
    if len(rows) < n_subset:
        raise ReproError(f"{len(rows)} image-caption rows, fewer than the subset of {n_subset}")
    rng = np.random.RandomState(seed)  # == np.random.seed(seed) without touching the global state
    shuffled = [rows[int(i)] for i in rng.choice(len(rows), len(rows), replace=False)]
    subset = [shuffled[int(i)] for i in rng.choice(len(shuffled), n_subset, replace=False)]
    if any(c is None for c in subset):
        raise ReproError("the COCO subset picked an image without a caption")
    return subset  # type: ignore[return-value]


def load_captions(path: str | os.PathLike, n: int = 5000, seed: int = 123, subset_size: int = 5000) -> list[str]:
    """COCO captions: a .txt (one per line) / .json list of strings used as is, or COCO's ``captions_val2014.json``,
    from which the fork's 5K subset is drawn (:func:`coco_subset_captions`); the first ``n`` are returned (the fork's
    ``generate.py --max_cnt``)."""
    p = _resolve(path)
    if not p.is_file():
        raise MissingResource(f"COCO captions not found at {p}: give a .txt with one caption per line or COCO's "
                              "annotations/captions_val2014.json (http://images.cocodataset.org/annotations/annotations_trainval2014.zip)")
    if p.suffix == ".txt":
        return [line.strip() for line in p.read_text().splitlines() if line.strip()][:n]
    data = json.loads(p.read_text())
    if isinstance(data, list):
        return [str(c) for c in data][:n]
    return coco_subset_captions(data, subset_size, seed)[:n]


def load_sd(settings: dict[str, Any], device: Any):
    """A diffusers StableDiffusionPipeline folder (SD v1.5 or any folder of the same layout) on ``device``.

    fp32 unless ``settings.sd_dtype = "float16"``: the fork loads the pipeline without a dtype, i.e. fp32."""
    diffusers = _require("diffusers")
    _require("transformers")
    model_path = settings.get("model_path") or os.environ.get("REPRO_SD_MODEL")
    path = _resolve(model_path) if model_path else None
    if path is None or not (path / "model_index.json").is_file():
        raise MissingResource(f"Stable Diffusion v1.5 weights not found at {model_path!r} (no model_index.json): {SD_INSTALL_HINT}")
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(str(settings.get("sd_dtype", "float32")))
    if dtype is None:
        raise ReproError(f"sd_dtype must be float32 or float16, got {settings.get('sd_dtype')!r}")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False).to(device)
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def sd_encode(pipe: Any, texts: list[str], device: Any) -> torch.Tensor:
    """Prompt embeddings as the pipeline's ``encode_prompt`` (no clip_skip): padded to model_max_length, last hidden
    state; the empty prompt gives the unconditional branch."""
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    return pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(pipe.text_encoder.dtype)


def sd_eps_fn(pipe: Any, device: Any) -> EpsFn:
    """eps(x_vp, t, prompt embeddings) of the pipeline's U-Net (t is a float; at grid points an integer timestep)."""

    def eps_fn(x_vp: torch.Tensor, t: float, cond: torch.Tensor) -> torch.Tensor:
        out = pipe.unet(x_vp.to(pipe.unet.dtype), torch.tensor(t, device=device), encoder_hidden_states=cond).sample
        return out.to(x_vp.dtype)

    return eps_fn


def sd_decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of VP-scale latents to [-1, 1] images (the pipeline's ``vae.decode(latents / scaling_factor)``)."""
    return pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)).sample


def _open_clip(arch: str, pretrained: str | None, device: Any, what: str):
    """(model, val preprocess, tokenizer). ``arch`` is an open_clip model name or a path to a model-config .json
    (registered under its file stem); ``pretrained`` a tag (needs the open_clip/HF cache offline) or a local file."""
    open_clip = _require("open_clip")
    if str(arch).endswith(".json"):
        cfg = _resolve(arch)
        if not cfg.is_file():
            raise MissingResource(f"{what}: open_clip model config {cfg} not found")
        open_clip.add_model_config(str(cfg))
        arch = cfg.stem
    if not pretrained:
        raise ReproError(f"{what}: no weights given for open_clip {arch} (a tag or a local file)")
    local = _resolve(pretrained)
    weights = str(local) if local.is_file() else str(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
    except Exception as exc:  # no network: the weights must be in the local cache or a file path
        raise MissingResource(f"{what}: open_clip {arch} weights '{pretrained}' unavailable ({type(exc).__name__}: {exc}); "
                              "download them and give the local file") from None
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(arch)


def load_clip(settings: dict[str, Any], device: Any):
    """The CLIP-score model: open_clip ViT-g-14 ``laion2b_s12b_b42k`` (the fork's ``eval_clip_score.py``)."""
    return _open_clip(settings.get("clip_model", "ViT-g-14"), settings.get("clip_pretrained", "laion2b_s12b_b42k"), device, "CLIP score")


def _pil(images_uint8: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images_uint8]


def clip_scores(clip: tuple, images_uint8: torch.Tensor, texts: list[str], device: Any) -> np.ndarray:
    """Per image cos(image embedding, caption embedding), as ``eval_clip_score.py`` (L2-normalised features, their dot
    product, no x100 and no clamp at 0; the paper's table averages it)."""
    model, preprocess, tokenizer = clip
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(p) for p in _pil(images_uint8)]).to(device)).float()
        ft = model.encode_text(tokenizer(texts).to(device)).float()
    fi = fi / fi.norm(dim=-1, keepdim=True)
    ft = ft / ft.norm(dim=-1, keepdim=True)
    return (fi * ft).sum(-1).cpu().numpy()


class AestheticMLP(torch.nn.Module):
    """LAION-Aesthetics Predictor V2 head (christophschuhmann/improved-aesthetic-predictor, used by the fork's
    ``aesthetic_score.py``): Linear 768-1024, Dropout .2, Linear 1024-128, Dropout .2, Linear 128-64, Dropout .1,
    Linear 64-16, Linear 16-1. The official class has its ReLUs commented out, so the head is affine; the layer
    indices (``layers.0/2/4/6/7``) match the state dict of ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    def score(self, image_features: torch.Tensor) -> torch.Tensor:
        """Scores [N] of CLIP image features [N, D], L2-normalised first (a zero vector stays zero, as upstream)."""
        norm = image_features.norm(dim=-1, keepdim=True)
        return self(image_features / torch.where(norm == 0, torch.ones_like(norm), norm)).squeeze(-1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AestheticMLP:
        p = _resolve(path)
        if not p.is_file():
            raise MissingResource(f"aesthetic predictor weights not found at {p}: download {AESTHETIC_WEIGHTS_URL} "
                                  "and set settings.aesthetic_weights to it")
        state = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "layers.0.weight" not in state:
            raise ReproError(f"{p} is not an aesthetic-predictor state dict (keys layers.0/2/4/6/7.weight/bias)")
        mlp = cls(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state, strict=True)
        return mlp.eval()


def load_aesthetic(settings: dict[str, Any], device: Any):
    """(AestheticMLP, its CLIP model): the fork embeds with OpenAI CLIP ViT-L/14 (``clip.load``); open_clip's
    ``ViT-L-14-quickgelu`` + ``openai`` is the same network and weights."""
    mlp = AestheticMLP.load(settings["aesthetic_weights"]).to(device)
    clip = _open_clip(settings.get("aesthetic_clip_model", "ViT-L-14-quickgelu"), settings.get("aesthetic_clip_pretrained", "openai"),
                      device, "aesthetic score")
    return mlp, clip


def aesthetic_scores(aesthetic: tuple, images_uint8: torch.Tensor, device: Any) -> np.ndarray:
    """Per image LAION aesthetic score. The fork feeds ViT-L/14 the ViT-g-14-preprocessed tensor; both transforms are
    bicubic resize + centre crop to 224 and OpenAI's mean/std, so the model's own preprocess is the same input."""
    mlp, (model, preprocess, _) = aesthetic
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(p) for p in _pil(images_uint8)]).to(device)).float()
        return mlp.score(feats).cpu().numpy()


# ------------------------------------------------------------------------------------------------------- kind


def plan_sd(cell: Any) -> dict[str, Any]:
    p = cell.params
    if p.get("sampler") == "restart":
        rc = _restart_config(p)
        steps = sd_restart_steps_counted(DiscreteSchedule.scaled_linear(set_alpha_to_one=False), rc["n_main"], rc["intervals"])
    else:
        steps = int(p.get("steps", 0))
    n = int(cell.settings.get("num_samples", 5000))
    ms = 60.0 if cell.scale == "paper" else 5.0  # per guided step per image (SD UNet on a GPU at 512^2 / tiny random SD on a CPU)
    return {"samples": n, "nfe": 2 * steps, "steps": steps, "train_steps": 0, "est_seconds": round(n * steps * ms / 1000, 1)}


@register_kind("restart.sd_fid_clip", plan=plan_sd,
               description="Stable Diffusion v1.5 with DDIM/DDPM/Heun/Restart: FID-5k, CLIP and aesthetic score (smoke: tiny random SD)")
def run_sd_fid_clip(cell: Any, ctx: Any) -> dict[str, float]:
    from repro.metrics.image_metrics import extract, metrics_from_features
    from repro.restart import sd_tiny
    from repro.restart.image_experiments import extractor_options, reference_stats
    from repro.restart.samplers import NoiseSource

    params = cell.params
    backend = cell.settings.get("model_backend", "diffusers")
    if backend != "diffusers":  # the old "tiny-random" SongUNet backend is gone: smoke uses random:tiny-sd
        raise ReproError(f"unknown model_backend {backend!r} (only 'diffusers'; tiny random networks: model_path = 'random:tiny-sd')")
    settings, tiny = sd_tiny.resolve_tiny_settings(cell.settings, ctx)
    if tiny:
        ctx.record_extra("tiny_random", {**tiny, "note": "randomly initialised stand-ins of SD's networks (restart/sd_tiny.py): "
                                                         "tests the code path; the numbers say nothing about Stable Diffusion"})
    num_samples = int(settings.get("num_samples", 5000))
    batch_size = int(settings.get("batch_size", 8))
    extractor = settings.get("extractor", "inception-fid-helper")
    sampler = params["sampler"]
    guidance = float(params["guidance"])
    seed_base = int(settings.get("seed_offset", 0)) + cell.seed * num_samples
    aesthetic = None

    pipe = load_sd(settings, ctx.device)
    captions = load_captions(settings.get("captions", ""), n=num_samples, subset_size=int(settings.get("caption_subset", 5000)))
    if len(captions) < num_samples:
        raise ReproError(f"{len(captions)} captions for {num_samples} samples")
    schedule = DiscreteSchedule.from_diffusers(pipe.scheduler)
    shape = (int(pipe.unet.config.in_channels), int(pipe.unet.config.sample_size), int(pipe.unet.config.sample_size))
    clip = load_clip(settings, ctx.device)
    if settings.get("aesthetic_weights"):
        aesthetic = load_aesthetic(settings, ctx.device)
    ctx.record_extra("scheduler", {"class": type(pipe.scheduler).__name__, "steps_offset": schedule.steps_offset,
                                   "final_alpha_cumprod": schedule.final_alpha_cumprod, "latent_shape": list(shape)})
    eps_fn = sd_eps_fn(pipe, ctx.device)

    def conditions(idx: np.ndarray):
        texts = [captions[int(i)] for i in idx]
        return sd_encode(pipe, texts, ctx.device), sd_encode(pipe, [""] * len(texts), ctx.device), texts

    def shard(indices: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            noise = NoiseSource([seed_base + int(i) for i in idx], ctx.device)
            x_unit = noise.randn((len(idx), *shape), dtype=torch.float32).to(torch.float64)
            with torch.no_grad():
                cond, uncond, texts = conditions(idx)
                den = CFGDenoiser(eps_fn, schedule, cond, uncond, guidance)
                x, steps, expected = run_sampler(sampler, params, den, schedule, x_unit, noise)
                images = to_uint8_like_diffusers(sd_decode(pipe, x))
            if steps != expected or den.model_evals != 2 * steps:
                raise ReproError(f"{sampler}: took {steps} steps / {den.model_evals} evaluations, expected {expected} / {2 * expected}")
            out.setdefault("pool", []).append(extract(images, extractor, ctx.device, **extractor_options(extractor, ctx))["pool"])
            out.setdefault("steps", []).append(np.full(len(idx), steps))
            out.setdefault("clip", []).append(clip_scores(clip, images, texts, ctx.device))
            if aesthetic is not None:
                out.setdefault("aesthetic", []).append(aesthetic_scores(aesthetic, images, ctx.device))
        return {k: np.concatenate(v) for k, v in out.items()}

    feats = ctx.sharded("features", n_items=num_samples, shard_size=int(settings.get("shard_size", 500)), fn=shard,
                        desc=f"sd {sampler} w={guidance:g}")
    steps = np.unique(feats["steps"]).tolist()
    if len(steps) != 1:
        raise ReproError(f"inconsistent step counts across shards: {steps}")
    ctx.record_work(nfe=2 * int(steps[0]), steps=int(steps[0]), samples=num_samples)
    ctx.record_extra("sampler", {"name": sampler, "guidance": guidance, "steps": int(steps[0]),
                                 "restart_config": _restart_config(params) if sampler == "restart" else None,
                                 "backend": backend})
    if settings.get("ref_stats") == "random:tiny-coco":
        ref = sd_tiny.tiny_reference_stats(extractor, ctx)
    else:
        ref = reference_stats(extractor, settings, ctx)
    metrics = {"fid_5k": metrics_from_features({"pool": feats["pool"]}, ref, metrics=["fid"])["fid"],
               "clip_score": float(np.mean(feats["clip"]))}
    if "aesthetic" in feats:
        metrics["aesthetic"] = float(np.mean(feats["aesthetic"]))
    else:
        ctx.record_extra("aesthetic", "not computed: settings.aesthetic_weights is not set")
    return metrics
