"""Fréchet distance between two Gaussians, in float64.

FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Two ways to get Tr((S1 S2)^{1/2}) are offered because the papers' tools differ and the choice moves
FID in the later digits:

- ``"sqrtm"``: ``scipy.linalg.sqrtm`` of S1 S2, as in TTUR, pytorch-fid, clean-fid and EDM's fid.py
  (with clean-fid's fallback of adding ``eps`` to the diagonals when the product is singular).
- ``"eigvals"``: sum of square roots of the eigenvalues of S1 S2, as in torch-fidelity >= 0.4.0.
  The eigenvalues of S1 S2 equal those of S1^{1/2} S2 S1^{1/2}, which is PSD, so they are real and
  non-negative up to round-off.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

METHODS = ("sqrtm", "eigvals")


def _as_float64(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_2d(np.asarray(sigma, dtype=np.float64))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "sqrtm", eps: float = 1e-6) -> float:
    """Tr((sigma1 @ sigma2)^{1/2}) in float64 by the chosen method."""
    product = sigma1 @ sigma2
    if method == "eigvals":
        eig = np.linalg.eigvals(product).astype(np.complex128)
        return float(np.sum(np.sqrt(eig)).real)
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(product)
        if not np.isfinite(covmean).all():
            # A singular product (fewer samples than dimensions) can make sqrtm fail; regularise like clean-fid.
            warnings.warn(f"singular covariance product in Fréchet distance; adding {eps} to the diagonals", stacklevel=3)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.max(np.abs(np.diagonal(covmean).imag))
            if imag > 1e-3:
                raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g})")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise ValueError(f"unknown Fréchet method '{method}' (choose one of {METHODS})")


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = "sqrtm", eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, sigma1 = _as_float64(mu1, sigma1)
    mu2, sigma2 = _as_float64(mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances must be {mu1.shape[0]}x{mu1.shape[0]}: got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, method=method, eps=eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples) in float64, as every FID tool computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need a [N>=2, D] feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray, method: str = "sqrtm") -> float:
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
