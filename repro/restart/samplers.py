"""Diffusion samplers for the Restart paper (Xu et al., NeurIPS 2023), in the style of k-diffusion.

Every sampler has the signature ``sample_X(denoiser, x, sigmas, *, ...) -> Tensor`` where

* ``denoiser(x, sigma, class_labels=None)`` returns D(x; sigma), the denoised estimate, with ``sigma`` a tensor
  of shape ``[batch]`` in ``x``'s dtype (the k-diffusion and EDM-network contract: an EDM ``EDMPrecond`` net or a
  k-diffusion ``Denoiser`` both fit);
* ``x`` is the starting point at noise level ``sigmas[0]`` (already scaled, i.e. ``latents * sigmas[0]``);
* ``sigmas`` is a decreasing noise grid, normally ``edm_sigmas(n)`` (n points, then 0 appended);
* noise is drawn **only** through ``noise.randn_like(x)`` (PFGM++ draws: ``noise.randn``): with a :class:`NoiseSource`
  (one generator per sample, EDM ``StackedRandomGenerator`` semantics) the result for a sample does not depend on
  the batch it is in.

The arithmetic is done in ``x``'s dtype; pass float64 latents to follow EDM/the official Restart code, which keep
x in float64 and let the network cast.

Everything here is written from the papers' equations (EDM Alg. 1/2, DPM-Solver Alg. 1/2, Restart Alg. 2 and App. C)
and from reading the official Restart code (Newbeeer/diffusion_restart_sampling @ 8cbcb07); no code is copied.
Deliberate differences from the official Restart script are listed in :func:`sample_restart`.

Decisions worth knowing:

* **Restart + DPM-Solver-3 (Table 3, NFE 27/24/21/18).** As in the official ``benchmarks/generate_dpm_solver.py``:
  the main process *and* every restart backward pass use singlestep DPM-Solver-3 (noise-prediction form); the main
  process ends with one DPM-Solver-2 step and one Euler step to 0; the grid is EDM rho=7 over the VP sigma range
  ``[VP_SIGMA_MIN, VP_SIGMA_MAX] = [0.0105, 152.17]``, so t_min = 0.06 rounds to 0.0105 on those short grids.
  NFE = 3 N_main - 3 + sum 3 K (N_restart - 1). Call ``sample_restart(..., inner_solver="dpm_solver3")`` on
  ``edm_sigmas(n, VP_SIGMA_MIN, VP_SIGMA_MAX)``.
* **Noise draws.** ``sample_edm_sde`` draws one noise tensor at every step, as EDM's ``edm_sampler`` and k-diffusion
  do, so its stream lines up with both; ``sample_restart`` draws only where noise is used (see there).
* **Vanilla SDE** is our reconstruction (the paper does not give its discretisation): see :func:`sample_vanilla_sde`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import trange

__all__ = [
    "edm_sigmas",
    "vp_sigma_range",
    "VP_SIGMA_MIN",
    "VP_SIGMA_MAX",
    "NoiseSource",
    "GlobalNoise",
    "CountingDenoiser",
    "RestartInterval",
    "RestartConfigError",
    "parse_restart_config",
    "restart_nfe",
    "sampler_nfe",
    "sample_euler",
    "sample_heun",
    "sample_edm_sde",
    "sample_vanilla_sde",
    "sample_dpm_solver3",
    "sample_restart",
    "pfgmpp_prior",
    "pfgmpp_perturb",
    "SAMPLERS",
]

Denoiser = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Noise grids


def edm_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's rho-schedule (Karras et al. 2022, Eq. 5): ``n`` points from sigma_max down to sigma_min, then 0.

    Computed in float64 exactly as EDM's ``edm_sampler`` does, then cast to ``dtype``; length ``n + 1``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"edm_sigmas needs n >= 1 grid points, got {n!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"edm_sigmas needs 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        grid = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        idx = torch.arange(n, dtype=torch.float64)
        hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        grid = (hi + idx / (n - 1) * (lo - hi)) ** rho
    return torch.cat([grid, grid.new_zeros(1)]).to(device=device, dtype=dtype)


def vp_sigma_range(beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the VP SDE at t=eps_s and t=1, i.e. ~(0.0105, 152.17).

    The official ``generate_dpm_solver.py`` overrides EDM's [0.002, 80] with this range for its DPM-Solver-3 runs
    (Table 3's "VP w/ DPM-Solver-3" rows), so build those grids with ``edm_sigmas(n, *vp_sigma_range())``.
    """

    def sigma(t: float) -> float:
        return math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1.0)

    return sigma(eps_s), sigma(1.0)


