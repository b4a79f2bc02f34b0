"""Experiment kind ``restart.image_fid``: FID of a diffusion sampler on an image model, at every scale.

One code path for the Restart paper's image tables (Tables 1-5: CIFAR-10 VP/EDM, ImageNet-64) and their analogs:

* ``paper``: an EDM pickle (``checkpoint`` path), 50,000 samples, the EDM reference ``.npz`` (mu/sigma);
* ``small``: ``checkpoint = "trained:mnist"`` -- a small SongUNet trained here (:mod:`repro.restart.training`),
  FID against MNIST test-set statistics with the project's MNIST classifier (and, optionally, the offline Inception);
* ``smoke``: ``checkpoint = "random:tiny-songunet"`` / ``"random:tiny-dhariwal"`` -- untrained tiny networks of the
  same classes, so CI runs exactly this code on CPU in seconds (the FIDs are meaningless there).

Protocol (EDM / Restart paper App. D.1): image ``i`` of the cell with seed ``s`` uses the noise seed
``seed_offset + s * num_samples + i`` (EDM's per-image ``StackedRandomGenerator`` seeds: 0-49999, 50000-99999,
100000-149999 for s = 0, 1, 2), so ``aggregate = "min"`` over seeds 0-2 is EDM's "min over three seed sets".
Images are quantised exactly like EDM's ``generate.py`` (``x * 127.5 + 128`` clipped to [0, 255], uint8) before the
feature extractor. Generation runs in shards through ``ctx.sharded`` (features only are stored), so a killed run
resumes and torchrun ranks split the shards; per-image seeds make the features independent of batch size and ranks.

Params of a cell (the published-table convention): ``model`` ("vp", "edm", "pfgmpp", "edm_imagenet64", or
"mnist" for the analog), ``sampler`` ("heun", "edm_sde", "vanilla_sde", "restart", "dpm_solver3_restart"), ``nfe``
(checked against the sampler's analytic NFE), optional ``steps``; Restart rows carry ``n_main`` and ``intervals``
(a list of [N_restart, K, t_min, t_max]).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.errors import MissingResource, ReproError
from repro.kinds import register_kind

# Image shape and label count of each dataset (``img_resolution``/``img_channels``/``label_dim`` settings override).
DATASETS: dict[str, dict[str, int]] = {
    "cifar10": dict(img_resolution=32, img_channels=3, label_dim=0),
    "imagenet64": dict(img_resolution=64, img_channels=3, label_dim=1000),
    "mnist": dict(img_resolution=28, img_channels=1, label_dim=0),
    "fashion": dict(img_resolution=28, img_channels=1, label_dim=0),
}

# Short names used in metric keys for the non-primary extractors (fid_<alias>, is_<alias>).
EXTRACTOR_ALIASES = {
    "inception-fid-helper": "inception",
    "inception-torch-fidelity": "inception_tf",
    "mnist-classifier": "mnist",
    "fashion-mnist-classifier": "fashion",
}

SAMPLER_NAMES = ("heun", "edm_sde", "vanilla_sde", "restart", "dpm_solver3_restart")

# EDM's stochastic sampler settings (restart.md §2): CIFAR-10 VP from EDM Table 5 (via third-party code),
# ImageNet-64 from EDM's README/example.py. The spec can override every key.
EDM_SDE_DEFAULTS = {
    "cifar10": dict(S_churn=30.0, S_min=0.01, S_max=1.0, S_noise=1.007),
    "imagenet64": dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),
}

# Rough cost of one network evaluation per image, in milliseconds, for `repro plan` (not measured precisely):
# paper-scale figures assume one modern datacenter GPU; small/smoke figures were measured on a loaded 2-core CPU.
MS_PER_IMAGE_NFE = {
    "vp": 0.5, "edm": 0.5, "pfgmpp": 0.5, "edm_imagenet64": 3.0,  # GPU, DDPM++ 56M / ADM 296M params
    "trained": 1.5, "random:tiny-songunet": 3.0, "random:tiny-dhariwal": 4.0,  # CPU
}
MS_PER_IMAGE_FEATURES = {"gpu-inception": 1.0, "cpu-inception": 80.0, "classifier": 0.2}


# ------------------------------------------------------------------------------------------------ sampler plan


@dataclass
class SamplerPlan:
    """Everything needed to run one sampler configuration, with its analytic NFE."""

    name: str  # the cell's sampler name
    fn: Callable[..., torch.Tensor]
    sigmas: torch.Tensor  # float64, decreasing, trailing 0
    kwargs: dict[str, Any]
    n_steps: int
    expected_nfe: int
    description: dict[str, Any] = field(default_factory=dict)


def _int_param(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReproError(f"param '{key}' must be an integer, got {value!r}")
    return value


def _steps_from_nfe(sampler: str, nfe: int) -> int:
    """Grid points for a second-order sampler (NFE = 2n - 1) or a first-order one (NFE = n)."""
    if sampler in ("heun", "edm_sde"):
        if nfe % 2 == 0:
            raise ReproError(f"{sampler}: NFE must be odd (2 * steps - 1, the last step to 0 is Euler), got {nfe}")
        return (nfe + 1) // 2
    return nfe


def edm_sde_settings(settings: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    base = dict(EDM_SDE_DEFAULTS.get(settings.get("dataset", ""), EDM_SDE_DEFAULTS["cifar10"]))
    base.update(settings.get("edm_sde", {}))
    base.update({k: params[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in params})
    return {k: float(v) for k, v in base.items()}


def restart_settings(settings: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """Restart noise settings. ``restart_gamma`` is 0 (pure ODE inside Restart, paper §4.1) unless the spec sets it;
    the official script's hidden default is 0.05 (restart.md §2)."""
    out = dict(
        restart_gamma=float(settings.get("restart_gamma", 0.0)),
        restart_S_noise=float(settings.get("restart_S_noise", 1.0)),
        restart_S_min=float(settings.get("restart_S_min", 0.01)),
        restart_S_max=float(settings.get("restart_S_max", 1.0)),
    )
    out.update({k: float(params[k]) for k in out if k in params})
    return out


