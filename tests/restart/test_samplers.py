"""Samplers against an exact Gaussian-mixture denoiser: convergence, per-sample seeding, config parsing, k-diffusion."""

from __future__ import annotations

import json
import math

import pytest
import torch

from repro.restart.denoisers import GaussianMixtureDenoiser
from repro.restart.samplers import (
    SAMPLERS,
    VP_SIGMA_MAX,
    VP_SIGMA_MIN,
    CountingDenoiser,
    GlobalNoise,
    NoiseSource,
    RestartConfigError,
    RestartInterval,
    edm_sigmas,
    parse_restart_config,
    sample_dpm_solver3,
    sample_edm_sde,
    sample_euler,
    sample_heun,
    sample_restart,
    sample_vanilla_sde,
    vp_sigma_range,
)

# 1-D bimodal data: asymmetric weights and widths so that a wrong sampler shows in mean, variance and shape.
MIXTURE_1D = GaussianMixtureDenoiser([-2.0, 1.5], [0.3, 0.5], [0.3, 0.7])
# 3-D mixture for batch/seeding and peer comparisons
MIXTURE_3D = GaussianMixtureDenoiser([[-2.0, 0.5, 1.0], [1.5, -1.0, 0.0]], [0.3, 0.5], [0.3, 0.7])


# ---------------------------------------------------------------------------------------------------------------
# The analytic denoiser itself


def test_mixture_denoiser_is_the_posterior_mean():
    # Monte Carlo check of D(x; sigma) = E[y | x]: bin noisy samples near x and average the clean ones.
    gm = MIXTURE_1D
    g = torch.Generator().manual_seed(0)
    y = gm.sample(400_000, g)
    sigma = 0.8
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    for x0 in (-2.5, -0.5, 0.4, 2.0):
        near = (x[:, 0] - x0).abs() < 0.02
        expected = float(y[near, 0].mean())
        got = float(gm(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)))
        assert got == pytest.approx(expected, abs=0.03)


def test_mixture_helpers_are_consistent():
    gm = MIXTURE_1D
    u = torch.tensor([0.01, 0.3, 0.5, 0.9])
    assert torch.allclose(gm.cdf(gm.quantile(u)), u.double(), atol=1e-10)
    samples = gm.sample(50_000, torch.Generator().manual_seed(3))
    assert float(samples.mean()) == pytest.approx(float(gm.mean()), abs=0.03)
    assert float(samples.var()) == pytest.approx(float(gm.var()), rel=0.03)
    assert gm.w1_to(samples) < 0.03
    assert gm.w1_to(samples + 0.2) > 0.15  # the W1 estimate sees a shift
    with pytest.raises(ValueError, match="stds must be > 0"):
        GaussianMixtureDenoiser([0.0], [0.0])


# ---------------------------------------------------------------------------------------------------------------
# Convergence of the deterministic samplers: exact transport in 1-D
#
# In 1-D the probability-flow ODE is monotone, so it maps the u-quantile of p_{sigma_max} to the u-quantile of p_0.
# Starting from exact quantiles, |x_i - F0^-1(u_i)| is pure discretisation error, with no Monte Carlo noise.


def transport_error(sampler, n_steps: int, **kwargs) -> float:
    gm = MIXTURE_1D
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    sigmas = edm_sigmas(n_steps, **kwargs)
    x = gm.quantile(u, sigma=float(sigmas[0]))[:, None]
    out = sampler(gm, x, sigmas)
    return float((out[:, 0] - gm.quantile(u)).abs().mean())


def convergence_order(sampler, coarse: int = 35, fine: int = 70) -> float:
    return math.log2(transport_error(sampler, coarse) / transport_error(sampler, fine))


def assert_second_order(sampler) -> None:
    order = convergence_order(sampler)
    assert order > 1.7, f"observed convergence order {order:.2f}, expected ~2 for Heun"
    assert transport_error(sampler, 70) < 0.004