VP_SIGMA_MIN, VP_SIGMA_MAX = vp_sigma_range()


def _as_floats(sigmas: Tensor | Sequence[float]) -> list[float]:
    values = sigmas.tolist() if isinstance(sigmas, Tensor) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("sigmas needs at least two entries (start and end noise level)")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be non-increasing, got {values}")
    if values[-1] < 0:
        raise ValueError("sigmas must be >= 0")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Noise sources


class NoiseSource:
    """Per-sample Gaussian noise: row ``i`` comes from a ``torch.Generator`` seeded with ``seeds[i]``.

    Same semantics as EDM's ``StackedRandomGenerator`` (seed taken modulo 2**32, one ``torch.randn(shape[1:])`` per
    row, stacked), so a sample's noise stream depends only on its own seed, never on the batch it is in.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        if len(seeds) == 0:
            raise ValueError("NoiseSource needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        shape = tuple(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"batch size {shape[0]} does not match the {len(self.generators)} seeds of this NoiseSource")
        device = self.device if device is None else device
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


class GlobalNoise:
    """One generator for the whole batch, replaying exactly what ``torch.randn_like`` gives after
    ``torch.manual_seed(seed)``, without touching the global RNG.

    k-diffusion's samplers draw churn noise from the global RNG; ``torch.manual_seed(seed)`` before calling them and
    ``GlobalNoise(seed)`` here give both samplers the same noise. Results then depend on the batch composition,
    so use it for peer comparisons and large-batch statistics, and :class:`NoiseSource` for reproducible images.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        device = self.device if device is None else device
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=device)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


def _require_noise(noise: Any, sampler: str) -> Any:
    if noise is None or not callable(getattr(noise, "randn_like", None)):
        raise ValueError(f"{sampler} draws noise: pass noise=NoiseSource(seeds) or GlobalNoise(seed)")
    return noise


# ----------------------------------------------------------------------------------------------------------------
# Denoiser helpers


class CountingDenoiser:
    """Wraps ``denoiser(x, sigma, class_labels=None)`` and counts calls: one call on a batch is one NFE.

    With ``record_sigmas=True`` the first sigma of every call is kept in ``.sigmas`` (used by tests to check grids).
    """

    def __init__(self, denoiser: Denoiser, record_sigmas: bool = False):
        self.denoiser = denoiser
        self.nfe = 0
        self.record_sigmas = record_sigmas
        self.sigmas: list[float] = []

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        self.nfe += 1
        if self.record_sigmas:
            self.sigmas.append(float(sigma.reshape(-1)[0]) if isinstance(sigma, Tensor) else float(sigma))
        return self.denoiser(x, sigma, class_labels=class_labels, **kwargs)

    def reset(self) -> None:
        self.nfe = 0
        self.sigmas = []


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, class_labels: Tensor | None) -> Tensor:
    # sigma as a [batch] tensor: the contract shared by EDM networks and k-diffusion models.
    return denoiser(x, x.new_full((x.shape[0],), sigma), class_labels=class_labels)


def _ode_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    class_labels: Tensor | None,
    second_order: bool,
) -> tuple[Tensor, Tensor]:
    """One Euler or Heun step of dx/dsigma = (x - D(x; sigma)) / sigma (EDM Alg. 1).

    A step that ends at sigma = 0 is always Euler, since the slope is undefined there.
    Returns (x_next, first denoised).
    """
    denoised = _denoise(denoiser, x, sigma, class_labels)
    d = (x - denoised) / sigma
    dt = sigma_next - sigma
    x_next = x + dt * d
    if second_order and sigma_next != 0:
        denoised_next = _denoise(denoiser, x_next, sigma_next, class_labels)
        d_next = (x_next - denoised_next) / sigma_next
        x_next = x + dt * 0.5 * (d + d_next)
    return x_next, denoised


