"""Synthetic sparse-linear data and control distributions.

Sparse-linear data follows the paper's description as relayed by an ICLR 2024 reviewer (sparsity.md
§1c): every sample has exactly ``a`` active features with U(0, 1) coefficients, so the target of an
L1-type sparsity metric is ``a/2``. The number of ground-truth features, the distribution of their
directions, noise and the number of samples are not known; here feature directions are i.i.d.
Gaussian directions normalised to unit norm (nearly orthogonal, uncorrelated features), the
default number of features is chosen by the caller, and noise is isotropic Gaussian.

Controls (the paper confirms only a Gaussian control; the others are our choices, sparsity.md §1d):

* ``"gaussian_matched"``: Gaussian with the same mean and covariance as X. Dense and
  rotation-invariant up to its covariance: the main negative control.
* ``"shuffled"``: every coordinate permuted independently across samples. Keeps each coordinate's
  marginal distribution exactly but destroys the joint (sparse) structure: negative control.
* ``"uniform_matched"``: i.i.d. uniform variables (zero mean, unit variance), coloured to the mean and
  covariance of X. Dense with light tails: negative control.
* ``"laplace_dense"``: i.i.d. Laplace variables coloured to the mean and covariance of X. Dense but
  heavy-tailed, so it separates "sparse" from merely "kurtotic": negative control.
* ``"permuted_dims"``: one random permutation of the coordinates applied to every sample. The data
  stay sparse-linear in a permuted basis; metrics with a learned dictionary must not change:
  positive control.
* ``"rotated"``: one random orthogonal rotation applied to every sample; like ``permuted_dims`` but
  also mixes coordinates: positive control (the metrics are basis-free).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["make_sparse_linear", "make_control", "CONTROL_KINDS", "random_unit_directions"]

CONTROL_KINDS = ("gaussian_matched", "shuffled", "uniform_matched", "laplace_dense", "permuted_dims", "rotated")


def random_unit_directions(n_features: int, d: int, generator: torch.Generator) -> Tensor:
    """``[n_features, d]`` i.i.d. uniformly distributed unit vectors (normalised Gaussians)."""
    D = torch.randn(n_features, d, generator=generator, dtype=torch.float64)
    return (D / D.norm(dim=1, keepdim=True)).float()


def make_sparse_linear(
    n: int,
    d: int,
    n_features: int,
    a: int,
    noise: float = 0.0,
    seed: int = 0,
    coef: str = "uniform",
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse-linear data ``X = C @ D_true + noise``.

    Every sample has exactly ``a`` distinct active features chosen uniformly among ``n_features``;
    active coefficients are U(0, 1) (``coef="uniform"``, target ``a/2``) or exactly 1
    (``coef="ones"``, target ``a``). ``noise`` is the expected L2 norm of the additive isotropic
    Gaussian noise per sample (per-coordinate std ``noise/sqrt(d)``).

    Returns ``(X [n, d], D_true [n_features, d] unit rows, C_true [n, n_features])``, float32, CPU.
    """
    if not 0 <= a <= n_features:
        raise ValueError(f"make_sparse_linear: need 0 <= a <= n_features, got a={a}, n_features={n_features}")
    generator = torch.Generator().manual_seed(seed)
    D_true = random_unit_directions(n_features, d, generator)
    # Exactly a distinct features per sample: the first a entries of a random permutation per row.
    active = torch.rand(n, n_features, generator=generator).argsort(dim=1)[:, :a]
    if coef == "uniform":
        values = torch.rand(n, a, generator=generator)
    elif coef == "ones":
        values = torch.ones(n, a)
    else:
        raise ValueError(f"make_sparse_linear: coef must be 'uniform' or 'ones', not {coef!r}")
    C_true = torch.zeros(n, n_features).scatter_(1, active, values)
    X = C_true @ D_true
    if noise > 0:
        X = X + torch.randn(n, d, generator=generator) * (noise / math.sqrt(d))
    return X, D_true, C_true


def _mean_and_colouring(X: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and a matrix ``M`` with ``M^T M = cov(X)`` (symmetric square root: works when cov is singular)."""
    X64 = X.double()
    mean = X64.mean(0)
    centred = X64 - mean
    cov = centred.T @ centred / max(X.shape[0] - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    root = eigenvectors @ torch.diag(torch.clamp(eigenvalues, min=0.0).sqrt()) @ eigenvectors.T
    return mean, root


def make_control(kind: str, X: Tensor, seed: int = 0) -> Tensor:
    """A control data set with the same shape as X (see the module docstring for each kind)."""
    generator = torch.Generator().manual_seed(seed)
    n, d = X.shape
    if kind == "gaussian_matched":
        mean, root = _mean_and_colouring(X)
        Z = torch.randn(n, d, generator=generator, dtype=torch.float64).to(X.device)
        return (mean + Z @ root).to(X.dtype)
    if kind == "uniform_matched":
        mean, root = _mean_and_colouring(X)
        Z = ((torch.rand(n, d, generator=generator, dtype=torch.float64) - 0.5) * math.sqrt(12.0)).to(X.device)
        return (mean + Z @ root).to(X.dtype)
    if kind == "laplace_dense":
        mean, root = _mean_and_colouring(X)
        u = (torch.rand(n, d, generator=generator, dtype=torch.float64) - 0.5).to(X.device)
        # Inverse CDF of the Laplace law with scale 1/sqrt(2), i.e. unit variance.
        Z = -torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-12)) / math.sqrt(2.0)
        return (mean + Z @ root).to(X.dtype)
    if kind == "shuffled":
        order = torch.rand(n, d, generator=generator).argsort(dim=0).to(X.device)
        return torch.gather(X, 0, order)
    if kind == "permuted_dims":
        perm = torch.randperm(d, generator=generator).to(X.device)
        return X[:, perm]
    if kind == "rotated":
        Q, R = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed rotation
        return (X.double() @ Q.to(X.device)).to(X.dtype)
    raise ValueError(f"make_control: unknown kind {kind!r}; choose one of {', '.join(CONTROL_KINDS)}")
