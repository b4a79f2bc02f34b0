"""Analytic denoisers with exact D(x; sigma), for testing samplers without a trained network.

For data y ~ sum_m w_m N(mu_m, diag(s_m^2)) and x = y + sigma * n, every component stays Gaussian:
x | m ~ N(mu_m, diag(s_m^2 + sigma^2)), and E[y | x, m] = mu_m + s_m^2 / (s_m^2 + sigma^2) (x - mu_m). So

    D(x; sigma) = E[y | x] = sum_m r_m(x) E[y | x, m],   r_m(x) = posterior responsibility of component m,

which is the exact minimiser of the denoising loss; every sampler's error is then pure discretisation (+ Monte
Carlo) error. Written from these equations; not a reconstruction of any trained model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class GaussianMixtureDenoiser:
    """Exact denoiser of a diagonal Gaussian mixture in R^d.

    ``means``: [M, d] (or [M] for 1-D data); ``stds``: per component, broadcastable to [M, d] (all > 0);
    ``weights``: [M], positive, normalised here (default uniform). Called as ``D(x, sigma, class_labels=None)``
    with x of shape [batch, *event] where prod(event) = d, and sigma a scalar or a [batch] tensor.
    """

    def __init__(
        self,
        means: Sequence[float] | Sequence[Sequence[float]] | Tensor,
        stds: float | Sequence[float] | Tensor,
        weights: Sequence[float] | Tensor | None = None,
    ):
        means_t = torch.as_tensor(means, dtype=torch.float64)
        if means_t.ndim == 1:
            means_t = means_t[:, None]
        if means_t.ndim != 2:
            raise ValueError(f"means must have shape [M, d] or [M], got {tuple(means_t.shape)}")
        n_comp, dim = means_t.shape
        stds_t = torch.as_tensor(stds, dtype=torch.float64)
        if stds_t.ndim == 1 and stds_t.shape[0] == n_comp:
            stds_t = stds_t[:, None]  # one std per component
        stds_t = torch.broadcast_to(stds_t, (n_comp, dim)).clone()
        if not bool((stds_t > 0).all()):
            raise ValueError("component stds must be > 0 (the exact denoiser divides by them at sigma -> 0)")
        if weights is None:
            weights_t = torch.full((n_comp,), 1.0 / n_comp, dtype=torch.float64)
        else:
            weights_t = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if weights_t.shape[0] != n_comp or not bool((weights_t > 0).all()):
                raise ValueError(f"weights must be {n_comp} positive numbers, got {weights_t.tolist()}")
            weights_t = weights_t / weights_t.sum()
        self.means, self.stds, self.weights = means_t, stds_t, weights_t
        self.dim = dim
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    # -- exact posterior mean ------------------------------------------------------------------------------------
    def _params(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.means.to(device=like.device, dtype=like.dtype),
                self.stds.to(device=like.device, dtype=like.dtype) ** 2,
                self.weights.log().to(device=like.device, dtype=like.dtype),
            )
        return self._cache[key]

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per sample; this mixture lives in R^{self.dim}")
        means, var0, log_w = self._params(x)
        sigma_t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)  # [batch or 1, 1, 1]
        var = var0[None] + sigma_t**2  # [b, M, d]
        diff = flat[:, None, :] - means[None]  # [b, M, d]
        log_lik = -0.5 * (diff**2 / var + var.log()).sum(-1)  # [b, M], up to a shared constant
        resp = torch.softmax(log_lik + log_w, dim=-1)
        posterior_means = means[None] + (var0[None] / var) * diff
        return (resp[..., None] * posterior_means).sum(1).reshape(x.shape)

    def score(self, x: Tensor, sigma: float) -> Tensor:
        """grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
        return (self(x, sigma) - x) / sigma**2

    # -- the true distribution -----------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0) -> Tensor:
        """n draws of y (or of y + sigma * noise), shape [n, d], float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = (self.stds[comp] ** 2 + sigma**2).sqrt()
        return self.means[comp] + std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def var(self, sigma: float = 0.0) -> Tensor:
        """Per-coordinate variance of the sigma-smoothed mixture."""
        second = (self.weights[:, None] * (self.means**2 + self.stds**2 + sigma**2)).sum(0)
        return second - self.mean() ** 2

    def cdf(self, x: Tensor, sigma: float = 0.0) -> Tensor:
        """CDF of the sigma-smoothed mixture (1-D only), float64."""
        self._require_1d("cdf")
        x = torch.as_tensor(x, dtype=torch.float64)
        std = (self.stds[:, 0] ** 2 + sigma**2).sqrt()
        z = (x[..., None] - self.means[:, 0]) / std
        return (self.weights * 0.5 * torch.erfc(-z / math.sqrt(2.0))).sum(-1)

    def quantile(self, u: Tensor, sigma: float = 0.0, iters: int = 100) -> Tensor:
        """Inverse CDF of the sigma-smoothed mixture (1-D only) by bisection, float64."""
        self._require_1d("quantile")
        u = torch.as_tensor(u, dtype=torch.float64)
        std = float((self.stds[:, 0] ** 2 + sigma**2).sqrt().max())
        lo = torch.full_like(u, float(self.means.min()) - 40 * std)
        hi = torch.full_like(u, float(self.means.max()) + 40 * std)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid, sigma) < u
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def w1_to(self, samples: Tensor) -> float:
        """Wasserstein-1 distance between 1-D samples and this mixture (sigma=0), via the quantile coupling:
        mean_i |x_(i) - F^-1((i - 1/2) / n)|, which converges to W1 as n grows."""
        self._require_1d("w1_to")
        xs = torch.sort(torch.as_tensor(samples, dtype=torch.float64).reshape(-1)).values
        n = xs.shape[0]
        q = self.quantile((torch.arange(n, dtype=torch.float64) + 0.5) / n)
        return float((xs - q).abs().mean())

    def _require_1d(self, what: str) -> None:
        if self.dim != 1:
            raise ValueError(f"{what} is only implemented for 1-D mixtures (this one is {self.dim}-D)")
