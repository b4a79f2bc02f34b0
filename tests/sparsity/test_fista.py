"""FISTA against independent references: scikit-learn's Lasso (coordinate descent) and duality gaps."""

from __future__ import annotations

import pytest
import torch

from repro.sparsity.fista import fista, fista_working_set, lasso_duality_gap, lasso_objective, lipschitz_constant
from repro.sparsity.synthetic import make_sparse_linear


def _problem(n=64, d=32, m=96, a=4, seed=0, dtype=torch.float64):
    X, D, _ = make_sparse_linear(n, d, m, a, seed=seed)
    return X.to(dtype), D.to(dtype)


@pytest.mark.parametrize("lam", [0.01, 0.1])
def test_matches_sklearn_lasso(lam):
    """Same per-sample objective as sklearn's coordinate-descent Lasso run to tight convergence.

    sklearn's Lasso minimises (1/(2 n_rows))||y - Aw||^2 + alpha||w||_1; with the d coordinates of
    one sample as rows, alpha = lam / d gives our objective divided by d (same minimiser)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, D = _problem()
    ours = fista(X, D, lam, n_iter=20000, tol=1e-10)
    d = X.shape[1]
    ref = torch.stack([
        torch.from_numpy(
            linear_model.Lasso(alpha=lam / d, fit_intercept=False, tol=1e-12, max_iter=100000)
            .fit(D.T.numpy(), x.numpy()).coef_
        )
        for x in X
    ])
    ref_obj = lasso_objective(X, D, ref, lam)
    rel = ((ours.objective - ref_obj) / ref_obj).abs().max().item()
    assert rel < 1e-6, rel
    # Strictly convex enough here that the codes agree too.
    assert (ours.codes - ref).abs().max().item() < 1e-4


def test_duality_gap_certifies_convergence():
    X, D = _problem(n=128, a=8, seed=3)
    lam = 0.01
    result = fista(X, D, lam, n_iter=20000, tol=1e-10)
    gap = lasso_duality_gap(X, D, result.codes, lam)
    assert bool(result.converged.all())
    assert (gap >= -1e-12).all()
    assert (gap / result.objective).max().item() < 1e-6
    # A truncated run is measurably worse: the certificate can fail.
    early = fista(X, D, lam, n_iter=3, tol=0.0)
    early_gap = lasso_duality_gap(X, D, early.codes, lam)
    assert (early_gap / early.objective).max().item() > 1e-3


@pytest.mark.parametrize("positive", [False, True])
def test_backtracking_reaches_same_optimum(positive):
    X, D = _problem(seed=1)
    lam = 0.05
    fixed = fista(X, D, lam, n_iter=20000, tol=1e-10, positive=positive)
    back = fista(X, D, lam, n_iter=20000, tol=1e-10, step="backtracking", positive=positive)
    rel = ((back.objective - fixed.objective) / fixed.objective).abs().max().item()
    assert rel < 1e-6, rel
    if positive:
        assert (fixed.codes >= 0).all() and (back.codes >= 0).all()
        assert lasso_duality_gap(X, D, fixed.codes, lam, positive=True).max().item() < 1e-6


def test_gram_and_residual_layouts_agree():
    """m <= 2d uses the Gram matrix, m > 2d the residual: both must reach the same optimum."""
    X, D = _problem(n=32, d=32, m=60, seed=2)  # Gram layout
    lam = 0.02
    gram = fista(X, D, lam, n_iter=20000, tol=1e-10)
    wide = torch.cat([D, D[:10] * -1.0 + 0.3 * D[10:20]])  # 70 atoms -> residual layout
    wide = wide / wide.norm(dim=1, keepdim=True)
    res = fista(X, wide, lam, n_iter=20000, tol=1e-10)
    for out, dictionary in ((gram, D), (res, wide)):
        gap = lasso_duality_gap(X, dictionary, out.codes, lam)
        assert (gap / out.objective).max().item() < 1e-6


def test_warm_start_and_float32():
    X, D = _problem(seed=4, dtype=torch.float32)
    lam = 0.02
    cold = fista(X, D, lam, n_iter=5000, tol=1e-6)
    warm = fista(X, D, lam, n_iter=5000, tol=1e-6, C0=cold.codes)
    assert warm.n_iter < cold.n_iter
    rel = ((warm.objective - cold.objective) / cold.objective).abs().max().item()
    assert rel < 1e-4
    assert cold.codes.dtype == torch.float32


def test_lipschitz_constant_is_spectral_norm_squared():
    _, D = _problem()
    assert lipschitz_constant(D) == pytest.approx(torch.linalg.matrix_norm(D, ord=2).item() ** 2, rel=1e-10)


def test_zero_codes_when_lambda_exceeds_max_correlation():
    X, D = _problem()
    lam_max = (X @ D.T).abs().max().item()
    result = fista(X, D, lam_max * 1.01)
    assert result.codes.abs().max().item() == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        fista(torch.zeros(3, 4), torch.zeros(5, 6), 0.1)


@pytest.mark.parametrize("n", [48, 96])  # 48: blocks from the atoms, no G; 96: G = D D^T (n >= m / 2.5)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("max_rounds", [12, 2, 1])
def test_working_set_solver_reaches_same_optimum(n, positive, max_rounds):
    """Working sets change the path, not the answer; max_rounds=1 (only the loose scouting round) and 2
    exercise the plain-FISTA fallback."""
    X, D = _problem(n=n, d=32, m=200, a=6, seed=5)
    lam = 0.02
    dense = fista(X, D, lam, n_iter=20000, tol=1e-10, positive=positive)
    ws = fista_working_set(X, D, lam, n_iter=20000, tol=1e-10, positive=positive, ws_size=8, ws_grow=4,
                           max_rounds=max_rounds)
    rel = ((ws.objective - dense.objective) / dense.objective).abs().max().item()
    assert rel < 1e-7, rel
    assert bool(ws.converged.all())
    gap = lasso_duality_gap(X, D, ws.codes, lam, positive=positive)
    assert (gap / ws.objective).max().item() < 1e-6


@pytest.mark.parametrize("n", [24, 160])  # without / with the full Gram matrix (m = 384)
def test_working_set_matches_sklearn_sparse_coder(n):
    """The benchmark's comparison at a reduced size: sklearn's SparseCoder(lasso_cd), whose objective is
    ours divided by d with transform_alpha = lam, in float32 for us as in the benchmark."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    X, D, _ = make_sparse_linear(n, 96, 384, 8, seed=7)
    lam = 0.05
    ours = fista_working_set(X, D, lam, n_iter=10000, tol=1e-6)
    assert ours.codes.dtype == torch.float32 and bool(ours.converged.all())
    coder = decomposition.SparseCoder(dictionary=D.double().numpy(), transform_algorithm="lasso_cd", transform_alpha=lam,
                                      transform_max_iter=10000)
    ref = torch.from_numpy(coder.transform(X.double().numpy()))
    ours_obj = lasso_objective(X.double(), D.double(), ours.codes.double(), lam)
    ref_obj = lasso_objective(X.double(), D.double(), ref, lam)
    assert abs(float(ours_obj.sum() / ref_obj.sum()) - 1.0) < 1e-6
    assert ((ours_obj - ref_obj) / ref_obj).abs().max().item() < 1e-5
    # The objective it reports is its own (computed from sparse codes), in float32 precision.
    assert torch.allclose(ours.objective.double(), ours_obj, rtol=1e-5)
    # Same support, up to atoms whose codes are at float32 noise level.
    assert ((ours.codes.double() - ref).abs() > 1e-3).sum().item() == 0
    # Flop count: at least the dense product X D^T, at most what the dense solver would do per iteration.
    m, d = D.shape
    assert 2.0 * n * m * d <= ours.flops < 2.0 * n * m * d + 2.0 * m * m * d + 200 * n * m * d


def test_working_set_edge_cases():
    X, D = _problem(n=16, d=16, m=40, a=3, seed=8)
    lam = 0.02
    # Working sets as large as the dictionary: the dense solver is used, same answer.
    full = fista_working_set(X, D, lam, n_iter=20000, tol=1e-10, ws_size=40)
    dense = fista(X, D, lam, n_iter=20000, tol=1e-10)
    assert torch.allclose(full.codes, dense.codes)
    # No samples.
    empty = fista_working_set(X[:0], D, lam)
    assert empty.codes.shape == (0, 40) and empty.objective.shape == (0,)
    # lam above every correlation: all codes zero, in one round.
    lam_max = (X @ D.T).abs().max().item()
    zero = fista_working_set(X, D, lam_max * 1.01, ws_size=4, ws_grow=2)
    assert zero.codes.abs().max().item() == 0.0 and bool(zero.converged.all())
    with pytest.raises(ValueError):
        fista_working_set(torch.zeros(3, 4), torch.zeros(5, 6), 0.1)
