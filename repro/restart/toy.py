"""The Restart paper's toy W1 experiment (§5.1, App. C.5), reconstructed.

What the paper fixes (reference notes ``restart.md`` §4):
  * data: 2000 points of S1 ~ 0.3·N(a, I) + 0.7·N(−a, I) in R^4, a = (3, 3, 3, 3), projected by a random
    P ∈ R^{20×4} with N(0, 1) entries, each coordinate rescaled to unit variance;
  * a four-layer MLP, width 64, with EDM preconditioning, trained with the EDM DSM loss;
  * the samplers differ only on [t_min, t_max] = [1.0, 1.5]; outside it a first-order Euler ODE is used;
  * errors at t = 0 with W1 by minimum-weight matching: total = W1(p0^S, p0), contracted = W1(p0^S, q0^S) where q is
    the same sampler started from the true p_{t_max}, additional = W1(q0^S, p0).

What the paper leaves open and this module chooses (RECONSTRUCTION, documented here and in the spec):
  * T = σ_max = 80 and the outer Euler grids: EDM ρ=7 grid with ``outer_steps_high`` steps from T to t_max, and
    ``outer_steps_low`` steps from t_min to σ_min = 0.002 followed by one Euler step to 0 (which returns D(x; σ_min));
  * every grid inside [t_min, t_max] is an EDM ρ=7 grid; inside-interval solvers are first order (Euler / Euler–Maruyama)
    unless ``solver = "heun"`` is asked for, so that every sampler has the same order as the outer process;
  * the SDE family (β multiplier), with σ(t) = t:  dx = −(1 + β)·t·∇log p_t(x) dt + sqrt(2β·t) dB̄_t.
    β = 0 is the probability-flow ODE and β = 1 the "vanilla" reverse SDE dx = −2t∇log p dt + sqrt(2t) dB̄ that the
    official ``generate_sde.py`` discretizes. With t∇log p_t(x) = (D(x; t) − x)/t, Euler–Maruyama from t_i to t_{i+1} < t_i:
        x ← x + (1 + β)(t_{i+1} − t_i)·(x − D(x; t_i))/t_i + sqrt(2β·t_i·(t_i − t_{i+1}))·ε;
  * Improved SDE = EDM Alg. 2 churn on every in-interval step: γ = min(S_churn/steps, √2 − 1), t̂ = (1 + γ)t,
    x̂ = x + sqrt(t̂² − t²)·S_noise·ε (S_noise = 1), then the ODE step from t̂ to t_{i+1};
  * Restart: the ODE from t_max to t_min with N_Restart − 1 steps, then K times {x += sqrt(t_max² − t_min²)·ε; ODE back
    with N_Restart − 1 steps}; no hidden churn (restart_gamma = 0), S_noise = 1. K = 0 is the ODE with N_Restart − 1 steps;
  * NFE ("nfe") counts network evaluations inside [t_min, t_max] only (the part that differs between samplers);
    "nfe_total" adds the outer process;
  * q starts from the training points plus t_max·ε (the true p_{t_max} of the data the model was trained on);
  * each run (seed) draws 2000 samples for p and 2000 for q and matches them against the 2000 data points;
  * the network is trained once per data set and training settings (``model_seed``), shared by every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

Denoiser = Callable[..., torch.Tensor]  # denoiser(x, sigma, class_labels=None) -> D(x; sigma)

SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
RHO = 7.0
T_MIN = 1.0
T_MAX = 1.5

# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class ToyData:
    """The projected two-component Gaussian mixture and a fixed draw of its points (all float64)."""

    points: torch.Tensor  # (n, dim): the data set p0 (training set and W1 reference)
    projection: torch.Tensor  # (dim, latent_dim): A = diag(1/std) · P, so x = A s
    weights: torch.Tensor  # (2,)
    latent_means: torch.Tensor  # (2, latent_dim): ±a

    @property
    def means(self) -> torch.Tensor:  # (2, dim)
        return self.latent_means @ self.projection.T

    @property
    def covariance(self) -> torch.Tensor:  # (dim, dim), rank latent_dim: each latent component has covariance I
        return self.projection @ self.projection.T


def make_toy_data(
    seed: int = 0, n: int = 2000, dim: int = 20, latent_dim: int = 4, shift: float = 3.0, weights: tuple[float, float] = (0.3, 0.7)
) -> ToyData:
    """Draw the toy data set: 0.3·N(a, I) + 0.7·N(−a, I) in R^latent_dim, projected to R^dim, rescaled.

    The rescaling uses the empirical standard deviation of each coordinate of the n drawn points, so the data set has
    exactly unit variance per coordinate; the population distribution is defined with that same fixed rescaling.
    """
    gen = torch.Generator().manual_seed(int(seed))
    p = torch.randn(dim, latent_dim, generator=gen, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    a = torch.full((latent_dim,), float(shift), dtype=torch.float64)
    latent_means = torch.stack([a, -a])
    component = torch.multinomial(w, n, replacement=True, generator=gen)
    latent = latent_means[component] + torch.randn(n, latent_dim, generator=gen, dtype=torch.float64)
    projected = latent @ p.T
    std = projected.std(dim=0)
    projection = p / std[:, None]
    return ToyData(points=projected / std, projection=projection, weights=w, latent_means=latent_means)


def sample_population(data: ToyData, n: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh draws from the population distribution p0 (not the fixed data set)."""
    component = torch.multinomial(data.weights, n, replacement=True, generator=generator)
    latent_dim = data.latent_means.shape[1]
    latent = data.latent_means[component] + torch.randn(n, latent_dim, generator=generator, dtype=torch.float64)
    return latent @ data.projection.T