def _dpm_solver_step(
    denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, class_labels: Tensor | None, order: int
) -> tuple[Tensor, Tensor]:
    """One singlestep DPM-Solver step (Lu et al. 2022, Alg. 1 (order 2, r1=1/2) / Alg. 2 (order 3, r1=1/3, r2=2/3)),
    **noise-prediction** form, written in EDM variables.

    In EDM's x = x_vp / alpha parameterization the half-log-SNR is lambda = -log(sigma) for any VP schedule, and
    sigma_vp / alpha = sigma, so the update needs only sigmas and eps = (x - D) / sigma. The official
    ``generate_dpm_solver.py`` computes the same quantities through the VP schedule's t <-> lambda maps, which cancel.
    A step to sigma_next = 0 (lambda = inf) is Euler, as in the official code.
    """
    denoised = _denoise(denoiser, x, sigma, class_labels)
    eps0 = (x - denoised) / sigma
    if sigma_next == 0 or order == 1:
        return x + (sigma_next - sigma) * eps0, denoised
    h = math.log(sigma / sigma_next)
    if order == 2:
        r1 = 0.5
        s1 = sigma * math.exp(-r1 * h)
        u1 = x - s1 * math.expm1(r1 * h) * eps0
        eps1 = (u1 - _denoise(denoiser, u1, s1, class_labels)) / s1
        # x_t = x_s - sigma_t (e^h - 1) [(1 - 1/(2 r1)) eps0 + 1/(2 r1) eps1]
        c = sigma_next * math.expm1(h)
        return x - c * ((1 - 0.5 / r1) * eps0 + (0.5 / r1) * eps1), denoised
    if order != 3:
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1 = sigma * math.exp(-r1 * h)
    s2 = sigma * math.exp(-r2 * h)
    u1 = x - s1 * math.expm1(r1 * h) * eps0
    eps1 = (u1 - _denoise(denoiser, u1, s1, class_labels)) / s1
    phi_2_r2 = math.expm1(r2 * h) / (r2 * h) - 1.0
    u2 = x - s2 * math.expm1(r2 * h) * eps0 - (r2 / r1) * s2 * phi_2_r2 * (eps1 - eps0)
    eps2 = (u2 - _denoise(denoiser, u2, s2, class_labels)) / s2
    phi_2 = math.expm1(h) / h - 1.0
    x_next = x - sigma_next * math.expm1(h) * eps0 - (1.0 / r2) * sigma_next * phi_2 * (eps2 - eps0)
    return x_next, denoised


def _dpm_order_for_step(i: int, sig: list[float]) -> int:
    """Order used by the official DPM-Solver-3 schedule: 3 for every step, except 2 for the step just before the
    final step to sigma=0 and 1 (Euler) for that final step."""
    if sig[i + 1] == 0:
        return 1
    if i + 2 == len(sig) - 1 and sig[-1] == 0:
        return 2
    return 3


def _callback(callback: Callable[[dict], None] | None, **info: Any) -> None:
    if callback is not None:
        callback(info)


# ----------------------------------------------------------------------------------------------------------------
# Baseline samplers


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    noise: Any = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """Deterministic Euler on the probability-flow ODE; NFE = len(sigmas) - 1. ``noise`` is accepted and unused."""
    sig = _as_floats(sigmas)
    for i in trange(len(sig) - 1, disable=disable):
        x, denoised = _ode_step(denoiser, x, sig[i], sig[i + 1], class_labels, second_order=False)
        _callback(callback, x=x, i=i, sigma=sig[i], sigma_hat=sig[i], denoised=denoised, phase="main")
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    noise: Any = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """EDM Alg. 1 (deterministic Heun); the last step to 0 is Euler, so NFE = 2n - 1 for n nonzero sigmas."""
    sig = _as_floats(sigmas)
    for i in trange(len(sig) - 1, disable=disable):
        x, denoised = _ode_step(denoiser, x, sig[i], sig[i + 1], class_labels, second_order=True)
        _callback(callback, x=x, i=i, sigma=sig[i], sigma_hat=sig[i], denoised=denoised, phase="main")
    return x


