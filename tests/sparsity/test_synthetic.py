"""Synthetic sparse-linear data and controls."""

from __future__ import annotations

import pytest
import torch

from repro.sparsity.synthetic import CONTROL_KINDS, make_control, make_sparse_linear


def test_exactly_a_active_uniform_coefficients():
    X, D, C = make_sparse_linear(2000, 16, 40, 5, seed=0)
    assert X.shape == (2000, 16) and D.shape == (40, 16) and C.shape == (2000, 40)
    assert torch.allclose(D.norm(dim=1), torch.ones(40), atol=1e-6)
    assert ((C != 0).sum(1) == 5).all()
    active = C[C != 0]
    assert active.min() >= 0 and active.max() <= 1
    assert active.mean().item() == pytest.approx(0.5, abs=0.01)  # U(0,1) -> a/2 per sample
    assert C.abs().sum(1).mean().item() == pytest.approx(2.5, rel=0.02)
    assert torch.allclose(X, C @ D, atol=1e-5)


def test_deterministic_per_seed_and_noise_level():
    X1, _, _ = make_sparse_linear(100, 8, 20, 3, seed=7)
    X2, _, _ = make_sparse_linear(100, 8, 20, 3, seed=7)
    X3, _, _ = make_sparse_linear(100, 8, 20, 3, seed=8)
    assert torch.equal(X1, X2) and not torch.equal(X1, X3)
    Xn, D, C = make_sparse_linear(4000, 64, 128, 3, noise=0.5, seed=1)
    noise_norm = (Xn - C @ D).norm(dim=1).mean().item()
    assert noise_norm == pytest.approx(0.5, rel=0.05)


def test_ones_coefficients():
    _, _, C = make_sparse_linear(50, 8, 20, 4, coef="ones")
    assert (C.sum(1) == 4).all()


@pytest.mark.parametrize("kind", ["gaussian_matched", "uniform_matched", "laplace_dense"])
def test_matched_controls_keep_mean_and_covariance(kind):
    X, _, _ = make_sparse_linear(20000, 8, 16, 2, seed=0)
    Y = make_control(kind, X, seed=1)
    assert Y.shape == X.shape
    assert torch.allclose(Y.mean(0), X.mean(0), atol=0.03)
    cov_x, cov_y = torch.cov(X.T), torch.cov(Y.T)
    assert (cov_x - cov_y).abs().max().item() < 0.05 * cov_x.abs().max().item()
    # ...but are not sparse-linear copies of X: no row of Y equals a row of X.
    assert not torch.allclose(Y[:10], X[:10])


def test_shuffled_keeps_marginals_breaks_rows():
    X, _, _ = make_sparse_linear(500, 8, 16, 2, seed=0)
    Y = make_control("shuffled", X, seed=0)
    assert torch.equal(Y.sort(0).values, X.sort(0).values)
    assert (Y != X).any(dim=1).float().mean() > 0.9


def test_positive_controls_are_isometries():
    X, _, _ = make_sparse_linear(100, 8, 16, 2, seed=0)
    for kind in ("permuted_dims", "rotated"):
        Y = make_control(kind, X, seed=3)
        assert torch.allclose(Y.norm(dim=1), X.norm(dim=1), atol=1e-5)
        assert torch.allclose(Y @ Y.T, X @ X.T, atol=1e-4)
        assert not torch.allclose(Y, X)


def test_every_listed_control_runs_and_unknown_raises():
    X, _, _ = make_sparse_linear(64, 8, 16, 2, seed=0)
    for kind in CONTROL_KINDS:
        assert make_control(kind, X).shape == X.shape
    with pytest.raises(ValueError):
        make_control("nope", X)


class _StubContext:
    """The few ctx members the kind uses (see docs/architecture.md)."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.extra, self.work = {}, {}

    def progress(self, iterable, total=None, desc=None):
        return iterable

    def record_work(self, **counts):
        self.work.update(counts)

    def record_extra(self, name, value):
        self.extra[name] = value


def _cell(**params):
    from types import SimpleNamespace

    settings = {"n_samples": 300, "n_iter": 300, "tol": 1e-4, "dict_steps": 8, "dict_batch_size": 300,
                "dict_inner_iter": 20, "lams": [0.03]}
    return SimpleNamespace(params=params, settings=settings, seed=0, scale="smoke")


def test_synthetic_kind_runs_oracle_and_learned():
    from repro.kinds import KINDS, load_all_kinds
    from repro.sparsity.synthetic_experiments import run_synthetic

    load_all_kinds()
    assert KINDS.get("sparsity.synthetic").run is run_synthetic
    ctx = _StubContext()
    oracle = run_synthetic(_cell(d=32, a=4, dictionary="oracle"), ctx)
    assert oracle["target"] == 2.0 and oracle["mmcs"] == 1.0
    assert abs(oracle["rel_err_avg_coef_norm"]) < 0.15 and oracle["within_tol_avg_coef_norm"] == 1.0
    assert len(ctx.extra["lambda_sweep"]) == 1
    learned = run_synthetic(_cell(d=16, a=2, dictionary="learned"), _StubContext())
    assert 0.0 <= learned["mmcs"] <= 1.0 and learned["avg_coef_norm"] > 0
    with pytest.raises(ValueError):
        run_synthetic(_cell(d=16, a=2, dictionary="bogus"), _StubContext())


def test_plan_and_per_dimension_settings():
    from repro.sparsity.synthetic_experiments import plan_synthetic

    cell = _cell(d=64, a=8, dictionary="learned")
    cell.settings["n_samples"] = {"64": 1000, "512": 10}
    plan = plan_synthetic(cell)
    assert plan["samples"] == 1000 and plan["train_steps"] == 8 and plan["est_seconds"] > 0


def test_saturation_point_uses_first_failure():
    from repro.sparsity.synthetic_experiments import saturation_point

    points = [(1, 0.5), (2, 1.05), (4, 1.9), (8, 2.0), (16, 8.0)]  # a=8 misses (2.0 vs 4.0)
    assert saturation_point(points) == 4
    assert saturation_point([(2, 0.1)]) is None
    assert saturation_point([(2, 1.0), (4, 2.1)], rel_tol=0.01) == 2
