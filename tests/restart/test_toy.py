"""Tests for the Restart toy experiment (repro/restart/toy.py, repro/restart/toy_experiments.py)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from repro.restart import toy


def brute_force_w1(a: np.ndarray, b: np.ndarray) -> float:
    n = a.shape[0]
    return min(np.mean([np.linalg.norm(a[i] - b[p[i]]) for i in range(n)]) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n,dim,seed", [(1, 3, 0), (4, 2, 1), (6, 5, 2), (7, 20, 3)])
def test_w1_matching_equals_brute_force(n, dim, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + 0.5
    assert toy.w1_matching(a, b) == pytest.approx(brute_force_w1(a, b), rel=1e-12, abs=1e-12)


def test_w1_matching_large_path_matches_small_path_and_properties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    # the >256 path uses a different distance formula; both must agree
    cost = np.linalg.norm(a[:, None] - b[None], axis=-1)
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(cost)
    assert toy.w1_matching(a, b) == pytest.approx(cost[r, c].mean(), rel=1e-9)
    assert toy.w1_matching(a, a[rng.permutation(300)]) == pytest.approx(0.0, abs=1e-6)
    assert toy.w1_matching(a, a + np.array([3.0, 4.0, 0.0, 0.0])) == pytest.approx(5.0, rel=1e-9)  # a pure shift
    with pytest.raises(ValueError):
        toy.w1_matching(a, b[:10])


def test_toy_data_shape_scaling_and_population():
    data = toy.make_toy_data(seed=0)
    assert data.points.shape == (2000, 20)
    assert torch.allclose(data.points.std(dim=0), torch.ones(20, dtype=torch.float64), atol=1e-12)
    again = toy.make_toy_data(seed=0)
    assert torch.equal(data.points, again.points)
    assert not torch.equal(data.points, toy.make_toy_data(seed=1).points)
    # the data lie on the 4-d column space of the projection
    residual = data.points - data.points @ torch.linalg.pinv(data.projection).T @ data.projection.T
    assert residual.abs().max() < 1e-9
    # population draws have the same first two moments as the data set (up to sampling error)
    pop = toy.sample_population(data, 50_000, torch.Generator().manual_seed(5))
    assert torch.allclose(pop.mean(0), data.points.mean(0), atol=0.08)
    assert torch.allclose(pop.std(0), torch.ones(20, dtype=torch.float64), atol=0.05)
    # 30 % / 70 % mixture: the sign of the projection on the mean direction
    side = (pop @ data.means[0]) > 0
    assert float(side.double().mean()) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("sigma", [0.6, 1.25, 2.5])
def test_exact_denoiser_matches_monte_carlo_posterior_mean(sigma):
    data = toy.make_toy_data(seed=0)
    den = toy.exact_denoiser(data)
    gen = torch.Generator().manual_seed(11)
    queries = toy.sample_population(data, 4, gen) + sigma * torch.randn(4, 20, generator=gen, dtype=torch.float64)
    x0 = toy.sample_population(data, 400_000, gen)
    exact = den(queries, sigma)
    for q, e in zip(queries, exact):
        logw = -((x0 - q) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        ess = 1 / float((w**2).sum())
        mc = (w[:, None] * x0).sum(0)
        assert ess > 200, f"Monte-Carlo estimate too poor (ESS {ess:.0f})"
        # the posterior spread is at most ~1 per coordinate, so the MC error is about 1/sqrt(ESS)
        assert torch.allclose(mc, e, atol=6 / math.sqrt(ess)), (mc - e).abs().max()


def test_exact_denoiser_limits_and_per_row_sigma():
    data = toy.make_toy_data(seed=0)
    den = toy.exact_denoiser(data)
    x = data.points[:5]
    assert torch.allclose(den(x, 1e-4), x, atol=1e-3)  # tiny noise: D(x) ≈ x on the data
    far = den(x * 0 + 1e-3, 1e4)  # huge noise: D → the data mean 0.3 μ_1 + 0.7 μ_2
    assert torch.allclose(far, (data.weights[:, None] * data.means).sum(0).expand(5, 20), atol=1e-3)
    per_row = den(x, torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0]))
    assert torch.allclose(per_row[1], den(x[1:2], 1.0)[0])
    assert torch.allclose(per_row[2], den(x[2:3], 2.0)[0])


def test_lemma7_tv_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    sigma = 0.7
    for dist in [0.1, 0.9, 2.5]:
        direction = rng.normal(size=3)
        x = np.zeros(3)
        y = direction / np.linalg.norm(direction) * dist
        formula = toy.shifted_gaussians_tv(x, y, sigma)
        # quadrature along the line through x and y (the orthogonal directions integrate out)
        u = np.linspace(-12 * sigma, dist + 12 * sigma, 400_001)
        p = np.exp(-(u**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        q = np.exp(-((u - dist) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        quad = 0.5 * np.trapezoid(np.abs(p - q), u)
        assert formula == pytest.approx(quad, abs=1e-6)
        # Monte Carlo in 3-d: TV = E_p[(1 - q/p)_+]
        z = x + sigma * rng.normal(size=(400_000, 3))
        log_ratio = (((z - x) ** 2).sum(1) - ((z - y) ** 2).sum(1)) / (2 * sigma**2)
        mc = np.maximum(1 - np.exp(log_ratio), 0).mean()
        assert formula == pytest.approx(mc, abs=4e-3)
    assert toy.shifted_gaussians_tv(x, x, sigma) == 0.0


def test_edm_grid_endpoints_and_monotone():
    g = toy.edm_grid(1.5, 1.0, 7)
    assert len(g) == 8 and g[0] == 1.5 and g[-1] == 1.0
    assert all(a > b for a, b in zip(g, g[1:]))
    with pytest.raises(ValueError):
        toy.edm_grid(1.5, 1.0, 0)


def _small_data():
    return toy.make_toy_data(seed=0, n=300)


@pytest.mark.parametrize(
    "params",
    [
        {"sampler": "ode", "steps": 7},
        {"sampler": "sde", "steps": 5, "beta": 1.0},
        {"sampler": "improved_sde", "steps": 6, "s_churn": 3.0},
        {"sampler": "restart", "n_restart": 4, "k": 3},
    ],
)
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_interval_nfe_matches_counted_calls(params, solver):
    den = toy.CountedDenoiser(toy.exact_denoiser(_small_data()))
    x = torch.randn(10, 20, dtype=torch.float64)
    toy.run_interval_sampler(den, x, params, torch.Generator().manual_seed(0), solver=solver)
    assert den.nfe == toy.interval_nfe(params, solver)


def test_sampler_special_cases_reduce_to_the_ode():
    data = _small_data()
    x = data.points[:50] + 1.5 * torch.randn(50, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    den = toy.CountedDenoiser(toy.exact_denoiser(data))
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    ode = toy.run_interval_sampler(den, x, {"sampler": "ode", "steps": 6}, g())
    assert torch.equal(toy.run_interval_sampler(den, x, {"sampler": "sde", "steps": 6, "beta": 0.0}, g()), ode)
    assert torch.equal(toy.run_interval_sampler(den, x, {"sampler": "improved_sde", "steps": 6, "s_churn": 0.0}, g()), ode)
    assert torch.equal(toy.run_interval_sampler(den, x, {"sampler": "restart", "n_restart": 7, "k": 0}, g()), ode)
    # and the stochastic ones really are stochastic
    assert not torch.equal(toy.run_interval_sampler(den, x, {"sampler": "sde", "steps": 6, "beta": 1.0}, g()), ode)
    assert not torch.equal(toy.run_interval_sampler(den, x, {"sampler": "restart", "n_restart": 7, "k": 1}, g()), ode)


def _moments_gap(x: torch.Tensor, data: toy.ToyData, t: float) -> float:
    """Largest entry-wise gap between the sample mean/covariance of x and those of the exact p_t."""
    mean = (data.weights[:, None] * data.means).sum(0)
    second = (data.weights[:, None, None] * (data.means[:, :, None] * data.means[:, None, :])).sum(0)
    cov = data.covariance + second - mean[:, None] * mean[None, :] + t**2 * torch.eye(20, dtype=torch.float64)
    return max(float((x.mean(0) - mean).abs().max()), float((torch.cov(x.T) - cov).abs().max()))


def test_exact_ode_and_restart_carry_p_tmax_to_p_tmin():
    """With the exact denoiser, the ODE and every Restart round map the true p_1.5 onto p_1.0 (first two moments)."""
    data = toy.make_toy_data(seed=0, n=400)
    den = toy.CountedDenoiser(toy.exact_denoiser(data))
    gen = torch.Generator().manual_seed(1)
    start = toy.sample_population(data, 20_000, gen) + 1.5 * torch.randn(20_000, 20, generator=gen, dtype=torch.float64)
    ode = toy.run_interval_sampler(den, start, {"sampler": "ode", "steps": 20}, gen)
    restart = toy.run_interval_sampler(den, start, {"sampler": "restart", "n_restart": 21, "k": 2}, gen)
    sde = toy.run_interval_sampler(den, start, {"sampler": "sde", "steps": 40, "beta": 1.0}, gen)
    assert _moments_gap(start, data, 1.5) < 0.1  # sanity of the reference moments
    assert _moments_gap(start, data, 1.0) > 1.0  # the unchanged start is far from p_1.0 (diagonal +1.25)
    for name, x in [("ode", ode), ("restart", restart), ("sde", sde)]:
        assert _moments_gap(x, data, 1.0) < 0.1, name


def test_exact_ode_additional_error_shrinks_with_steps_then_plateaus():
    """Discretization error falls with the step count until the finite-sample W1 floor is reached."""
    data = toy.make_toy_data(seed=0, n=1000)
    den = toy.exact_denoiser(data)
    errors = []
    for steps in [1, 2, 4, 8, 32]:
        settings = toy.ToySettings(num_samples=1000, outer_steps_high=2, outer_steps_low=steps)
        errors.append(toy.toy_errors(den, data, {"sampler": "ode", "steps": steps}, seed=0, settings=settings)["w1_additional"])
    assert errors[0] > errors[1] + 0.02 > errors[2] + 0.04, errors
    assert abs(errors[4] - errors[3]) < 0.01, errors
    assert errors[4] < errors[0] - 0.05, errors


def test_resolve_params_from_nfe():
    assert toy.resolve_params({"sampler": "ode", "nfe": 40})["steps"] == 40
    assert toy.resolve_params({"sampler": "ode", "nfe": 40}, "heun")["steps"] == 20
    assert toy.resolve_params({"sampler": "sde", "nfe": 40, "beta": 1.0}, "heun")["steps"] == 40
    assert toy.resolve_params({"sampler": "restart", "nfe": 80, "n_restart": 11})["k"] == 7
    with pytest.raises(ValueError, match="multiple"):
        toy.resolve_params({"sampler": "restart", "nfe": 30, "n_restart": 5})
    with pytest.raises(ValueError, match="nfe"):
        toy.resolve_params({"sampler": "restart", "nfe": 80, "n_restart": 11, "k": 3})
    with pytest.raises(ValueError, match="unknown"):
        toy.resolve_params({"sampler": "ddim", "nfe": 20})


def test_pareto_front_keeps_only_optimal_points():
    assert toy.pareto_front([3, 1, 2, 4], [1.0, 3.0, 2.5, 2.0]) == [(1.0, 3.0), (2.0, 2.5), (3.0, 1.0)]


def test_pareto_dominates_verdicts():
    from repro.claims import FAILS, HOLDS, INSUFFICIENT

    rows = [
        {"sampler": "restart", "k": 1, "add": 0.70, "con": 0.60},
        {"sampler": "restart", "k": 2, "add": 0.75, "con": 0.55},
        {"sampler": "ode", "k": 0, "add": 0.72, "con": 0.69},
        {"sampler": "ode", "k": 0, "add": 0.80, "con": 0.68},
        {"sampler": "sde", "k": 0, "add": 0.74, "con": 0.62},
        {"sampler": "other", "k": 0, "add": 0.10, "con": 0.10},
    ]
    df = pd.DataFrame(rows)
    claim = {"x": "add", "y": "con", "a": {"sampler": "restart"}, "b": [{"sampler": "ode"}, {"sampler": "sde"}]}
    v = toy.pareto_dominates(df, claim)
    assert v.status == HOLDS, v.detail
    v = toy.pareto_dominates(df, {**claim, "a": {"sampler": "ode"}, "b": {"sampler": "restart"}})
    assert v.status == FAILS, v.detail
    # b = "other" lies left of every a point: nothing to compare
    v = toy.pareto_dominates(df, {**claim, "b": {"sampler": "other"}})
    assert v.status == INSUFFICIENT, v.detail
    v = toy.pareto_dominates(df, {**claim, "b": {"sampler": "missing"}})
    assert v.status == INSUFFICIENT


class _FakeCtx:
    def __init__(self, cache: Path):
        self.cache_dir = cache
        self.extra: dict = {}
        self.work: dict = {}

    def progress(self, it, total=None, desc=None):
        return it

    def cached_artifact(self, name, key, build):
        import hashlib
        import json

        folder = self.cache_dir / name / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        if not folder.exists():
            folder.mkdir(parents=True)
            build(folder)
        return folder

    def record_work(self, **kw):
        self.work.update(kw)

    def record_extra(self, key, value):
        self.extra[key] = value


def test_kind_runs_and_caches_model(tmp_path):
    from repro.restart import toy_experiments as tx

    settings = {"num_points": 300, "num_samples": 300, "train_steps": 300, "outer_steps_high": 4, "outer_steps_low": 4}
    ctx = _FakeCtx(tmp_path)
    cell = SimpleNamespace(params={"sampler": "restart", "n_restart": 3, "k": 2, "nfe": 6}, settings=settings, seed=0, scale="smoke")
    metrics = tx.run_toy(cell, ctx)
    assert set(metrics) >= {"w1_total", "w1_contracted", "w1_additional", "nfe"}
    assert metrics["nfe"] == 6 and ctx.work["nfe"] == 6 + 4 + 4 + 1
    assert all(math.isfinite(v) and v > 0 for v in metrics.values())
    assert len(list((tmp_path / "restart_toy_mlp").iterdir())) == 1
    again = tx.run_toy(cell, ctx)  # cached model, same seed: identical numbers
    assert again == metrics
    other_seed = tx.run_toy(SimpleNamespace(**{**cell.__dict__, "seed": 1}), ctx)
    assert other_seed["w1_total"] != metrics["w1_total"]
    assert tx.plan_toy(cell)["nfe"] == 6
    with pytest.raises(ValueError, match="nfe"):
        tx.run_toy(SimpleNamespace(**{**cell.__dict__, "params": {**cell.params, "nfe": 7}}), ctx)


def test_interval_solvers_agree_with_the_shared_samplers():
    """The toy's interval-local steppers follow the same conventions as repro.restart.samplers."""
    samplers = pytest.importorskip("repro.restart.samplers")
    data = _small_data()
    den = toy.exact_denoiser(data)
    x = data.points[:64] + 1.5 * torch.randn(64, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = toy.edm_grid(1.5, 1.0, 6)
    ours = toy.ode_solve(toy.CountedDenoiser(den), x, grid, "euler")
    assert torch.allclose(ours, samplers.sample_euler(den, x, grid), atol=1e-10)
    ours = toy.ode_solve(toy.CountedDenoiser(den), x, grid, "heun")
    assert torch.allclose(ours, samplers.sample_heun(den, x, grid), atol=1e-10)
    ours = toy.improved_sde_solve(toy.CountedDenoiser(den), x, grid, 2.0, torch.Generator().manual_seed(7))
    shared = samplers.sample_edm_sde(den, x, grid, noise=samplers.GlobalNoise(7), s_churn=2.0, second_order=False)
    assert torch.allclose(ours, shared, atol=1e-10)


def test_kind_with_exact_denoiser_needs_no_training(tmp_path):
    from repro.restart import toy_experiments as tx

    settings = {"num_points": 300, "num_samples": 300, "outer_steps_high": 4, "outer_steps_low": 4, "denoiser": "exact"}
    ctx = _FakeCtx(tmp_path)
    metrics = tx.run_toy(SimpleNamespace(params={"sampler": "ode", "nfe": 5}, settings=settings, seed=0, scale="smoke"), ctx)
    assert metrics["nfe"] == 5 and not (tmp_path / "restart_toy_mlp").exists()
    assert ctx.extra["model"]["denoiser"] == "exact"
    with pytest.raises(ValueError, match="denoiser"):
        tx.run_toy(
            SimpleNamespace(params={"sampler": "ode", "nfe": 5}, settings={**settings, "denoiser": "nn"}, seed=0, scale="smoke"), ctx
        )