@torch.no_grad()
def sample_edm_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    noise: Any,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    second_order: bool = True,
    class_labels: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """EDM Alg. 2 ("Improved SDE" in the Restart paper): churn then a Heun step (Euler with second_order=False).

    gamma_i = min(s_churn / n, sqrt(2) - 1) when s_tmin <= sigma_i <= s_tmax, else 0; sigma_hat = (1 + gamma) sigma_i;
    x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) * s_noise * eps. Like EDM's ``edm_sampler`` and k-diffusion, one noise
    tensor is drawn at *every* step (also where gamma = 0), so the noise stream lines up with both.
    NFE = 2n - 1 for n nonzero sigmas (n with second_order=False).
    """
    noise = _require_noise(noise, "sample_edm_sde")
    sig = _as_floats(sigmas)
    n = len(sig) - 1
    gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)
    for i in trange(n, disable=disable):
        sigma = sig[i]
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        eps = noise.randn_like(x)
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            x = x + eps * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        x, denoised = _ode_step(denoiser, x, sigma_hat, sig[i + 1], class_labels, second_order)
        _callback(callback, x=x, i=i, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised, phase="main")
    return x


@torch.no_grad()
def sample_vanilla_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    noise: Any,
    s_noise: float = 1.0,
    class_labels: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """Euler-Maruyama on the reverse VE SDE in the sigma parameterization (Song et al. 2021's "reverse diffusion"
    predictor), the Restart paper's "Vanilla SDE" baseline as we reconstruct it:

        x_{i+1} = x_i + (sigma_i^2 - sigma_{i+1}^2) * score(x_i, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) * eps,
        score(x, sigma) = (D(x; sigma) - x) / sigma^2.

    The final step to sigma = 0 adds no noise (it returns the mean, as score_sde's ``denoise=True``).
    NFE = number of steps = len(sigmas) - 1. The paper does not publish its exact vanilla-SDE discretization.
    """
    noise = _require_noise(noise, "sample_vanilla_sde")
    sig = _as_floats(sigmas)
    for i in trange(len(sig) - 1, disable=disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, sigma, class_labels)
        var_step = sigma**2 - sigma_next**2
        x = x + (var_step / sigma**2) * (denoised - x)
        if sigma_next > 0:
            x = x + noise.randn_like(x) * (s_noise * math.sqrt(var_step))
        _callback(callback, x=x, i=i, sigma=sigma, sigma_hat=sigma, denoised=denoised, phase="main")
    return x