def resolve_sampler(params: dict[str, Any], settings: dict[str, Any]) -> SamplerPlan:
    """Turn a cell's params into a sampler call and its analytic NFE; raise if the spec's ``nfe`` disagrees."""
    from repro.restart import samplers as S

    name = params.get("sampler")
    if name not in SAMPLER_NAMES:
        raise ReproError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES}")
    nfe = _int_param(params, "nfe")
    steps = _int_param(params, "steps")
    sigma_min = float(settings.get("sigma_min", 0.002))
    sigma_max = float(settings.get("sigma_max", 80.0))
    rho = float(settings.get("rho", 7.0))
    kwargs: dict[str, Any] = {}
    nfe_config: dict[str, Any] = {}
    desc: dict[str, Any] = {}
    # PFGM++ (model "pfgmpp", D = 2048 for the released CIFAR-10 model): prior and Restart jump use the PFGM++
    # kernel; its ODE is EDM's in sigma = r / sqrt(D), so the Heun steps are unchanged.
    pfgmpp_D = None
    if params.get("model") == "pfgmpp":
        pfgmpp_D = params.get("pfgmpp_D", settings.get("pfgmpp_D", 2048))
        if isinstance(pfgmpp_D, bool) or not isinstance(pfgmpp_D, int) or pfgmpp_D < 1:
            raise ReproError(f"pfgmpp_D (PFGM++ augmented dimensions) must be a positive integer, got {pfgmpp_D!r}")
        if name not in ("heun", "restart", "dpm_solver3_restart"):
            raise ReproError(f"{name} is not implemented for PFGM++ (its per-step noise would need the PFGM++ kernel); "
                             "PFGM++ cells support heun, restart and dpm_solver3_restart")

    if name in ("restart", "dpm_solver3_restart"):
        n_steps = _int_param(params, "n_main")
        if n_steps is None:
            raise ReproError(f"{name} cells need 'n_main' (main-grid points) and 'intervals'")
        intervals = S.parse_restart_config(params.get("intervals"))
        rs = restart_settings(settings, params)
        kwargs = dict(
            restart=[iv.as_list() for iv in intervals],
            restart_gamma=rs["restart_gamma"],
            s_min=rs["restart_S_min"],
            s_max=rs["restart_S_max"],
            s_noise=rs["restart_S_noise"],
            rho=rho,
        )
        nfe_config = dict(restart=kwargs["restart"])
        if name == "dpm_solver3_restart":
            kwargs["inner_solver"] = nfe_config["inner_solver"] = "dpm_solver3"
            # The official generate_dpm_solver.py overrides EDM's sigma range with the VP one (restart.md §2).
            sigma_min, sigma_max = float(settings.get("dpm_sigma_min", S.VP_SIGMA_MIN)), float(settings.get("dpm_sigma_max", S.VP_SIGMA_MAX))
        if pfgmpp_D is not None:
            kwargs["pfgmpp_D"] = pfgmpp_D
        fn = S.sample_restart
        desc = dict(rs, intervals=kwargs["restart"], n_main=n_steps)
        sampler_key = "restart"
    else:
        if steps is None:
            if nfe is None:
                raise ReproError(f"{name} cells need 'nfe' or 'steps'")
            steps = _steps_from_nfe(name, nfe)
        n_steps = steps
        sampler_key = name
        fn = S.SAMPLERS[name]
        if name == "edm_sde":
            sde = edm_sde_settings(settings, params)
            kwargs = dict(s_churn=sde["S_churn"], s_tmin=sde["S_min"], s_tmax=sde["S_max"], s_noise=sde["S_noise"])
            desc = sde
        elif name == "vanilla_sde":
            kwargs = dict(s_noise=float(params.get("S_noise", settings.get("vanilla_S_noise", 1.0))))

    expected = S.sampler_nfe(sampler_key, n_steps, **nfe_config)
    if nfe is not None and nfe != expected:
        raise ReproError(f"{name}: the spec says nfe={nfe} but this configuration costs {expected} network evaluations "
                         f"(n_steps={n_steps}{', intervals=' + str(nfe_config.get('restart')) if 'restart' in nfe_config else ''})")
    sigmas = S.edm_sigmas(n_steps, sigma_min, sigma_max, rho, dtype=torch.float64)
    desc.update(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, n_steps=n_steps)
    if pfgmpp_D is not None:
        desc["pfgmpp_D"] = pfgmpp_D  # generate_images reads it: x_T from the PFGM++ prior
    return SamplerPlan(name, fn, sigmas, kwargs, n_steps, expected, desc)


