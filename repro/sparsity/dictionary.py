"""Dictionary learning with L1 codes: alternate FISTA codes and a dictionary update.

The paper's dictionary-learning procedure is not known (sparsity.md §1b); this is a standard online
scheme in the style of Mairal et al. (2009, "Online dictionary learning for sparse coding"):

1. draw a minibatch, code it with FISTA against the current dictionary (penalty ``lam``);
2. accumulate the sufficient statistics ``A = sum C^T C`` ([m, m]) and ``B = sum C^T X`` ([m, d]),
   with a forgetting factor so that early, poor codes fade out;
3. one pass of block coordinate descent over the atoms, which minimises the surrogate
   ``0.5 tr(D^T A D) - tr(D^T B)`` atom by atom, then renormalises each atom to unit norm
   (the metrics need unit-norm atoms so that ``||c||_1`` counts feature "mass");
4. atoms that have gone unused (their diagonal of ``A`` is tiny compared with the others) are
   "dead": they are re-seeded on the worst-reconstructed samples of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from repro.sparsity.fista import fista

__all__ = ["learn_dictionary", "normalize_atoms", "mean_max_cosine_similarity"]


def normalize_atoms(D: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows get a tiny norm floor rather than NaNs)."""
    return D / torch.clamp(D.norm(dim=1, keepdim=True), min=1e-12)


def mean_max_cosine_similarity(D_learned: Tensor, D_true: Tensor) -> float:
    """MMCS: for each true atom, the best |cosine| with a learned atom, averaged (Sharkey et al. 2022)."""
    cos = normalize_atoms(D_true.double()) @ normalize_atoms(D_learned.double().to(D_true.device)).T
    return float(cos.abs().max(dim=1).values.mean())


def _initial_dictionary(X: Tensor, n_atoms: int, init: str, generator: torch.Generator) -> Tensor:
    n, d = X.shape
    if init == "data":
        # Distinct random samples (with repeats only if there are fewer samples than atoms), plus a
        # little noise so that repeated or collinear samples do not start as identical atoms.
        idx = torch.randperm(n, generator=generator)[:n_atoms]
        if idx.numel() < n_atoms:
            idx = torch.cat([idx, torch.randint(n, (n_atoms - idx.numel(),), generator=generator)])
        D = X[idx.to(X.device)].clone()
        noise = torch.randn(n_atoms, d, generator=generator, dtype=X.dtype).to(X.device)
        D = normalize_atoms(D) + 0.01 * noise / math.sqrt(d)
    elif init == "random":
        D = torch.randn(n_atoms, d, generator=generator, dtype=X.dtype).to(X.device)
    else:
        raise ValueError(f"learn_dictionary: init must be 'data' or 'random', not {init!r}")
    return normalize_atoms(D)


def learn_dictionary(
    X: Tensor,
    n_atoms: int,
    lam: float,
    n_steps: int,
    batch_size: int = 1024,
    seed: int = 0,
    init: str = "data",
    inner_iter: int = 200,
    positive: bool = False,
    forget: float | None = None,
    dead_threshold: float = 1e-3,
    progress=None,
    D_init: Tensor | None = None,
) -> Tensor:
    """Learn ``n_atoms`` unit-norm atoms ``[n_atoms, d]`` for data ``X [n, d]`` with L1 penalty ``lam``.

    Args:
        n_steps: number of minibatch updates.
        batch_size: samples per minibatch (clipped to n; when n <= batch_size every step sees all data).
        init: ``"data"`` (normalised random samples) or ``"random"`` (Gaussian directions).
        inner_iter: FISTA iterations per minibatch (codes are warm-started nowhere: each batch is new).
        forget: forgetting factor for the statistics; default ``1 - 1/(steps seen + 1)`` style decay
            (Mairal's ``(t - 1)/t``-type weighting, capped so old batches keep some weight).
        dead_threshold: an atom whose usage ``A_jj`` falls below this fraction of the mean usage is re-seeded.
        progress: optional ``callable(iterable, total=, desc=)`` (e.g. ``ctx.progress`` or tqdm).
        D_init: continue from this dictionary ``[n_atoms, d]`` instead of ``init`` (statistics restart).

    Deterministic for a given seed, device and dtype. Scale-equivariant: learning on ``s*X`` with
    ``s*lam`` returns the same dictionary (up to float rounding), which the scale-invariant metrics rely on.
    """
    if X.ndim != 2:
        raise ValueError(f"learn_dictionary: X must be [n, d], got {tuple(X.shape)}")
    if n_atoms < 1 or n_steps < 0:
        raise ValueError("learn_dictionary: n_atoms must be >= 1 and n_steps >= 0")
    generator = torch.Generator().manual_seed(seed)
    n, d = X.shape
    batch_size = min(batch_size, n)
    if D_init is not None:
        if tuple(D_init.shape) != (n_atoms, d):
            raise ValueError(f"learn_dictionary: D_init must be [{n_atoms}, {d}], got {tuple(D_init.shape)}")
        D = normalize_atoms(D_init.to(device=X.device, dtype=X.dtype).clone())
    else:
        D = _initial_dictionary(X, n_atoms, init, generator)
    A = torch.zeros(n_atoms, n_atoms, dtype=X.dtype, device=X.device)
    B = torch.zeros(n_atoms, d, dtype=X.dtype, device=X.device)

    steps = range(n_steps)
    if progress is not None:
        steps = progress(steps, total=n_steps, desc="dictionary learning")
    for step_index in steps:
        if batch_size == n:
            batch = X
        else:
            idx = torch.randint(n, (batch_size,), generator=generator).to(X.device)
            batch = X[idx]
        codes = fista(batch, D, lam, n_iter=inner_iter, tol=1e-4, positive=positive).codes

        # Old statistics were computed with worse dictionaries: down-weight them.
        beta = forget if forget is not None else min(1.0 - 1.0 / (step_index + 2), 0.98)
        A = beta * A + codes.T @ codes / batch_size
        B = beta * B + codes.T @ batch / batch_size

        # Block coordinate descent on the surrogate, one pass over the atoms.
        usage = torch.diagonal(A).clone()
        for j in range(n_atoms):
            if usage[j] <= 1e-12:
                continue
            D[j] = D[j] + (B[j] - A[j] @ D) / usage[j]
            D[j] = D[j] / torch.clamp(D[j].norm(), min=1e-12)

        dead = usage < dead_threshold * torch.clamp(usage.mean(), min=1e-30)
        if bool(dead.any()) and step_index < n_steps - 1:
            D, A, B = _reseed_dead_atoms(batch, D, codes, dead, A, B)
    return normalize_atoms(D)


def _reseed_dead_atoms(batch: Tensor, D: Tensor, codes: Tensor, dead: Tensor, A: Tensor, B: Tensor):
    """Point dead atoms at the residuals of the worst-reconstructed samples and reset their statistics."""
    dead_idx = torch.nonzero(dead).flatten()
    residual = batch - codes @ D
    worst = torch.argsort(residual.pow(2).sum(1), descending=True)[: dead_idx.numel()]
    new_atoms = normalize_atoms(residual[worst])
    k = new_atoms.shape[0]
    D = D.clone()
    D[dead_idx[:k]] = new_atoms
    A = A.clone()
    B = B.clone()
    A[dead_idx[:k]] = 0
    A[:, dead_idx[:k]] = 0
    B[dead_idx[:k]] = 0
    return D, A, B