@torch.no_grad()
def sample_dpm_solver3(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    noise: Any = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """Singlestep DPM-Solver-3 (Lu et al. 2022), **noise-prediction** form, on the given sigma grid.

    Follows the official Restart ``generate_dpm_solver.py`` schedule: order 3 for every step except order 2 for the
    second-to-last step and Euler for the last step to 0, so NFE = 3n - 3 for n >= 2 nonzero sigmas (1 for n = 1).
    For Table 3's DPM rows use the VP sigma range: ``edm_sigmas(n, VP_SIGMA_MIN, VP_SIGMA_MAX)``.
    ``noise`` is accepted and unused.
    """
    sig = _as_floats(sigmas)
    for i in trange(len(sig) - 1, disable=disable):
        x, denoised = _dpm_solver_step(denoiser, x, sig[i], sig[i + 1], class_labels, _dpm_order_for_step(i, sig))
        _callback(callback, x=x, i=i, sigma=sig[i], sigma_hat=sig[i], denoised=denoised, phase="main")
    return x


# ----------------------------------------------------------------------------------------------------------------
# PFGM++ (Xu et al., ICML 2023): prior and Restart perturbation kernel
#
# PFGM++ lifts x in R^N to (x, z) with z in R^D. Its perturbation kernel at radius r is
# p_r(x | y) ~ (||x - y||^2 + r^2)^(-(N + D) / 2), a multivariate t with D degrees of freedom and scale r / sqrt(D).
# With r = sigma * sqrt(D) the released networks are EDM denoisers in sigma (EDMPrecond, same preconditioning), and
# the ODE is EDM's dx/dsigma = (x - D(x; sigma)) / sigma; only the prior and the Restart forward jump change.
#
# Sampling p_r(. | 0): the official code draws ||x|| = r sqrt(B / (1 - B)), B ~ Beta(N/2, D/2), times a uniform
# direction. We use the equivalent all-Gaussian form x = r * g_N / ||g_D||, g ~ N(0, I_{N+D}): ||g_N||^2 / ||g_D||^2
# is chi2_N / chi2_D, which has the law of B / (1 - B), and g_N / ||g_N|| is uniform and independent of it.
# (Geometrically: where a ray from the origin in a uniform (N+D)-direction meets the cylinder ||z|| = r.)


def _check_pfgmpp_D(D: Any) -> int:
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(f"pfgmpp_D (PFGM++ augmented dimensions) must be an integer >= 1, got {D!r}")
    return D


def _pfgmpp_randn(noise: Any, shape: Sequence[int], dtype: torch.dtype, device: Any) -> Tensor:
    if not callable(getattr(noise, "randn", None)):
        raise ValueError("PFGM++ draws need noise.randn(shape, dtype=, device=): pass a NoiseSource or GlobalNoise")
    return noise.randn(tuple(shape), dtype=dtype, device=device)


def pfgmpp_prior(
    noise: Any,
    shape: Sequence[int],
    sigma: float,
    D: int,
    *,
    draw_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Samples of the PFGM++ perturbation kernel around 0 at r = sigma * sqrt(D): the prior x_T at sigma_max.

    Per image (row), from ``noise``'s generator for that row: first ``randn(shape[1:])`` -- the very draw EDM uses
    for its Gaussian latents -- then ``randn(D)``; returns ``sigma * sqrt(D) * g_N / ||g_D||`` in float64. So the
    image for a seed does not depend on its batch, and as D -> inf it tends to ``sigma *`` the EDM latent of that seed.
    Official code: ``rand_beta_prime`` (Beta radius, global RNG re-seeded per image) -- same law, other numbers.
    """
    D = _check_pfgmpp_D(D)
    if not sigma > 0:
        raise ValueError(f"pfgmpp_prior needs sigma > 0, got {sigma}")
    shape = tuple(shape)
    g_n = _pfgmpp_randn(noise, shape, draw_dtype, device).to(torch.float64)
    g_d = _pfgmpp_randn(noise, (shape[0], D), draw_dtype, device).to(torch.float64)
    radius_scale = sigma * math.sqrt(D) / g_d.norm(dim=1)
    return g_n * radius_scale.view(-1, *([1] * (len(shape) - 1)))


def pfgmpp_perturb(noise: Any, x: Tensor, sigma_from: float, sigma_to: float, D: int, s_noise: float = 1.0) -> Tensor:
    """Restart's forward jump under the PFGM++ kernel, from sigma_from (t_min) up to sigma_to (t_max).

    The construction of the official ``restart_sampler`` (``benchmarks/generate_restart.py`` L93-114): give x an
    augmented part z of norm r_from = sigma_from sqrt(D) in a uniform direction, pick a uniformly random line
    direction u = g / ||g_D|| (g ~ N(0, I_{N+D})), and move along it by the s that puts z + s u_D on the cylinder of
    radius r_to: s = -<z, u_D> - sqrt(<z, u_D>^2 + r_to^2 - r_from^2); return x + s_noise * s * u_N.

    Two deliberate differences, neither of which changes the law of the result:
      * the official root choice is ``torch.randint(1, ...)``, which is always 0, so it always takes the "-" root;
        a fair coin was presumably meant, but u and -u are equally likely and flipping u swaps the two roots'
        displacements, so one fixed root has the same law as the coin; we keep the official root (no extra draw);
      * the official code draws z and u from the global torch RNG (so images depend on the batch); we draw them
        from ``noise`` per image: first D normals (z's direction), then N + D normals (u; the first N are the
        data part), so a seed's result does not depend on its batch.
    Noted, not changed: for finite D the jump does not map p_{sigma_from} exactly onto p_{sigma_to}; its
    E||dx||^2 = N (2 sigma_from^2 + D (sigma_to^2 - sigma_from^2)) / (D - 2), while the two priors differ by
    N D (sigma_to^2 - sigma_from^2) / (D - 2) (relative excess 2 sigma_from^2 / (D (sigma_to^2 - sigma_from^2)),
    2.7e-4 for D = 2048 and Table 3's (0.14, 0.30)). As D -> inf the jump tends to N(0, (sigma_to^2 - sigma_from^2) I).
    """
    D = _check_pfgmpp_D(D)
    if not 0 <= sigma_from < sigma_to:
        raise ValueError(f"pfgmpp_perturb needs 0 <= sigma_from < sigma_to, got {sigma_from}, {sigma_to}")
    batch = x.shape[0]
    n = x[0].numel()
    r_from, r_to = sigma_from * math.sqrt(D), sigma_to * math.sqrt(D)
    z = _pfgmpp_randn(noise, (batch, D), x.dtype, x.device)
    z = z * (r_from / z.norm(dim=1, keepdim=True))
    g = _pfgmpp_randn(noise, (batch, n + D), x.dtype, x.device)
    inv_len = 1.0 / g[:, n:].norm(dim=1, keepdim=True)
    u_x, u_z = g[:, :n] * inv_len, g[:, n:] * inv_len
    dot = (z * u_z).sum(dim=1)
    step = -dot - torch.sqrt(dot**2 + (r_to**2 - r_from**2))
    return x + (s_noise * step).view(batch, *([1] * (x.dim() - 1))) * u_x.view_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Restart


class RestartConfigError(ValueError):
    """A Restart configuration is malformed; the message says which entry and why."""


@dataclass(frozen=True)
class RestartInterval:
    """One Restart interval: K = ``k`` times, jump from t_min to t_max and solve back on ``n_restart`` grid points."""

    n_restart: int
    k: int
    t_min: float
    t_max: float

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_restart", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer, got {value!r}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if problems:
            raise RestartConfigError("; ".join(problems))
        if self.n_restart < 2:
            problems.append(f"n_restart must be >= 2 (it counts grid points, N_restart - 1 steps), got {self.n_restart}")
        if self.k < 0:
            problems.append(f"k (number of restarts) must be >= 0, got {self.k}")
        if not 0 < self.t_min < self.t_max:
            problems.append(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if problems:
            raise RestartConfigError("; ".join(problems))

    def as_list(self) -> list[float]:
        """The official ``[N_restart, K, t_min, t_max]`` notation."""
        return [self.n_restart, self.k, self.t_min, self.t_max]


_INTERVAL_FIELDS = ("n_restart", "k", "t_min", "t_max")


def _interval_from(entry: Any, where: str) -> RestartInterval:
    if isinstance(entry, RestartInterval):
        return entry
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - set(_INTERVAL_FIELDS))
        missing = [f for f in _INTERVAL_FIELDS if f not in entry]
        if unknown or missing:
            raise RestartConfigError(
                f"{where}: a dict interval needs exactly the keys {list(_INTERVAL_FIELDS)}"
                + (f"; unknown {unknown}" if unknown else "")
                + (f"; missing {missing}" if missing else "")
            )
        values = [entry[f] for f in _INTERVAL_FIELDS]
    elif isinstance(entry, (list, tuple)):
        if len(entry) != 4:
            raise RestartConfigError(f"{where}: expected [N_restart, K, t_min, t_max], got {entry!r} ({len(entry)} values)")
        values = list(entry)
    else:
        raise RestartConfigError(f"{where}: expected [N_restart, K, t_min, t_max] or a dict, got {entry!r}")
    try:
        return RestartInterval(*values)
    except RestartConfigError as err:
        raise RestartConfigError(f"{where}: {err}") from None


def parse_restart_config(obj: Any) -> list[RestartInterval]:
    """Normalise a Restart configuration to a list of :class:`RestartInterval`.

    Accepted forms (a JSON string of any of them too):
      * ``[[N, K, t_min, t_max], ...]`` or a list of ``RestartInterval``;
      * ``[{"n_restart": N, "k": K, "t_min": ..., "t_max": ...}, ...]``;
      * the official notation ``{"0": [N, K, t_min, t_max], "1": [...]}`` (keys are labels only; order kept);
      * ``None`` or empty -> no restarts.
    """
    if obj is None:
        return []
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj) if obj.strip() else []
        except json.JSONDecodeError as err:
            raise RestartConfigError(f"restart config is not valid JSON ({err}): {obj!r}") from None
    if isinstance(obj, RestartInterval):
        return [obj]
    if isinstance(obj, Mapping):
        if set(obj) <= set(_INTERVAL_FIELDS) and obj:
            raise RestartConfigError(f"restart config looks like a single interval {dict(obj)!r}; wrap it in a list: [{{...}}]")
        return [_interval_from(v, f"restart interval {k!r}") for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        if len(obj) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            raise RestartConfigError(f"restart config {list(obj)!r} is a single [N, K, t_min, t_max]; wrap it in a list: [[...]]")
        return [_interval_from(v, f"restart interval #{i}") for i, v in enumerate(obj)]
    raise RestartConfigError(
        f'cannot read a restart config from {type(obj).__name__}: use [[N, K, t_min, t_max], ...] or {{"0": [N, K, t_min, t_max]}}'
    )


_SOLVER_NFE_PER_STEP = {"heun": 2, "dpm_solver3": 3}


def _check_solver(solver: str) -> None:
    if solver not in _SOLVER_NFE_PER_STEP:
        raise ValueError(f"unknown restart solver {solver!r}; choose one of {sorted(_SOLVER_NFE_PER_STEP)}")


def _main_nfe(n_main: int, solver: str) -> int:
    if n_main < 1:
        raise ValueError(f"need at least one main grid point, got {n_main}")
    if solver == "heun":
        return 2 * n_main - 1
    return 1 if n_main == 1 else 3 * n_main - 3  # orders 3,...,3,2,1 (see _dpm_order_for_step)


def restart_nfe(n_main: int, intervals: Any, solver: str = "heun") -> int:
    """Analytic NFE of :func:`sample_restart` (paper App. C.2; official ``hyperparam.py``).

    heun: (2 n_main - 1) + sum K * 2 * (N_restart - 1); dpm_solver3: (3 n_main - 3) + sum 3 K (N_restart - 1).
    """
    _check_solver(solver)
    per_step = _SOLVER_NFE_PER_STEP[solver]
    return _main_nfe(n_main, solver) + sum(iv.k * per_step * (iv.n_restart - 1) for iv in parse_restart_config(intervals))


def _restart_points(sig: list[float], intervals: list[RestartInterval]) -> dict[int, list[RestartInterval]]:
    """Map each interval to the main-grid index nearest its t_min (Restart Alg. 2, line 2)."""
    by_index: dict[int, list[RestartInterval]] = {}
    for iv in intervals:
        idx = min(range(len(sig)), key=lambda j: abs(sig[j] - iv.t_min))  # first index on ties, like torch.argmin
        if idx == 0:
            raise RestartConfigError(f"{iv}: t_min rounds to the first grid point {sig[0]:g}; a restart there never runs")
        if sig[idx] == 0:
            raise RestartConfigError(f"{iv}: t_min rounds to sigma=0, the end of sampling; use a larger t_min")
        if sig[idx] >= iv.t_max:
            raise RestartConfigError(f"{iv}: t_min rounds to grid point {sig[idx]:g} >= t_max={iv.t_max}")
        by_index.setdefault(idx, []).append(iv)
    return by_index


@torch.no_grad()
def sample_restart(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    noise: Any,
    restart: Any,
    restart_gamma: float = 0.0,
    s_min: float = 0.01,
    s_max: float = 1.0,
    s_noise: float = 1.0,
    s_churn: float = 0.0,
    rho: float = 7.0,
    class_labels: Tensor | None = None,
    inner_solver: str = "heun",
    main_solver: str | None = None,
    pfgmpp_D: int | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = True,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 2; official ``restart_sampler`` in ``benchmarks/generate_restart.py``).

    Main process: Heun on ``sigmas`` (last step to 0 Euler). Each interval's t_min is rounded to the nearest main-grid
    point; right after the main process reaches that point, K times:
      * forward:  x += sqrt(t_max^2 - t_min^2) * s_noise * eps;
      * backward: ``inner_solver`` from t_max to t_min on an EDM rho-grid of N_restart points (N_restart - 1 steps),
        with optional churn ``restart_gamma`` for s_min <= t <= s_max: t_hat = (1 + gamma) t,
        x += sqrt(t_hat^2 - t^2) * s_noise * eps (the official script's hidden default is gamma = 0.05; ours is 0).
    ``s_churn`` adds EDM churn to the main steps in [s_min, s_max] (official ``S_churn``, default 0).
    ``inner_solver="dpm_solver3"`` reproduces the official DPM variant, which uses DPM-Solver-3 for the main process
    *and* the restart passes (``main_solver`` overrides the main one).
    ``pfgmpp_D`` (PFGM++ models, e.g. 2048): the forward jump uses the PFGM++ kernel (:func:`pfgmpp_perturb`);
    the ODE steps and any churn stay as they are (as in the official code); start from :func:`pfgmpp_prior`.
    ``None`` (default) is the Gaussian jump above, unchanged.

    NFE equals :func:`restart_nfe`. Differences from the official script, all deliberate:
      * the restart grid is float64 (official: float32), so t_max/t_min are hit exactly;
      * noise is drawn only where it is used (the official code draws and multiplies by 0 at every step when
        gamma = 0), so per-seed images differ from the official script's while the distribution is the same;
      * several intervals rounding to the same grid point all run, in the given order (official: the last one
        silently replaces the others); an interval whose t_min rounds to the first point or to 0 is an error
        (official: silently never runs / restarts from 0);
      * PFGM++ jumps draw from ``noise`` per image (official: the global RNG); see :func:`pfgmpp_perturb`.
    """
    noise = _require_noise(noise, "sample_restart")
    intervals = parse_restart_config(restart)
    main_solver = inner_solver if main_solver is None else main_solver
    _check_solver(inner_solver)
    _check_solver(main_solver)
    if pfgmpp_D is not None:
        _check_pfgmpp_D(pfgmpp_D)
    sig = _as_floats(sigmas)
    n = len(sig) - 1
    by_index = _restart_points(sig, intervals)
    gamma_main = min(s_churn / n, math.sqrt(2.0) - 1.0)

    def solve(x: Tensor, i: int, grid: list[float], solver: str, gamma: float, phase: str) -> Tensor:
        sigma = grid[i]
        sigma_hat = sigma
        if gamma > 0 and s_min <= sigma <= s_max:
            sigma_hat = sigma * (1.0 + gamma)
            x = x + noise.randn_like(x) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        if solver == "heun":
            x, denoised = _ode_step(denoiser, x, sigma_hat, grid[i + 1], class_labels, second_order=True)
        else:
            x, denoised = _dpm_solver_step(denoiser, x, sigma_hat, grid[i + 1], class_labels, _dpm_order_for_step(i, grid))
        _callback(callback, x=x, i=i, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised, phase=phase)
        return x

    for i in trange(n, disable=disable):
        x = solve(x, i, sig, main_solver, gamma_main, "main")
        for iv in by_index.get(i + 1, ()):
            t_min = sig[i + 1]
            grid = edm_sigmas(iv.n_restart, t_min, iv.t_max, rho)[:-1].tolist()  # float64, no trailing 0
            jump = s_noise * math.sqrt(iv.t_max**2 - t_min**2)
            for _ in range(iv.k):
                if pfgmpp_D is None:
                    x = x + noise.randn_like(x) * jump
                else:
                    x = pfgmpp_perturb(noise, x, t_min, iv.t_max, pfgmpp_D, s_noise)
                for j in range(iv.n_restart - 1):
                    x = solve(x, j, grid, inner_solver, restart_gamma, "restart")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Registry and analytic NFE

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "edm_sde": sample_edm_sde,
    "vanilla_sde": sample_vanilla_sde,
    "dpm_solver3": sample_dpm_solver3,
    "restart": sample_restart,
}


def sampler_nfe(name: str, n_steps: int, **config: Any) -> int:
    """Network evaluations of ``SAMPLERS[name]`` on an ``edm_sigmas(n_steps)`` grid (n_steps nonzero points + 0).

    Config keys that affect the count: ``second_order`` (edm_sde), ``restart`` and ``inner_solver``/``main_solver``
    (restart). Other keys (s_churn, ...) are ignored.
    """
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if name == "euler" or name == "vanilla_sde":
        return n_steps
    if name == "heun":
        return 2 * n_steps - 1
    if name == "edm_sde":
        return 2 * n_steps - 1 if config.get("second_order", True) else n_steps
    if name == "dpm_solver3":
        return _main_nfe(n_steps, "dpm_solver3")
    if name == "restart":
        inner = config.get("inner_solver", "heun")
        main = config.get("main_solver") or inner
        _check_solver(inner)
        _check_solver(main)
        per_step = _SOLVER_NFE_PER_STEP[inner]
        intervals = parse_restart_config(config.get("restart"))
        return _main_nfe(n_steps, main) + sum(iv.k * per_step * (iv.n_restart - 1) for iv in intervals)
    raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
