"""Experiment kind ``restart.toy_w1``: one toy sampler setting, one run, three W1 errors (paper §5.1, App. C.5).

Cell params: ``sampler`` (ode | sde | improved_sde | restart) and its knobs (``steps``, ``beta``, ``s_churn``,
``n_restart``, ``k``); an optional ``nfe`` param is a label used to group cells at matched NFE and must equal the
sampler's interval NFE. Settings: data (``data_seed``, ``num_points``), training (``train_steps``, ``batch_size``,
``lr``, ``model_seed``, ``width``, ``layers``) and sampling (``outer_steps_high``, ``outer_steps_low``, ``solver``,
``t_min``, ``t_max``, ``sigma_max``, ``sigma_min``); ``denoiser = "exact"`` swaps the network for the closed-form
posterior mean of the population mixture (a diagnostic without approximation error; not the paper's set-up). See ``repro.restart.toy`` for what is reconstructed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from repro.claims import CHECKS, register_check
from repro.kinds import register_kind
from repro.restart.toy import (
    PARETO_KEYS,
    EDMPrecondMLP,
    ToySettings,
    dsm_loss,
    exact_denoiser,
    interval_nfe,
    make_toy_data,
    pareto_dominates,
    resolve_params,
    toy_errors,
    train_toy_denoiser,
)

# The Pareto-front checker the toy claims use. Registered here (unless the core already registered it) so that a spec
# loaded with the kinds validates; register_check raises on a second, different registration.
if "pareto_dominates" not in CHECKS:
    register_check("pareto_dominates", PARETO_KEYS, description=(pareto_dominates.__doc__ or "").strip().splitlines()[0])(pareto_dominates)

TRAIN_DEFAULTS: dict[str, Any] = {
    "data_seed": 0,
    "num_points": 2000,
    "train_steps": 20000,
    "batch_size": 256,
    "lr": 1e-3,
    "model_seed": 0,
    "width": 64,
    "layers": 4,
}


def _train_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: type(v)(settings.get(k, v)) for k, v in TRAIN_DEFAULTS.items()}


def _check_nfe_label(params: Mapping[str, Any], solver: str) -> int:
    return interval_nfe(resolve_params(params, solver), solver)


def plan_toy(cell: Any) -> dict[str, Any]:
    s = ToySettings.from_mapping(cell.settings)
    nfe = _check_nfe_label(cell.params, s.solver)
    outer = s.outer_steps_high + s.outer_steps_low + 1
    # Measured on one CPU core: ~1.5 ms per network call on 2000 points, ~1 s per 2000×2000 matching.
    return {"samples": 2 * s.num_samples, "nfe": nfe, "train_steps": 0, "est_seconds": 3.0 + 0.0015 * (2 * nfe + outer)}


def load_or_train_model(settings: Mapping[str, Any], ctx: Any) -> tuple[EDMPrecondMLP, dict[str, Any]]:
    """The toy MLP for these settings, trained once and cached under ctx.cache_dir."""
    train = _train_settings(settings)
    data = make_toy_data(train["data_seed"], train["num_points"])
    info: dict[str, Any] = {}

    def build(folder: Path) -> None:
        start = time.time()
        net = train_toy_denoiser(
            data.points,
            steps=train["train_steps"],
            batch_size=train["batch_size"],
            lr=train["lr"],
            seed=train["model_seed"],
            width=train["width"],
            layers=train["layers"],
            progress=lambda it: ctx.progress(it, total=train["train_steps"], desc="train toy MLP"),
        )
        torch.save(
            {"state_dict": net.state_dict(), "sigma_data": net.sigma_data, "train_seconds": time.time() - start}, folder / "toy_mlp.pt"
        )

    folder = ctx.cached_artifact("restart_toy_mlp", {"version": 1, **train}, build)
    saved = torch.load(Path(folder) / "toy_mlp.pt", weights_only=True)
    net = EDMPrecondMLP(data.points.shape[1], train["width"], train["layers"], float(saved["sigma_data"]))
    net.load_state_dict(saved["state_dict"])
    net.eval()
    info["train_seconds"] = float(saved["train_seconds"])
    return net, info


@register_kind("restart.toy_w1", plan=plan_toy, description="Restart toy (§5.1): total/contracted/additional W1 of one sampler setting")
def run_toy(cell: Any, ctx: Any) -> dict[str, float]:
    settings = ToySettings.from_mapping(cell.settings)
    _check_nfe_label(cell.params, settings.solver)
    train = _train_settings(cell.settings)
    data = make_toy_data(train["data_seed"], train["num_points"])
    if settings.num_samples != data.points.shape[0]:
        raise ValueError("num_samples must equal num_points: W1 by matching compares equal-size sets")
    which = str(cell.settings.get("denoiser", "mlp"))
    if which == "mlp":
        net, info = load_or_train_model(cell.settings, ctx)
    elif which == "exact":  # diagnostic: the closed-form posterior mean of the population mixture (no ε_approx)
        net, info = exact_denoiser(data), {"denoiser": "exact"}
    else:
        raise ValueError(f"setting denoiser='{which}': expected 'mlp' (the trained network) or 'exact'")
    metrics = toy_errors(net, data, cell.params, cell.seed, settings)
    ctx.record_work(nfe=int(metrics["nfe_total"]), samples=2 * settings.num_samples, train_steps=0)
    ctx.record_extra("model", {**info, "dsm_loss": dsm_loss(net, data.points)})
    return metrics