def test_euler_converges_at_first_order():
    assert 0.8 < convergence_order(sample_euler) < 1.3
    assert transport_error(sample_euler, 70) < 0.05


def test_heun_converges_at_second_order():
    assert_second_order(sample_heun)
    # errors shrink monotonically along the whole range
    errors = [transport_error(sample_heun, n) for n in (10, 18, 35, 70)]
    assert errors == sorted(errors, reverse=True)


def test_dropping_the_heun_correction_fails_the_heun_test():
    # Negative control: Heun without its corrector is exactly Euler, which the second-order check must reject.
    with pytest.raises(AssertionError, match="convergence order"):
        assert_second_order(sample_euler)


def test_dpm_solver3_converges_at_high_order():
    # The last two steps (orders 2 and 1, as in the official schedule) cap the global order, but the error is far
    # below Heun's at equal step count.
    assert convergence_order(sample_dpm_solver3, 18, 35) > 2.5
    assert transport_error(sample_dpm_solver3, 35) < transport_error(sample_heun, 35) / 10
    assert transport_error(sample_dpm_solver3, 35) < 1e-3


def test_dpm_solver3_on_the_vp_sigma_range():
    assert vp_sigma_range() == pytest.approx((0.0104860, 152.16697), rel=1e-5)
    err = transport_error(sample_dpm_solver3, 35, sigma_min=VP_SIGMA_MIN, sigma_max=VP_SIGMA_MAX)
    assert err < 2e-3


# ---------------------------------------------------------------------------------------------------------------
# Convergence in distribution of the stochastic samplers (and of Restart)

N_SAMPLES = 20_000


def sample_distribution(name: str, n_steps: int, **kwargs) -> torch.Tensor:
    gm = MIXTURE_1D
    sigmas = edm_sigmas(n_steps)
    x = gm.sample(N_SAMPLES, torch.Generator().manual_seed(1), sigma=float(sigmas[0]))  # exact p_{sigma_max}
    return SAMPLERS[name](gm, x, sigmas, noise=GlobalNoise(2), **kwargs)


def distribution_error(samples: torch.Tensor) -> dict[str, float]:
    gm = MIXTURE_1D
    return {
        "w1": gm.w1_to(samples),
        "mean": abs(float(samples.mean() - gm.mean())),
        "var_rel": abs(float(samples.var() / gm.var()) - 1.0),
    }


def assert_matches_truth(samples: torch.Tensor, w1_tol: float) -> None:
    err = distribution_error(samples)
    # standard error of the mean with 20k samples is 0.012; W1 noise floor is ~0.01
    assert err["w1"] < w1_tol, err
    assert err["mean"] < 0.05, err
    assert err["var_rel"] < 0.05, err


EDM_CIFAR_CHURN = dict(s_churn=30.0, s_tmin=0.01, s_tmax=1.0, s_noise=1.0)
RESTART_VP_75 = dict(restart=[[3, 10, 0.06, 0.30]])


@pytest.mark.parametrize(
    "name, kwargs, coarse, fine, w1_tol",
    [
        ("edm_sde", EDM_CIFAR_CHURN, 10, 70, 0.02),
        ("vanilla_sde", {}, 64, 512, 0.04),
        ("restart", RESTART_VP_75, 6, 18, 0.02),
        ("restart", dict(RESTART_VP_75, restart_gamma=0.05), 6, 18, 0.02),
        ("restart", dict(RESTART_VP_75, inner_solver="dpm_solver3"), 4, 10, 0.02),
    ],
    ids=["edm_sde", "vanilla_sde", "restart", "restart_gamma", "restart_dpm3"],
)
def test_stochastic_sampler_converges_in_distribution(name, kwargs, coarse, fine, w1_tol):
    coarse_err = distribution_error(sample_distribution(name, coarse, **kwargs))["w1"]
    fine_samples = sample_distribution(name, fine, **kwargs)
    assert_matches_truth(fine_samples, w1_tol)
    assert distribution_error(fine_samples)["w1"] < coarse_err