def exact_denoiser(data: ToyData) -> Denoiser:
    """The exact posterior mean D(x; σ) = E[x0 | x0 + σε = x] for the population mixture.

    p_σ = Σ_k w_k N(μ_k, Σ + σ²I) with Σ = A Aᵀ (rank 4). With Σ = U diag(λ) Uᵀ:
    E[x0 | x, k] = μ_k + Σ (Σ + σ²I)^{-1}(x − μ_k) = μ_k + U diag(λ/(λ+σ²)) Uᵀ(x − μ_k), and the responsibilities
    r_k ∝ w_k N(x; μ_k, Σ + σ²I). σ may be a scalar or one value per row.
    """
    eigvals, eigvecs = torch.linalg.eigh(data.covariance)
    eigvals = eigvals.clamp(min=0.0)
    means = data.means
    log_w = data.weights.log()

    def denoise(x: torch.Tensor, sigma: Any, class_labels: Any = None) -> torch.Tensor:
        x64 = x.to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # (1|n, 1)
        var = eigvals[None, :] + s**2  # (1|n, dim)
        z = torch.einsum("nd,de->ne", x64, eigvecs)[:, None, :] - (means @ eigvecs)[None, :, :]  # (n, 2, dim)
        log_lik = -0.5 * (z**2 / var[:, None, :]).sum(-1) - 0.5 * var.log().sum(-1, keepdim=True)  # (n, 2)
        resp = torch.softmax(log_lik + log_w[None, :], dim=1)  # (n, 2)
        shrunk = z * (eigvals[None, :] / var)[:, None, :]  # Uᵀ(E[x0|x,k] − μ_k)
        posterior_z = (resp[:, :, None] * ((means @ eigvecs)[None, :, :] + shrunk)).sum(1)
        return (posterior_z @ eigvecs.T).to(x.dtype)

    return denoise


# ----------------------------------------------------------------------------------------------------------------------
# Model: MLP with EDM preconditioning, trained with the EDM DSM loss


class ToyMLP(nn.Module):
    """Four linear layers of width 64 on [c_in·x, c_noise]; this is F_θ in EDM's D = c_skip·x + c_out·F_θ."""

    def __init__(self, dim: int = 20, width: int = 64, layers: int = 4):
        super().__init__()
        sizes = [dim + 1] + [width] * (layers - 1) + [dim]
        blocks: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            blocks.append(nn.Linear(n_in, n_out))
            if i < layers - 1:
                blocks.append(nn.SiLU())
        self.net = nn.Sequential(*blocks)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_in, c_noise], dim=1))