# ---------------------------------------------------------------------------------------------------- models


def checkpoint_spec(params: dict[str, Any], settings: dict[str, Any]) -> str:
    """The cell's checkpoint: ``settings.checkpoints[model]`` when given, else ``settings.checkpoint``."""
    per_model = settings.get("checkpoints") or {}
    spec = per_model.get(params.get("model")) if isinstance(per_model, dict) else None
    spec = spec or settings.get("checkpoint")
    if not spec:
        raise ReproError(f"no checkpoint for model {params.get('model')!r}: set settings.checkpoint or settings.checkpoints")
    return str(spec)


def image_shape(settings: dict[str, Any]) -> dict[str, int]:
    shape = dict(DATASETS.get(settings.get("dataset", ""), {}))
    shape.update({k: int(settings[k]) for k in ("img_resolution", "img_channels", "label_dim") if k in settings})
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in shape]
    if missing:
        raise ReproError(f"unknown dataset {settings.get('dataset')!r}: set {missing} in settings")
    return shape


def build_random_network(which: str, params: dict[str, Any], settings: dict[str, Any]) -> torch.nn.Module:
    """An untrained tiny network of the paper's classes (smoke tests): VPPrecond for model "vp", else EDMPrecond."""
    from repro.restart import networks as N

    model_type = {"tiny-songunet": "SongUNet", "tiny-dhariwal": "DhariwalUNet"}.get(which)
    if model_type is None:
        raise ReproError(f"unknown random network 'random:{which}' (use random:tiny-songunet or random:tiny-dhariwal)")
    precond = "VPPrecond" if params.get("model") == "vp" else "EDMPrecond"
    shape = image_shape(settings)
    kwargs = N.tiny_precond_kwargs(precond, model_type, img_resolution=shape["img_resolution"],
                                   img_channels=shape["img_channels"], label_dim=shape["label_dim"])
    torch.manual_seed(int(settings.get("init_seed", 0)))
    net = N.build_network(precond, kwargs)
    # EDM zero-initialises the output layers (init_weight=1e-5), so an untrained net outputs ~0 and every sampler
    # would only rescale the latents; give those layers ordinary random weights so smoke runs exercise the network.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and float(p.abs().max()) < 1e-3:
                p.normal_(0.0, 0.05)
    return net