@pytest.mark.parametrize(
    "name, kwargs, n_steps",
    [
        ("edm_sde", dict(EDM_CIFAR_CHURN, s_noise=0.0), 70),  # churn without its noise
        ("edm_sde", dict(EDM_CIFAR_CHURN, s_noise=1.5), 70),  # wrong noise scale
        ("vanilla_sde", dict(s_noise=0.0), 512),  # drift without diffusion collapses the distribution
        ("restart", dict(RESTART_VP_75, s_noise=0.0), 18),  # restart jump without noise
        ("restart", dict(RESTART_VP_75, s_noise=1.3), 18),  # restart jump too large
    ],
    ids=["edm_no_noise", "edm_noise_1.5", "vanilla_no_noise", "restart_no_noise", "restart_noise_1.3"],
)
def test_broken_stochastic_samplers_fail_the_distribution_check(name, kwargs, n_steps):
    with pytest.raises(AssertionError):
        assert_matches_truth(sample_distribution(name, n_steps, **kwargs), 0.04)


def test_restart_without_restarts_is_heun():
    gm = MIXTURE_3D
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = edm_sigmas(18)
    heun = sample_heun(gm, x, sigmas)
    for restart in ([], [[3, 0, 0.06, 0.30]]):
        out = sample_restart(gm, x, sigmas, noise=GlobalNoise(0), restart=restart)
        assert torch.equal(out, heun)
    # and a real restart changes the result
    assert not torch.allclose(sample_restart(gm, x, sigmas, noise=GlobalNoise(0), restart=RESTART_VP_75["restart"]), heun)


# ---------------------------------------------------------------------------------------------------------------
# Per-sample seeding


def test_noise_source_matches_stacked_per_seed_generators():
    seeds = [0, 7, 2**32 + 5]
    noise = NoiseSource(seeds).randn([3, 2, 4], dtype=torch.float64)
    for row, seed in zip(noise, seeds):
        expected = torch.randn([2, 4], generator=torch.Generator().manual_seed(seed % 2**32), dtype=torch.float64)
        assert torch.equal(row, expected)
    with pytest.raises(ValueError, match="does not match"):
        NoiseSource(seeds).randn([2, 4])