class EDMPrecondMLP(nn.Module):
    """D(x; σ) = c_skip x + c_out F([c_in x, ln(σ)/4]) with EDM's c_skip, c_out, c_in (Karras et al. 2022, Table 1)."""

    def __init__(self, dim: int = 20, width: int = 64, layers: int = 4, sigma_data: float = 1.0):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.model = ToyMLP(dim, width, layers)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Any = None) -> torch.Tensor:
        x32 = x.to(torch.float32)
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + s**2).sqrt()
        c_noise = s.log() / 4
        out = c_skip * x32 + c_out * self.model(c_in * x32, c_noise)
        return out.to(x.dtype)


def train_toy_denoiser(
    points: torch.Tensor,
    *,
    steps: int = 20000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 64,
    layers: int = 4,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> EDMPrecondMLP:
    """EDM DSM loss: σ = exp(P_mean + P_std·n), weight (σ² + σ_d²)/(σ σ_d)², Adam with a cosine learning-rate decay."""
    torch.manual_seed(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    data = points.to(torch.float32)
    sigma_data = float(data.std())
    net = EDMPrecondMLP(data.shape[1], width, layers, sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for _ in progress(range(steps)):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        y = data[idx]
        sigma = (torch.randn(batch_size, 1, generator=gen) * p_std + p_mean).exp()
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        noisy = y + sigma * torch.randn(y.shape, generator=gen)
        loss = (weight * (net(noisy, sigma) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return net


def dsm_loss(net: Denoiser, points: torch.Tensor, *, n_sigma: int = 64, seed: int = 1, p_mean: float = -1.2, p_std: float = 1.2) -> float:
    """Held-out-noise EDM loss (evaluation only), to report how well the network trained."""
    gen = torch.Generator().manual_seed(int(seed))
    y = points.to(torch.float32).repeat(max(1, n_sigma * 256 // points.shape[0] + 1), 1)[: n_sigma * 256]
    sigma_data = float(points.std())
    sigma = (torch.randn(y.shape[0], 1, generator=gen) * p_std + p_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noisy = y + sigma * torch.randn(y.shape, generator=gen)
    with torch.no_grad():
        return float((weight * (net(noisy, sigma) - y) ** 2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Samplers (σ(t) = t; x and noise in float64)


class CountedDenoiser:
    """Wraps a denoiser and counts its calls (one call on a batch = one NFE for every sample in it)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma)


def edm_grid(t_hi: float, t_lo: float, steps: int, rho: float = RHO) -> list[float]:
    """steps + 1 times from t_hi down to t_lo on EDM's ρ-warped grid (both ends included exactly)."""
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    i = np.arange(steps + 1) / steps
    t = (t_hi ** (1 / rho) + i * (t_lo ** (1 / rho) - t_hi ** (1 / rho))) ** rho
    t[0], t[-1] = t_hi, t_lo
    return [float(v) for v in t]


def ode_step(den: CountedDenoiser, x: torch.Tensor, t_cur: float, t_next: float, solver: str = "euler") -> torch.Tensor:
    """One Euler (or Heun) step of dx/dt = (x − D(x; t))/t; a step to t = 0 is always Euler (it returns D)."""
    d_cur = (x - den(x, t_cur)) / t_cur
    x_next = x + (t_next - t_cur) * d_cur
    if solver == "heun" and t_next > 0:
        d_next = (x_next - den(x_next, t_next)) / t_next
        x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
    elif solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver '{solver}' (euler | heun)")
    return x_next


def ode_solve(den: CountedDenoiser, x: torch.Tensor, times: list[float], solver: str = "euler") -> torch.Tensor:
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x = ode_step(den, x, t_cur, t_next, solver)
    return x


def sde_solve(den: CountedDenoiser, x: torch.Tensor, times: list[float], beta: float, generator: torch.Generator) -> torch.Tensor:
    """Euler–Maruyama for dx = −(1+β)·t∇log p_t dt + sqrt(2βt) dB̄ (see the module docstring)."""
    for t_cur, t_next in zip(times[:-1], times[1:]):
        d_cur = (x - den(x, t_cur)) / t_cur
        x = x + (1 + beta) * (t_next - t_cur) * d_cur
        if beta > 0:
            x = x + math.sqrt(2 * beta * t_cur * (t_cur - t_next)) * randn_like(x, generator)
    return x


def improved_sde_solve(
    den: CountedDenoiser,
    x: torch.Tensor,
    times: list[float],
    s_churn: float,
    generator: torch.Generator,
    s_noise: float = 1.0,
    solver: str = "euler",
) -> torch.Tensor:
    """EDM Alg. 2 churn on every step of ``times`` (S_min = 0, S_max = ∞ within the interval)."""
    steps = len(times) - 1
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * randn_like(x, generator)
        x = ode_step(den, x, t_hat, t_next, solver)
    return x


def restart_solve(
    den: CountedDenoiser,
    x: torch.Tensor,
    t_max: float,
    t_min: float,
    n_restart: int,
    k: int,
    generator: torch.Generator,
    solver: str = "euler",
) -> torch.Tensor:
    """ODE t_max → t_min, then K × {jump to t_max with N(0, (t_max² − t_min²)I) noise, ODE back}, N_Restart-point grids."""
    times = edm_grid(t_max, t_min, n_restart - 1)
    x = ode_solve(den, x, times, solver)
    jump = math.sqrt(t_max**2 - t_min**2)
    for _ in range(k):
        x = x + jump * randn_like(x, generator)
        x = ode_solve(den, x, times, solver)
    return x


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


SAMPLERS = ("ode", "sde", "improved_sde", "restart")


def resolve_params(params: Mapping[str, Any], solver: str = "euler") -> dict[str, Any]:
    """Fill ``steps`` (ode, sde, improved_sde) or ``k`` (restart) from an ``nfe`` budget when they are not given.

    Lets a spec grid sweep matched NFE directly (``nfe = [20, 40]`` × ``n_restart = [5, 11]``). An ``nfe`` that the
    setting cannot hit exactly is an error, and an explicit ``steps``/``k`` must agree with ``nfe``.
    """
    out = dict(params)
    sampler = out.get("sampler")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown toy sampler '{sampler}' (one of {', '.join(SAMPLERS)})")
    if "nfe" in out:
        nfe = int(out["nfe"])
        per_step = 2 if (solver == "heun" and sampler != "sde") else 1
        if sampler == "restart":
            per_pass = per_step * (int(out["n_restart"]) - 1)
            if nfe % per_pass:
                raise ValueError(f"nfe={nfe} is not a multiple of {per_pass} evaluations per Restart pass ({dict(params)})")
            out.setdefault("k", nfe // per_pass - 1)
        else:
            if nfe % per_step:
                raise ValueError(f"nfe={nfe} is odd but every {solver} step costs {per_step} evaluations ({dict(params)})")
            out.setdefault("steps", nfe // per_step)
        if interval_nfe(out, solver) != nfe:
            raise ValueError(f"cell labelled nfe={nfe} but {dict(out)} uses {interval_nfe(out, solver)} evaluations in the interval")
    return out


def interval_nfe(params: Mapping[str, Any], solver: str = "euler") -> int:
    """Network evaluations inside [t_min, t_max] for one (resolved) sampler setting, without running it."""
    per_step = 2 if solver == "heun" else 1
    sampler = params["sampler"]
    if sampler == "sde":
        return int(params["steps"])  # Euler–Maruyama is first order whatever the solver setting
    if sampler in ("ode", "improved_sde"):
        return per_step * int(params["steps"])
    if sampler == "restart":
        return per_step * (int(params["k"]) + 1) * (int(params["n_restart"]) - 1)
    raise ValueError(f"unknown toy sampler '{sampler}' (one of {', '.join(SAMPLERS)})")


def run_interval_sampler(
    den: CountedDenoiser,
    x: torch.Tensor,
    params: Mapping[str, Any],
    generator: torch.Generator,
    *,
    t_max: float = T_MAX,
    t_min: float = T_MIN,
    solver: str = "euler",
) -> torch.Tensor:
    """Carry x from t_max to t_min with the sampler described by params (sampler, steps, beta, s_churn, n_restart, k)."""
    sampler = params["sampler"]
    if sampler == "ode":
        return ode_solve(den, x, edm_grid(t_max, t_min, int(params["steps"])), solver)
    if sampler == "sde":
        return sde_solve(den, x, edm_grid(t_max, t_min, int(params["steps"])), float(params["beta"]), generator)
    if sampler == "improved_sde":
        times = edm_grid(t_max, t_min, int(params["steps"]))
        return improved_sde_solve(den, x, times, float(params["s_churn"]), generator, float(params.get("s_noise", 1.0)), solver)
    if sampler == "restart":
        return restart_solve(den, x, t_max, t_min, int(params["n_restart"]), int(params["k"]), generator, solver)
    raise ValueError(f"unknown toy sampler '{sampler}' (one of {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------------------------------------------------
# W1 and the three errors


def w1_matching(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Empirical W1 between two equal-size point sets: the minimum-weight perfect matching on Euclidean costs."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"W1 by matching needs equal-size sets, got {a.shape} and {b.shape}")
    cost = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)) if a.shape[0] <= 256 else _cdist(a, b)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


@dataclass(frozen=True)
class ToySettings:
    t_min: float = T_MIN
    t_max: float = T_MAX
    sigma_max: float = SIGMA_MAX
    sigma_min: float = SIGMA_MIN
    outer_steps_high: int = 10
    outer_steps_low: int = 20
    solver: str = "euler"
    num_samples: int = 2000

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> ToySettings:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: type(getattr(cls, k))(v) for k, v in settings.items() if k in names})


def toy_errors(
    denoiser: Denoiser, data: ToyData, params: Mapping[str, Any], seed: int, settings: ToySettings = ToySettings()
) -> dict[str, float]:
    """Run one sampler setting once (one seed) and measure the total / contracted / additional W1 errors."""
    s = settings
    params = resolve_params(params, s.solver)
    n = s.num_samples
    gen_p = torch.Generator().manual_seed(1_000_003 * int(seed) + 1)
    gen_q = torch.Generator().manual_seed(1_000_003 * int(seed) + 2)
    den_p = CountedDenoiser(denoiser)
    den_q = CountedDenoiser(denoiser)
    dim = data.points.shape[1]
    low = edm_grid(s.t_min, s.sigma_min, s.outer_steps_low) + [0.0]

    # p: the full process from T, through the learned model, to t_max, then the sampler, then the Euler tail.
    x = s.sigma_max * torch.randn(n, dim, generator=gen_p, dtype=torch.float64)
    x = ode_solve(den_p, x, edm_grid(s.sigma_max, s.t_max, s.outer_steps_high), "euler")
    nfe_before = den_p.nfe
    x = run_interval_sampler(den_p, x, params, gen_p, t_max=s.t_max, t_min=s.t_min, solver=s.solver)
    nfe_interval = den_p.nfe - nfe_before
    p0 = ode_solve(den_p, x, low, "euler")

    # q: the same sampler started from the true p_{t_max} (data points + t_max·ε).
    idx = torch.randint(0, data.points.shape[0], (n,), generator=gen_q) if n != data.points.shape[0] else torch.arange(n)
    y = data.points[idx] + s.t_max * torch.randn(n, dim, generator=gen_q, dtype=torch.float64)
    y = run_interval_sampler(den_q, y, params, gen_q, t_max=s.t_max, t_min=s.t_min, solver=s.solver)
    q0 = ode_solve(den_q, y, low, "euler")

    expected = interval_nfe(params, s.solver)
    if nfe_interval != expected:
        raise AssertionError(f"interval NFE {nfe_interval} != planned {expected} for {dict(params)}")
    reference = data.points.numpy()
    return {
        "w1_total": w1_matching(p0.numpy(), reference),
        "w1_contracted": w1_matching(p0.numpy(), q0.numpy()),
        "w1_additional": w1_matching(q0.numpy(), reference),
        "nfe": float(nfe_interval),
        "nfe_total": float(den_p.nfe),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Pareto-front claim checker


def pareto_front(x: Iterable[float], y: Iterable[float]) -> list[tuple[float, float]]:
    """The Pareto-optimal points (lower x and lower y are better), sorted by x: each has a lower y than every point
    with a smaller or equal x. Read as a step function, this is the prefix minimum of y over x the paper draws."""
    pts = sorted(zip(map(float, x), map(float, y)))
    front: list[tuple[float, float]] = []
    best = math.inf
    for px, py in pts:
        if py < best:
            best = py
            front.append((px, py))
    return front


def _front_at(front: list[tuple[float, float]], x: float) -> float:
    """Prefix-minimum y among points with x' ≤ x (inf when none)."""
    best = math.inf
    for px, py in front:
        if px <= x:
            best = min(best, py)
    return best


PARETO_KEYS = {"x", "y", "a", "b", "x_range", "min_fraction", "tol"}


def pareto_dominates(df: Any, claim: Mapping[str, Any]) -> Any:
    """Claim checker: a's Pareto front of (x, y) (lower is better for both) lies below b's wherever both are defined.

    ``df`` is the aggregated results table (one row per parameter combination, seeds averaged: see
    ``repro.results.aggregate``). Keys: x, y (metric names), a (selector), b (selector or list of selectors, each
    checked), optional ``x_range`` [lo, hi] restricting the compared b-points, ``min_fraction`` (default 1.0: every
    compared b-point must be beaten) and ``tol`` (relative slack on y, default 0: a must be strictly lower).
    For each b-front point (x_b, y_b) at which a has some point with x_a ≤ x_b, a's front value min{y_a : x_a ≤ x_b}
    is compared with y_b. The fronts are prefix minima, as the paper draws them (App. C.5).
    Returns a ``repro.claims.Verdict`` ("holds" | "fails" | "insufficient data").
    """
    from repro.claims import FAILS, HOLDS, INSUFFICIENT, Verdict, combine
    from repro.results import select

    x, y = claim["x"], claim["y"]
    tol = float(claim.get("tol", 0.0))
    min_fraction = float(claim.get("min_fraction", 1.0))
    x_range = claim.get("x_range")
    others = claim["b"] if isinstance(claim["b"], list) else [claim["b"]]

    def front(selector: Mapping[str, Any]) -> list[tuple[float, float]]:
        sub = select(df, dict(selector))
        if len(sub) == 0 or x not in sub.columns or y not in sub.columns:
            return []
        pts = [(float(a), float(b)) for a, b in zip(sub[x], sub[y]) if a == a and b == b]
        return pareto_front([p[0] for p in pts], [p[1] for p in pts])

    front_a = front(claim["a"])
    verdicts = []
    for b_sel in others:
        label = f"vs {dict(b_sel)}" if len(others) > 1 else ""
        front_b = front(b_sel)
        if not front_a or not front_b:
            verdicts.append((label, Verdict(INSUFFICIENT, f"a has {len(front_a)} point(s), b has {len(front_b)}")))
            continue
        compared, wins, lines = 0, 0, []
        for xb, yb in front_b:
            if x_range is not None and not (float(x_range[0]) <= xb <= float(x_range[1])):
                continue
            ya = _front_at(front_a, xb)
            if not math.isfinite(ya):
                continue
            compared += 1
            win = ya < yb * (1 + tol)
            wins += int(win)
            lines.append(f"{x}≤{xb:.4g}: {ya:.4g} vs {yb:.4g}{'' if win else ' ✗'}")
        if compared == 0:
            verdicts.append((label, Verdict(INSUFFICIENT, f"the fronts do not overlap in {x}")))
            continue
        ok = wins >= min_fraction * compared
        detail = f"{y} front of a below b at {wins}/{compared} b-points (need {min_fraction:.0%}): " + ", ".join(lines)
        verdicts.append((label, Verdict(HOLDS if ok else FAILS, detail)))
    return combine(verdicts)


# ----------------------------------------------------------------------------------------------------------------------
# Lemma 7


def gaussian_tail(z: float) -> float:
    """Q(z) = P(N(0,1) > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def shifted_gaussians_tv(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Lemma 7: TV(x + N(0, σ²I), y + N(0, σ²I)) = 1 − 2Q(‖x − y‖/(2σ))."""
    return 1 - 2 * gaussian_tail(float(np.linalg.norm(np.asarray(x) - np.asarray(y))) / (2 * sigma))