def resolve_checkpoint_path(spec: str) -> Path:
    path = Path(os.path.expandvars(os.path.expanduser(spec)))
    if not path.is_absolute() and os.environ.get("REPRO_DATA_DIR"):
        path = Path(os.environ["REPRO_DATA_DIR"]) / path
    return path


def load_model(params: dict[str, Any], settings: dict[str, Any], ctx: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cell's network (eval mode, on ctx.device) and a description recorded in the result."""
    spec = checkpoint_spec(params, settings)
    if spec.startswith("random:"):
        net = build_random_network(spec.split(":", 1)[1], params, settings)
        info = {"checkpoint": spec, "note": "untrained random network (smoke test of the code path)"}
    elif spec.startswith("trained:"):
        from repro.restart.training import load_trained_network, trained_checkpoint

        path = trained_checkpoint(spec.split(":", 1)[1], ctx, overrides=settings.get("train_overrides"))
        net, meta = load_trained_network(path)
        ctx.record_file("checkpoint", path)
        info = {"checkpoint": spec, "path": str(path), "train_config": meta.get("train_config"),
                "final_train_loss": meta.get("last_loss")}
    else:
        from repro.restart.edm_pickle import load_edm_pickle

        path = resolve_checkpoint_path(spec)
        if not path.is_file():
            url = (settings.get("checkpoint_urls") or {}).get(params.get("model"), settings.get("checkpoint_url", ""))
            raise MissingResource(f"checkpoint not found: {path}" + (f"; download it from {url}" if url else "")
                                  + " (relative paths are resolved against $REPRO_DATA_DIR)")
        net, meta = load_edm_pickle(path)
        ctx.record_file("checkpoint", path)
        info = {"checkpoint": spec, "path": str(path), "pickle": meta}
    net = net.to(ctx.device).eval().requires_grad_(False)
    info["class"] = type(net).__name__
    info["parameters"] = int(sum(p.numel() for p in net.parameters()))
    return net, info


# ------------------------------------------------------------------------------------------------ generation


def image_seeds(cell_seed: int, num_samples: int, seed_offset: int, indices: np.ndarray) -> list[int]:
    """EDM's per-image seeds: seed set ``cell_seed`` covers [offset + s*N, offset + (s+1)*N)."""
    return [int(seed_offset + cell_seed * num_samples + i) for i in indices]


def to_uint8_like_edm(x: torch.Tensor) -> torch.Tensor:
    """EDM generate.py: ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (truncation, not rounding)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def generate_images(net: torch.nn.Module, plan: SamplerPlan, seeds: list[int], device: torch.device | str,
                    label_dim: int = 0) -> tuple[torch.Tensor, int]:
    """uint8 images [N, C, H, W] for ``seeds`` (one image per seed) and the NFE counted on this batch.

    Latents and class labels are drawn like EDM's generate.py with StackedRandomGenerator: per seed, first
    ``randn([C, H, W])``, then ``randint(label_dim)``; the sampler then draws its noise from the same generators.
    PFGM++ plans (``description["pfgmpp_D"]``) start from the PFGM++ prior at sigmas[0] instead: per seed that same
    ``randn([C, H, W])``, then ``randn(D)`` (:func:`repro.restart.samplers.pfgmpp_prior`).
    """
    from repro.restart.samplers import CountingDenoiser, NoiseSource, pfgmpp_prior

    shape = (len(seeds), net.img_channels, net.img_resolution, net.img_resolution)
    noise = NoiseSource(seeds, device)
    pfgmpp_D = plan.description.get("pfgmpp_D")
    if pfgmpp_D is None:
        latents = noise.randn(shape, dtype=torch.float32)
    else:
        if getattr(net, "D", pfgmpp_D) != pfgmpp_D:  # the official script asserts net.D == aug_dim too
            raise ReproError(f"the network was trained with PFGM++ D={net.D}, the spec says pfgmpp_D={pfgmpp_D}")
        latents = pfgmpp_prior(noise, shape, float(plan.sigmas[0]), pfgmpp_D)  # float64, already at sigmas[0]
    class_labels = None
    if label_dim:
        idx = torch.stack([torch.randint(label_dim, size=(), generator=g, device=noise.device) for g in noise.generators])
        class_labels = torch.eye(label_dim, device=noise.device)[idx]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, sigma, class_labels).to(torch.float64)

    counter = CountingDenoiser(denoise)
    sigmas = plan.sigmas.to(device)
    x = latents.to(torch.float64) * sigmas[0] if pfgmpp_D is None else latents
    with torch.no_grad():
        x = plan.fn(counter, x, sigmas, noise=noise, class_labels=class_labels, **plan.kwargs)
    return to_uint8_like_edm(x), counter.nfe


# ------------------------------------------------------------------------------------------- reference stats


def extractor_options(extractor: str, ctx: Any) -> dict[str, Any]:
    if extractor in ("mnist-classifier", "fashion-mnist-classifier"):
        return {"cache_dir": str(ctx.cache_dir)}
    return {}


def dataset_reference_stats(source: str, extractor: str, settings: dict[str, Any], ctx: Any):
    """``dataset:<mnist|fashion>-<train|test>``: statistics of real images through ``extractor``, cached."""
    from repro.data.mnist import load_mnist
    from repro.metrics.refstats import RefStats, load_reference_stats

    name = source.split(":", 1)[1]
    variant, _, split = name.rpartition("-")
    if variant not in ("mnist", "fashion") or split not in ("train", "test"):
        raise ReproError(f"unknown reference dataset '{source}' (use dataset:mnist-test, dataset:fashion-train, ...)")
    limit = per_extractor(settings.get("ref_limit"), extractor)
    from repro.metrics.image_metrics import extractor_provenance, pool_features_from_images

    # The extractor's provenance (weights hash / classifier config) is part of the key: new weights, new stats.
    # format 2 also keeps the reference features (features.npy), which KID needs.
    key = {"source": source, "extractor": extractor, "limit": limit, "format": 2,
           "extractor_provenance": extractor_provenance(extractor, ctx.device, **extractor_options(extractor, ctx))}

    def build(folder: Path) -> None:
        images, _ = load_mnist(split, variant=variant)
        if limit:
            images = images[: int(limit)]
        feats = pool_features_from_images(images, extractor, ctx.device, progress=ctx.rank == 0, **extractor_options(extractor, ctx))
        np.save(folder / "features.npy", feats.astype(np.float32))
        RefStats.from_features(feats, source=f"{source} (n={len(images)})", extractor=extractor).save(folder / "stats.npz")

    folder = ctx.cached_artifact("restart-refstats", key, build)
    stats = load_reference_stats(folder / "stats.npz")
    stats.features_path = folder / "features.npy"
    return stats


def reference_stats(extractor: str, settings: dict[str, Any], ctx: Any):
    from repro.metrics.refstats import load_reference_stats

    ref = settings.get("ref_stats")
    if isinstance(ref, dict):
        ref = ref.get(extractor)
    if not ref:
        raise ReproError(f"no ref_stats for extractor '{extractor}' (settings.ref_stats = path, dataset:..., or a dict per extractor)")
    ref = str(ref)
    if ref.startswith("dataset:"):
        return dataset_reference_stats(ref, extractor, settings, ctx)
    path = resolve_checkpoint_path(ref)
    stats = load_reference_stats(path)
    ctx.record_file(f"ref_stats[{extractor}]", path)
    return stats


# ------------------------------------------------------------------------------------------------------ kind


def per_extractor(value: Any, extractor: str) -> Any:
    """A setting given either once for all extractors or as ``{extractor: value}`` (absent extractors: None)."""
    return value.get(extractor) if isinstance(value, dict) else value


def feature_limit(settings: dict[str, Any], extractor: str, num_samples: int) -> int:
    """How many of a cell's images (the first ones, by index) go through ``extractor``.

    ``settings.feature_limits = {extractor: n}`` lets a slow extractor (Inception on CPU: ~0.07 s/image) see only the
    first n images of every seed set, while the fast ones see all of them."""
    limit = per_extractor(settings.get("feature_limits"), extractor)
    if limit is None:
        return num_samples
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ReproError(f"feature_limits[{extractor!r}] must be a positive integer, got {limit!r}")
    return min(int(limit), num_samples)


def _extractors(settings: dict[str, Any]) -> list[str]:
    value = settings.get("extractors", settings.get("extractor", "inception-fid-helper"))
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ReproError("settings.extractors is empty")
    return names


def _feature_key(extractor: str, output: str) -> str:
    return f"{extractor.replace('-', '_')}__{output}"


def _metric_names(extractor: str, primary: bool) -> dict[str, str]:
    """Result keys of an extractor's metrics: ``fid``/``is``/``kid`` for the first, ``fid_<alias>`` ... otherwise."""
    if primary:
        return {"fid": "fid", "is": "is", "kid": "kid"}
    alias = EXTRACTOR_ALIASES.get(extractor, extractor.replace("-", "_"))
    return {m: f"{m}_{alias}" for m in ("fid", "is", "kid")}


def plan_image_fid(cell: Any) -> dict[str, Any]:
    """Samples, NFE (analytic) and a rough time estimate, without running anything."""
    settings, params = cell.settings, cell.params
    n = int(settings.get("num_samples", 50000))
    sampler_nfe = resolve_sampler(params, settings).expected_nfe
    spec = checkpoint_spec(params, settings) if (settings.get("checkpoint") or settings.get("checkpoints")) else ""
    if spec.startswith("random:"):
        ms = MS_PER_IMAGE_NFE.get(spec, 3.0)
    elif spec.startswith("trained:"):
        ms = MS_PER_IMAGE_NFE["trained"]
    else:
        ms = MS_PER_IMAGE_NFE.get(str(params.get("model")), 1.0)
    ms = float(settings.get("est_ms_per_image_nfe", ms))
    feat_ms = 0.0
    for ex in _extractors(settings):
        share = feature_limit(settings, ex, n) / n
        if "inception" in ex:
            feat_ms += share * MS_PER_IMAGE_FEATURES["gpu-inception" if cell.scale == "paper" else "cpu-inception"]
        else:
            feat_ms += share * MS_PER_IMAGE_FEATURES["classifier"]
    est = n * (sampler_nfe * ms + feat_ms) / 1000.0
    return {"samples": n, "nfe": sampler_nfe, "train_steps": 0, "est_seconds": round(est, 1)}


@register_kind("restart.image_fid", plan=plan_image_fid,
               description="FID (+IS with a classifier) of a diffusion sampler on an EDM-style image model")
def run_image_fid(cell: Any, ctx: Any) -> dict[str, float]:
    """Generate ``num_samples`` images with per-image seeds, extract features in shards, compute FID/IS."""
    from repro.metrics.image_metrics import extract, metrics_from_features, metrics_provenance

    params, settings = cell.params, cell.settings
    plan = resolve_sampler(params, settings)
    num_samples = int(settings.get("num_samples", 50000))
    batch_size = int(settings.get("batch_size", 64))
    shard_size = int(settings.get("shard_size", max(batch_size, min(1000, num_samples))))
    seed_offset = int(settings.get("seed_offset", 0))
    extractors = _extractors(settings)
    backend = str(settings.get("backend", "repro"))

    net, model_info = load_model(params, settings, ctx)
    label_dim = int(getattr(net, "label_dim", 0))
    shape = image_shape(settings) if settings.get("dataset") in DATASETS or "img_resolution" in settings else None
    if shape and (net.img_resolution != shape["img_resolution"] or net.img_channels != shape["img_channels"]):
        raise ReproError(f"checkpoint makes {net.img_channels}x{net.img_resolution}^2 images but the dataset is "
                         f"{shape['img_channels']}x{shape['img_resolution']}^2")
    ctx.record_extra("model", model_info)
    ctx.record_extra("sampler", {"name": plan.name, **plan.description, "kwargs": {k: v for k, v in plan.kwargs.items()}})
    if plan.name in ("restart", "dpm_solver3_restart"):
        # The report must say which Restart noise settings were used (the official script hides restart_gamma=0.05).
        ctx.record_extra("restart_gamma", plan.kwargs["restart_gamma"])
        ctx.record_extra("restart_S_noise", plan.kwargs["s_noise"])
    ctx.record_extra("protocol", {"num_samples": num_samples, "seed_range": [seed_offset + cell.seed * num_samples,
                                  seed_offset + (cell.seed + 1) * num_samples - 1], "batch_size": batch_size,
                                  "quantisation": "EDM: (x*127.5+128).clip(0,255).to(uint8)"})
    opts = {ex: extractor_options(ex, ctx) for ex in extractors}
    limits = {ex: feature_limit(settings, ex, num_samples) for ex in extractors}
    kid_extractors = settings.get("kid", [])
    kid_extractors = [kid_extractors] if isinstance(kid_extractors, str) else list(kid_extractors)
    unknown = [ex for ex in kid_extractors if ex not in extractors]
    if unknown:
        raise ReproError(f"settings.kid names {unknown}, which are not in settings.extractors {extractors}")
    # One feature row of a blank image per limited extractor: the shape and dtype of its NaN rows.
    blank = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution, dtype=torch.uint8)
    feature_shapes = {ex: {k: np.asarray(v)[0] for k, v in extract(blank, ex, ctx.device, **opts[ex]).items()}
                      for ex in extractors if limits[ex] < num_samples}
    timing = {"generate_s": 0.0, "features_s": 0.0}

    def shard(indices: np.ndarray) -> dict[str, np.ndarray]:
        outputs: dict[str, list[np.ndarray]] = {}
        nfe_rows: list[np.ndarray] = []
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            t0 = time.time()
            images, nfe = generate_images(net, plan, image_seeds(cell.seed, num_samples, seed_offset, idx), ctx.device, label_dim)
            t1 = time.time()
            if nfe != plan.expected_nfe:
                raise ReproError(f"{plan.name}: counted {nfe} network evaluations per image, expected {plan.expected_nfe}")
            nfe_rows.append(np.full(len(idx), nfe, dtype=np.int64))
            for ex in extractors:
                # Rows past the extractor's limit are stored as NaN so every shard array keeps one row per image.
                keep = idx < limits[ex]
                if keep.all():
                    values = extract(images, ex, ctx.device, **opts[ex])
                else:
                    values = {k: np.full((len(idx),) + v.shape, np.nan, dtype=v.dtype) for k, v in feature_shapes[ex].items()}
                    if keep.any():
                        for k, v in extract(images[torch.from_numpy(keep)], ex, ctx.device, **opts[ex]).items():
                            values[k][keep] = v
                for key, value in values.items():
                    outputs.setdefault(_feature_key(ex, key), []).append(value)
            timing["generate_s"] += t1 - t0
            timing["features_s"] += time.time() - t1
        out = {k: np.concatenate(v) for k, v in outputs.items()}
        out["nfe"] = np.concatenate(nfe_rows)
        return out

    feats = ctx.sharded("features", n_items=num_samples, shard_size=shard_size, fn=shard,
                        desc=f"{plan.name} nfe={plan.expected_nfe}")
    counted = np.unique(feats["nfe"])
    if counted.tolist() != [plan.expected_nfe]:
        raise ReproError(f"{plan.name}: counted NFE per image {counted.tolist()}, expected {plan.expected_nfe}")
    ctx.record_work(nfe=int(plan.expected_nfe), samples=num_samples)
    ctx.record_extra("nfe_counted", int(counted[0]))
    ctx.record_extra("timing_this_session", {k: round(v, 2) for k, v in timing.items()})

    metrics: dict[str, float] = {}
    metric_sources: dict[str, Any] = {}
    for j, ex in enumerate(extractors):
        names = _metric_names(ex, primary=(j == 0))
        ref = reference_stats(ex, settings, ctx)
        n_used = limits[ex]
        ex_feats = {"pool": feats[_feature_key(ex, "pool")][:n_used]}
        if np.isnan(ex_feats["pool"]).any():
            raise ReproError(f"features of {ex} are missing for some of the first {n_used} images (stale shards?)")
        wanted = ["fid"]
        if _feature_key(ex, "logits") in feats and settings.get("inception_score", True):
            ex_feats["logits"] = feats[_feature_key(ex, "logits")][:n_used]
            wanted.append("is")
        values = metrics_from_features(ex_feats, ref, metrics=wanted, backend=backend)
        if ex in kid_extractors:
            # KID is unbiased in the sample count, so it stays meaningful when a limit leaves few images.
            ref_path = ref.features_path
            if ref_path is None or not Path(ref_path).is_file():
                raise ReproError(f"KID for {ex} needs reference features: use a dataset:... reference (ref_stats)")
            kid = metrics_from_features({"pool": ex_feats["pool"]}, {"pool": np.load(ref_path)}, metrics=["kid"], backend=backend)
            metrics[names["kid"]] = kid["kid"]
            metrics[names["kid"] + "_std"] = kid["kid_std"]
        metrics[names["fid"]] = values["fid"]
        if "is" in values:
            metrics[names["is"]] = values["is"]
        metric_sources[names["fid"]] = dict(metrics_provenance(ex, backend, ref, device=ctx.device, **opts[ex]),
                                            num_samples=n_used)
    ctx.record_extra("metrics_provenance", metric_sources)
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise ReproError(f"metric {name} is not finite ({value})")
    return metrics