def test_global_noise_replays_torch_randn_like_without_touching_global_state():
    x = torch.zeros(5, 3)
    state = torch.get_rng_state()
    ours = GlobalNoise(11)
    first, second = ours.randn_like(x), ours.randn_like(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(11)
    assert torch.equal(first, torch.randn_like(x))
    assert torch.equal(second, torch.randn_like(x))
    torch.set_rng_state(state)


SEEDING_CASES = [
    ("euler", {}),
    ("heun", {}),
    ("edm_sde", dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
    ("vanilla_sde", {}),
    ("dpm_solver3", {}),
    ("restart", dict(restart={"0": [3, 2, 1.09, 1.92], "1": [3, 2, 0.06, 0.30]}, restart_gamma=0.05)),
]


@pytest.mark.parametrize("name, kwargs", SEEDING_CASES, ids=[c[0] for c in SEEDING_CASES])
def test_batch_of_8_equals_8_batches_of_1(name, kwargs):
    gm = MIXTURE_3D
    seeds = [3, 1, 4, 1_000_003, 5, 9, 2, 6]
    sigmas = edm_sigmas(12)

    def run(batch_seeds):
        noise = NoiseSource(batch_seeds)
        x = noise.randn([len(batch_seeds), 1, 3], dtype=torch.float64) * float(sigmas[0])
        return SAMPLERS[name](gm, x, sigmas, noise=noise, **kwargs)

    together = run(seeds)
    one_by_one = torch.cat([run([s]) for s in seeds])
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)
    # different seeds do give different samples (the stochastic samplers really use the per-sample noise)
    assert not torch.allclose(together[0], together[1])


def test_stochastic_samplers_require_a_noise_source():
    x = torch.zeros(2, 3, dtype=torch.float64)
    for sampler, kwargs in ((sample_edm_sde, {}), (sample_vanilla_sde, {}), (sample_restart, {"restart": []})):
        with pytest.raises(ValueError, match="draws noise"):
            sampler(MIXTURE_3D, x, edm_sigmas(4), noise=None, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Restart configuration parsing

EXPECTED = [RestartInterval(3, 2, 1.09, 1.92), RestartInterval(3, 10, 0.06, 0.3)]


@pytest.mark.parametrize(
    "config",
    [
        [[3, 2, 1.09, 1.92], [3, 10, 0.06, 0.3]],
        ((3, 2, 1.09, 1.92), (3, 10, 0.06, 0.3)),
        {"0": [3, 2, 1.09, 1.92], "1": [3, 10, 0.06, 0.3]},  # official notation
        '{"0": [3, 2, 1.09, 1.92], "1": [3, 10, 0.06, 0.3]}',  # official JSON as passed to --restart_info
        json.dumps([[3, 2, 1.09, 1.92], [3, 10, 0.06, 0.3]]),
        [{"n_restart": 3, "k": 2, "t_min": 1.09, "t_max": 1.92}, {"n_restart": 3, "k": 10, "t_min": 0.06, "t_max": 0.3}],
        EXPECTED,
    ],
)
def test_parse_restart_config_accepts_every_notation(config):
    assert parse_restart_config(config) == EXPECTED


def test_parse_restart_config_empty():
    assert parse_restart_config(None) == parse_restart_config([]) == parse_restart_config({}) == parse_restart_config("") == []


@pytest.mark.parametrize(
    "config, message",
    [
        ([[3, 2, 0.06]], r"expected \[N_restart, K, t_min, t_max\]"),
        ([[3.5, 2, 0.06, 0.3]], "n_restart must be an integer"),
        ([[3, True, 0.06, 0.3]], "k must be an integer"),
        ([[1, 2, 0.06, 0.3]], "n_restart must be >= 2"),
        ([[3, -1, 0.06, 0.3]], "k .* must be >= 0"),
        ([[3, 2, 0.3, 0.06]], "need 0 < t_min < t_max"),
        ([[3, 2, 0.0, 0.3]], "need 0 < t_min < t_max"),
        ([[3, 2, 0.06, float("inf")]], "t_max must be a finite number"),
        ([[3, 2, "0.06", 0.3]], "t_min must be a finite number"),
        ({"0": [3, 2, 0.06, 0.3], "1": [3, 2, 0.3]}, "restart interval '1'"),
        ([{"n": 3, "k": 2, "t_min": 0.06, "t_max": 0.3}], r"unknown \['n'\].*missing \['n_restart'\]"),
        ([3, 2, 0.06, 0.3], "single .* wrap it in a list"),
        ({"n_restart": 3, "k": 2, "t_min": 0.06, "t_max": 0.3}, "single interval"),
        ("{0: [3, 2]}", "not valid JSON"),
        (42, "cannot read a restart config from int"),
        ([5], r"restart interval #0: expected"),
    ],
)
def test_parse_restart_config_errors_are_clear(config, message):
    with pytest.raises(RestartConfigError, match=message):
        parse_restart_config(config)


def test_restart_rejects_intervals_that_cannot_run():
    x = torch.zeros(1, 1, dtype=torch.float64)
    sigmas = edm_sigmas(18)
    with pytest.raises(RestartConfigError, match="first grid point"):
        sample_restart(MIXTURE_1D, x, sigmas, noise=GlobalNoise(0), restart=[[3, 1, 79.0, 100.0]])
    with pytest.raises(RestartConfigError, match="rounds to sigma=0"):
        sample_restart(MIXTURE_1D, x, sigmas, noise=GlobalNoise(0), restart=[[3, 1, 1e-4, 0.3]])
    with pytest.raises(RestartConfigError, match=">= t_max"):
        sample_restart(MIXTURE_1D, x, sigmas, noise=GlobalNoise(0), restart=[[3, 1, 0.29, 0.295]])
    with pytest.raises(ValueError, match="unknown restart solver"):
        sample_restart(MIXTURE_1D, x, sigmas, noise=GlobalNoise(0), restart=[], inner_solver="rk4")


def test_edm_sigmas_matches_the_printed_18_step_grid():
    # restart.md §2: the 18-step EDM grid the paper's t_min/t_max values come from
    printed = [80, 57.59, 40.79, 28.37, 19.35, 12.91, 8.40, 5.32, 3.26, 1.92, 1.09, 0.59, 0.30, 0.14, 0.06, 0.023, 0.0075, 0.002]
    grid = edm_sigmas(18)
    assert grid.dtype == torch.float64 and len(grid) == 19 and grid[-1] == 0
    for value, expected in zip(grid.tolist(), printed):
        assert value == pytest.approx(expected, rel=0.02, abs=6e-4)
    assert edm_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        edm_sigmas(0)


# ---------------------------------------------------------------------------------------------------------------
# Side by side with k-diffusion (optional peer)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_k_diffusion(dtype):
    kd = pytest.importorskip("k_diffusion.sampling", exc_type=ImportError)
    gm = MIXTURE_3D
    # k-diffusion promotes x to the sigmas' dtype after one step (append_dims turns the 0-d sigma into a [1, 1]
    # tensor), which changes the dtype of its later randn_like draws; give both the same dtype to compare streams.
    sigmas = edm_sigmas(18, dtype=dtype)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=dtype) * 80
    tol = 1e-5
    assert _rel(sample_euler(gm, x, sigmas), kd.sample_euler(gm, x, sigmas)) < tol
    assert _rel(sample_heun(gm, x, sigmas), kd.sample_heun(gm, x, sigmas)) < tol
    churn = dict(s_churn=30.0, s_tmin=0.01, s_tmax=1.0, s_noise=1.007)  # window excludes most steps: stream alignment
    for second_order, theirs_fn in ((True, kd.sample_heun), (False, kd.sample_euler)):
        state = torch.get_rng_state()
        torch.manual_seed(5)
        theirs = theirs_fn(gm, x, sigmas, **churn)
        torch.set_rng_state(state)
        ours = sample_edm_sde(gm, x, sigmas, noise=GlobalNoise(5), second_order=second_order, **churn)
        assert _rel(ours, theirs) < tol
        # the comparison is sensitive to the noise: another seed is far off
        other = sample_edm_sde(gm, x, sigmas, noise=GlobalNoise(6), second_order=second_order, **churn)
        assert _rel(other, theirs) > 1e-2


def test_counting_denoiser_counts_batched_calls():
    counter = CountingDenoiser(MIXTURE_3D)
    sample_heun(counter, torch.zeros(64, 3, dtype=torch.float64), edm_sigmas(18))
    assert counter.nfe == 35
    counter.reset()
    assert counter.nfe == 0


def test_restart_main_churn_is_edm_churn():
    # With no restart passes and a churn window covering every step, Restart's main loop is EDM Alg. 2 exactly.
    gm = MIXTURE_3D
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = edm_sigmas(18)
    edm = sample_edm_sde(gm, x, sigmas, noise=GlobalNoise(4), s_churn=20.0, s_noise=1.003)
    restart = sample_restart(gm, x, sigmas, noise=GlobalNoise(4), restart=[], s_churn=20.0, s_min=0.0, s_max=float("inf"), s_noise=1.003)
    torch.testing.assert_close(restart, edm, rtol=1e-12, atol=1e-12)
