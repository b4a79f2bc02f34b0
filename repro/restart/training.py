"""EDM-preconditioned training of a small SongUNet on MNIST / Fashion-MNIST (the Restart small-scale analog).

This is a *reconstruction at reduced scale* of EDM's training recipe (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models"), written from the paper's description, not copied from NVlabs/edm:

- preconditioning: the project's ``EDMPrecond`` (sigma_data = 0.5) around a reduced ``SongUNet``;
- loss: sigma = exp(N(P_mean, P_std^2)) with P_mean = -1.2, P_std = 1.2, weight (sigma^2 + sigma_data^2) / (sigma *
  sigma_data)^2, squared error of the denoised image;
- Adam (lr 1e-3 after a linear warm-up), EMA of the weights with EDM's half-life rule (half-life in images =
  min(ema_halflife_kimg * 1000, ema_rampup_ratio * images seen)).

What differs from EDM (on purpose, to fit a 2-core CPU): 28x28x1 images (the U-Net runs natively at 28 -> 14 -> 7),
model_channels 16, one block per level, no self-attention (it tripled the CPU cost at 14x14), no
augmentation, no dropout, 800 steps of batch 64 (under one epoch;
the 2-core machine was shared by many jobs). The model is a tool to
make the Restart samplers' *relative* behaviour measurable on CPU; its FIDs are not comparable to any paper number.

Resumable: the full training state (network, EMA, optimizer, RNG, step) is saved every ``checkpoint_every`` steps
next to the final artifact, so a killed run continues where it stopped and reaches the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Training configurations by name; ``checkpoint = "trained:<name>"`` in a spec selects one.
TRAIN_CONFIGS: dict[str, dict[str, Any]] = {
    "mnist": dict(
        dataset="mnist",
        img_resolution=28,
        img_channels=1,
        model_channels=16,
        channel_mult=[1, 2, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        batch_size=64,
        steps=800,
        lr=1e-3,
        lr_warmup_steps=100,
        ema_halflife_kimg=500.0,
        ema_rampup_ratio=0.05,
        P_mean=-1.2,
        P_std=1.2,
        sigma_data=0.5,
        seed=0,
        checkpoint_every=100,
    ),
}
TRAIN_CONFIGS["fashion"] = dict(TRAIN_CONFIGS["mnist"], dataset="fashion")
# Class-conditional Fashion-MNIST: the small analog of the class-conditional ImageNet-64 model (Tables 4-5). Labels
# enter through SongUNet's label embedding as in EDM's conditional models; no label dropout (no guidance is used).
# ``label_dim`` is only present in conditional configs so that the unconditional configs' cache keys are unchanged.
TRAIN_CONFIGS["fashion-cond"] = dict(TRAIN_CONFIGS["mnist"], dataset="fashion", label_dim=10)

# Bump when the training code changes in a way that changes the weights (part of the cache key).
TRAINING_CODE_VERSION = 1


def network_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of ``EDMPrecond`` (EDM's names) for a training config."""
    return dict(
        img_resolution=config["img_resolution"],
        img_channels=config["img_channels"],
        label_dim=int(config.get("label_dim", 0)),
        sigma_data=config["sigma_data"],
        model_type="SongUNet",
        model_channels=config["model_channels"],
        channel_mult=list(config["channel_mult"]),
        num_blocks=config["num_blocks"],
        attn_resolutions=list(config["attn_resolutions"]),
        dropout=config["dropout"],
    )


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    from repro.restart.networks import EDMPrecond

    return EDMPrecond(**network_kwargs(config))


