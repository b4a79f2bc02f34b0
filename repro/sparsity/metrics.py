"""Feature-sparsity metrics of Deng, Tao & Benton (2023) -- a RECONSTRUCTION, not the paper's formulas.

What is known (sparsity.md §1a): the paper proposes "normalized loss" and "average coefficient norm",
compares them with the baselines "non-zero entries" (L0) and "final loss value", requires a metric to
be invariant to uniform scaling of all activations, and scores synthetic data with ``a`` active
features and U(0, 1) coefficients against the target ``a/2``. The formulas themselves are NOT known.

Reconstruction used here (sparsity.md §1a, unconfirmed): unit-norm atoms, codes from the Lasso
``min_c 0.5||x - cD||^2 + lam||c||_1``, and

* ``avg_coef_norm``   = mean over samples of ``||c||_1``, in coefficient units (below);
* ``normalized_loss`` = mean final objective divided by ``lam``, in the same units; as lam -> 0 it
  tends to the minimum-L1 exact representation, i.e. also ~``a/2`` when L1 recovery works;
* ``l0``              = mean number of non-zero code entries (baseline; scale-invariant, but counts
  every small spurious coefficient);
* ``final_loss``      = mean final objective in the units of X (baseline; NOT scale-invariant: it
  scales with s^2 when X -> s X, which is the paper's argument against it);
* ``fvu``             = fraction of variance unexplained by the reconstruction (diagnostic).

Scale normalisation (our choice; the paper's is not known). ``normalize="coef_quantile"`` (default):

1. divide X by its RMS norm ``sigma = sqrt(mean ||x||^2)``;
2. code with ``lam`` and measure the coefficient scale ``kappa`` = the ``coef_quantile`` quantile
   (default 0.99) over samples of the largest |coefficient| of each sample;
3. re-code with the penalty ``lam * kappa`` (warm start) and re-measure ``kappa``; report
   ``||c||_1 / kappa`` and ``objective / (lam_used * kappa)``.

Why: the Lasso is positively homogeneous -- codes of ``s X`` with penalty ``s lam`` are ``s`` times
the codes of X -- so measuring coefficients in units of the typical *largest* feature activation makes
every metric exactly invariant to ``X -> s X``, and ``lam`` becomes a fraction of that activation
(independent of how many features overlap). It also calibrates the units to the synthetic ground
truth: with U(0, 1) coefficients the largest activation is ~1, so ``||c||_1 / kappa ~ a/2``. On real
activations the metric reads "effective number of fully-active features per token".
``normalize="rms"`` stops after step 1 (invariant, but in units of the RMS norm, so not comparable to
a/2); ``normalize="none"`` uses X and ``lam`` as given (not invariant; for demonstrations).

Dictionary: the true one when known (synthetic "oracle" mode), otherwise learned on X itself with
:func:`repro.sparsity.dictionary.learn_dictionary` (the realistic mode, used for LM activations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from repro.sparsity.dictionary import learn_dictionary, normalize_atoms
from repro.sparsity.fista import fista

__all__ = ["sparsity_metrics", "lambda_sweep", "measure_sparsity", "SparsityResult", "NORMALIZATIONS"]

NORMALIZATIONS = ("coef_quantile", "rms", "none")


@dataclass
class SparsityResult:
    metrics: dict[str, float]
    codes: Tensor  # [n, m], in the units of the normalised X (divide by kappa for coefficient units)
    dictionary: Tensor  # [m, d], unit-norm atoms
    details: dict = field(default_factory=dict)


def _coefficient_scale(codes: Tensor, quantile: float) -> float:
    per_sample_max = codes.abs().max(dim=1).values.double()
    return float(torch.quantile(per_sample_max, quantile))


def measure_sparsity(
    X: Tensor,
    D: Tensor | None = None,
    lam: float = 0.01,
    n_atoms: int | None = None,
    normalize: str = "coef_quantile",
    seed: int = 0,
    *,
    n_iter: int = 1000,
    tol: float = 1e-5,
    positive: bool = False,
    coef_quantile: float = 0.99,
    l0_threshold: float = 1e-6,
    dict_steps: int = 200,
    dict_batch_size: int = 1024,
    dict_inner_iter: int = 100,
    dict_init: str = "data",
    dict_lam: float | None = None,
    progress: Callable | None = None,
) -> SparsityResult:
    """Metrics plus the codes and dictionary behind them. See the module docstring (reconstruction).

    Args:
        X: activations ``[n, d]`` (any float dtype; computed in float32 unless X is float64).
        D: dictionary ``[m, d]`` (rows are renormalised to unit norm) or None to learn ``n_atoms`` atoms.
        lam: L1 penalty, relative: a fraction of the coefficient scale ``kappa`` ("coef_quantile"),
            of the RMS norm ("rms"), or absolute ("none").
        l0_threshold: an entry counts as non-zero when ``|c| > l0_threshold * kappa``.
        dict_steps, dict_batch_size, dict_inner_iter, dict_init: dictionary learning (when D is None);
            a quarter of the steps use the RMS-relative penalty, the rest the calibrated one.
        dict_lam: relative penalty for dictionary learning (default ``lam``); a larger penalty than the
            coding one usually recovers atoms better, while a small coding penalty biases ``||c||_1`` less.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"sparsity_metrics: normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"sparsity_metrics: X must be [n >= 2, d], got {tuple(X.shape)}")
    if not lam > 0:
        raise ValueError("sparsity_metrics: lam must be > 0")
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    rms = float(X.double().pow(2).sum(1).mean().sqrt())
    if rms == 0.0:
        raise ValueError("sparsity_metrics: X is all zeros")
    data_scale = 1.0 if normalize == "none" else rms
    Xn = X / data_scale

    def code(dictionary: Tensor, penalty: float, warm: Tensor | None):
        return fista(Xn, dictionary, penalty, n_iter=n_iter, tol=tol, C0=warm, positive=positive)

    def learn(penalty: float, steps: int, start: Tensor | None) -> Tensor:
        if n_atoms is None:
            raise ValueError("sparsity_metrics: give a dictionary D or n_atoms to learn one")
        return learn_dictionary(
            Xn, n_atoms, penalty, steps, batch_size=dict_batch_size, seed=seed, init=dict_init,
            inner_iter=dict_inner_iter, positive=positive, progress=progress, D_init=start,
        )

    learned = D is None
    learn_lam = lam if dict_lam is None else dict_lam
    if learned:
        first_steps = dict_steps // 4 if normalize == "coef_quantile" else dict_steps
        dictionary = learn(learn_lam, first_steps, None)
    else:
        dictionary = normalize_atoms(D.to(device=Xn.device, dtype=Xn.dtype))

    kappa = 1.0
    penalty = lam
    result = code(dictionary, penalty, None)
    if normalize == "coef_quantile":
        kappa = _coefficient_scale(result.codes, coef_quantile)
        if kappa <= 0.0:
            raise ValueError(f"sparsity_metrics: lam={lam} zeroes every code; use a smaller lam")
        penalty = lam * kappa
        if learned:
            dictionary = learn(learn_lam * kappa, dict_steps - dict_steps // 4, dictionary)
            result = code(dictionary, penalty, None)
        else:
            result = code(dictionary, penalty, result.codes)
        kappa = _coefficient_scale(result.codes, coef_quantile)
        if kappa <= 0.0:
            raise ValueError(f"sparsity_metrics: lam={lam} zeroes every code; use a smaller lam")

    codes = result.codes
    residual = Xn - codes @ dictionary
    centred = Xn - Xn.mean(0)
    l1 = codes.abs().sum(1).double()
    objective = result.objective.double()
    metrics = {
        "l0": float((codes.abs() > l0_threshold * kappa).sum(1).double().mean()),
        "final_loss": float(objective.mean()) * data_scale**2,
        "normalized_loss": float(objective.mean()) / (penalty * kappa),
        "avg_coef_norm": float(l1.mean()) / kappa,
        "fvu": float(residual.double().pow(2).sum() / centred.double().pow(2).sum()),
        "lam": float(lam),
        "lam_abs": float(penalty * data_scale),
        "coef_scale": float(kappa * data_scale),
        "rms_norm": rms,
        "n_atoms": int(dictionary.shape[0]),
        "converged_frac": float(result.converged.double().mean()) if result.converged is not None else float("nan"),
        "fista_iters": int(result.n_iter),
    }
    details = {"normalize": normalize, "learned_dictionary": learned, "data_scale": data_scale}
    return SparsityResult(metrics=metrics, codes=codes, dictionary=dictionary, details=details)


def sparsity_metrics(
    X: Tensor,
    D: Tensor | None = None,
    lam: float = 0.01,
    n_atoms: int | None = None,
    normalize: str = "coef_quantile",
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """Reconstructed sparsity metrics of X (NOT the paper's exact formulas; see the module docstring).

    Keys: ``l0``, ``final_loss``, ``normalized_loss``, ``avg_coef_norm``, ``fvu``, ``lam`` (relative
    penalty given), ``lam_abs`` (penalty in the units of X), ``coef_scale`` (kappa in the units of X),
    ``rms_norm``, ``n_atoms``, ``converged_frac``, ``fista_iters``.
    With ``D=None`` a dictionary of ``n_atoms`` atoms is learned on X (keyword arguments
    ``dict_steps``, ``dict_batch_size``, ``dict_inner_iter``, ``dict_init``; see :func:`measure_sparsity`).
    """
    return measure_sparsity(X, D, lam, n_atoms, normalize, seed, **kwargs).metrics


def lambda_sweep(X: Tensor, D: Tensor | None, lams, **kwargs) -> list[dict[str, float]]:
    """:func:`sparsity_metrics` at each penalty in ``lams`` (same order). With ``D=None`` a dictionary
    is learned per penalty (pass ``n_atoms=``), since the learned dictionary depends on the penalty."""
    return [sparsity_metrics(X, D, lam=float(lam), **kwargs) for lam in lams]