def config_key(config: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the trained weights (used as the cache key)."""
    return {"config": config, "code_version": TRAINING_CODE_VERSION}


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config_key(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_training_data(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images as float32 in [-1, 1], shape [N, 1, 28, 28], and their int64 class labels [N]."""
    from repro.data.mnist import load_mnist

    images, labels = load_mnist("train", variant=config["dataset"])
    images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:
        images = images[:, None]
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    return images.float().contiguous(), torch.as_tensor(np.asarray(labels)).long()



def edm_loss(net: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, config: dict[str, Any],
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's denoising loss with log-normal sigma (mean over the batch); ``class_labels`` one-hot [N, label_dim]."""
    batch = images.shape[0]
    rnd_normal = torch.randn([batch, 1, 1, 1], generator=generator, device=images.device)
    sigma = (rnd_normal * config["P_std"] + config["P_mean"]).exp()
    sigma_data = config["sigma_data"]
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    denoised = net(images + noise, sigma.flatten()) if class_labels is None else net(images + noise, sigma.flatten(), class_labels)
    return (weight * (denoised - images) ** 2).mean()


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_model(
    config: dict[str, Any],
    out_path: str | Path,
    *,
    resume_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
    max_steps: int | None = None,
) -> Path:
    """Train to ``config['steps']`` and write the EMA network to ``out_path``.

    ``resume_path`` holds the periodic full training state; if it exists, training continues from it.
    ``max_steps`` stops early (for tests) without writing the final artifact; returns the resume path then.
    """
    out_path = Path(out_path)
    resume_path = Path(resume_path) if resume_path is not None else out_path.with_name(out_path.name + ".resume.pt")
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)

    torch.manual_seed(config["seed"])  # network initialisation
    net = build_network(config).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"], betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator(device=device).manual_seed(config["seed"] + 1)  # noise + minibatch order
    step = 0
    if resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = int(state["step"])

    images, labels = load_training_data(config)
    images = images.to(device)
    label_dim = int(config.get("label_dim", 0))
    one_hot = torch.eye(label_dim, device=device)[labels.to(device)] if label_dim else None
    n_images = images.shape[0]
    batch = config["batch_size"]
    total = config["steps"]
    stop = total if max_steps is None else min(total, step + max_steps)

    steps_iter = range(step, stop)
    if progress is not None:
        steps_iter = progress(steps_iter, total=stop - step, desc=f"train {config['dataset']} (from step {step})")
    start = time.time()
    last_loss = float("nan")
    for step in steps_iter:
        idx = torch.randint(0, n_images, (batch,), generator=generator, device=device)
        loss = edm_loss(net, images[idx], generator, config, None if one_hot is None else one_hot[idx])
        lr = config["lr"] * min(1.0, (step + 1) / max(1, config["lr_warmup_steps"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_loss = float(loss.detach())

        # EMA with EDM's half-life rule, measured in training images.
        seen = (step + 1) * batch
        halflife = min(config["ema_halflife_kimg"] * 1000, seen * config["ema_rampup_ratio"])
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

        done = step + 1
        if done % config["checkpoint_every"] == 0 or done == stop:
            _save_atomic(
                {
                    "net": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "step": done,
                    "last_loss": last_loss,
                },
                resume_path,
            )
    if stop < total:
        return resume_path

    state = torch.load(resume_path, map_location="cpu", weights_only=False) if resume_path.exists() else None
    final = {
        "state_dict": (state["ema"] if state is not None else ema.state_dict()),
        "network_kwargs": network_kwargs(config),
        "train_config": config,
        "code_version": TRAINING_CODE_VERSION,
        "steps": total,
        "last_loss": state["last_loss"] if state is not None else last_loss,
        "train_seconds_last_session": time.time() - start,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(final, out_path)
    return out_path


def load_trained_network(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the EMA network written by :func:`train_model` (plain state_dict, no code execution)."""
    from repro.restart.networks import EDMPrecond

    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    net = EDMPrecond(**blob["network_kwargs"])
    net.load_state_dict(blob["state_dict"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return net.to(device).eval().requires_grad_(False), meta


def resume_state_path(cache_dir: str | Path, name: str, config: dict[str, Any]) -> Path:
    """Where the periodic training state of ``config`` lives (outside the atomically built artifact folder)."""
    return Path(cache_dir) / "restart-training" / f"{name}-{config_hash(config)}.resume.pt"


def trained_checkpoint(name: str, ctx: Any, overrides: dict[str, Any] | None = None) -> Path:
    """Path of the trained model ``name`` (see TRAIN_CONFIGS), training it once through ``ctx.cached_artifact``.

    The resume state lives under ``ctx.cache_dir/restart-training`` keyed by the config hash, so a killed
    training continues in the next run.
    """
    from repro.errors import ReproError

    if name not in TRAIN_CONFIGS:
        raise ReproError(f"unknown trained model '{name}'; known: {sorted(TRAIN_CONFIGS)}")
    config = dict(TRAIN_CONFIGS[name], **(overrides or {}))
    resume = resume_state_path(ctx.cache_dir, name, config)

    def build(folder: Path) -> None:
        train_model(config, Path(folder) / "model.pt", resume_path=resume, device=ctx.device, progress=ctx.progress)

    return Path(ctx.cached_artifact(f"restart-trained-{name}", config_key(config), build)) / "model.pt"


def main(argv: list[str] | None = None) -> None:
    """Train outside the runner: ``python -m repro.restart.training --name mnist --out model.pt``."""
    import argparse

    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mnist", choices=sorted(TRAIN_CONFIGS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-dir", default=None, help="the runner's cache (default: $REPRO_CACHE or .cache/repro)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's step count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = dict(TRAIN_CONFIGS[args.name])
    if args.steps is not None:
        config["steps"] = args.steps
    if args.cache_dir is None:
        from repro.runner import DEFAULT_CACHE_DIR

        args.cache_dir = DEFAULT_CACHE_DIR
    # The resume state is shared with the runner, so a model trained here is picked up by `repro run`.
    resume = resume_state_path(args.cache_dir, args.name, config)
    print(f"config hash {config_hash(config)}; resume state {resume}")
    path = train_model(config, args.out, resume_path=resume, device=args.device,
                       progress=lambda it, total, desc: tqdm(it, total=total, desc=desc, mininterval=10))
    print(path)


if __name__ == "__main__":
    main()
