"""NFE accounting: counted calls == analytic formula == the NFE printed in the Restart paper (Tables 2, 3 and 5)."""

from __future__ import annotations

import pytest
import torch

from repro.restart.samplers import (
    SAMPLERS,
    VP_SIGMA_MAX,
    VP_SIGMA_MIN,
    CountingDenoiser,
    GlobalNoise,
    edm_sigmas,
    restart_nfe,
    sample_dpm_solver3,
    sample_restart,
    sampler_nfe,
)


def zero_denoiser(x, sigma, class_labels=None):
    return torch.zeros_like(x)


# (N_main, intervals [N_restart, K, t_min, t_max], paper NFE); paper Table 3 (CIFAR-10 VP / EDM / PFGM++, Heun)
TABLE3_HEUN = [
    (20, [[9, 30, 0.06, 0.20]], 519),
    (18, [[3, 20, 0.06, 0.30]], 115),
    (18, [[3, 10, 0.06, 0.30]], 75),
    (18, [[3, 5, 0.06, 0.30]], 55),
    (18, [[3, 2, 0.06, 0.30]], 43),
    (18, [[3, 2, 0.14, 0.30]], 43),  # EDM and PFGM++ rows
]
# Table 3, "VP w/ DPM-Solver-3" rows
TABLE3_DPM = [
    (8, [[3, 1, 0.06, 0.3]], 27),
    (7, [[3, 1, 0.06, 1.0]], 24),
    (6, [[3, 1, 0.06, 1.0]], 21),
    (5, [[3, 1, 0.06, 1.0]], 18),
]
# Table 5 (ImageNet-64 EDM), in the official {"i": [N, K, t_min, t_max]} notation of params_imagenet_edm.txt
TABLE5 = [
    (
        36,
        {"0": [10, 3, 19.35, 40.79], "1": [10, 3, 1.09, 1.92], "2": [7, 6, 0.59, 1.09], "3": [7, 6, 0.30, 0.59], "4": [7, 25, 0.06, 0.30]},
        623,
    ),
    (
        36,
        {"0": [6, 1, 19.35, 40.79], "1": [6, 1, 1.09, 1.92], "2": [7, 6, 0.59, 1.09], "3": [7, 6, 0.30, 0.59], "4": [7, 25, 0.06, 0.30]},
        535,
    ),
    (
        36,
        {"0": [3, 1, 19.35, 40.79], "1": [6, 1, 1.09, 1.92], "2": [6, 5, 0.59, 1.09], "3": [6, 5, 0.30, 0.59], "4": [6, 20, 0.06, 0.30]},
        385,
    ),
    (
        36,
        {"0": [4, 1, 19.35, 40.79], "1": [4, 1, 1.09, 1.92], "2": [4, 5, 0.59, 1.09], "3": [4, 5, 0.30, 0.59], "4": [6, 6, 0.06, 0.30]},
        203,
    ),
    (
        18,
        {"0": [3, 1, 19.35, 40.79], "1": [4, 1, 1.09, 1.92], "2": [4, 5, 0.59, 1.09], "3": [4, 5, 0.30, 0.59], "4": [4, 10, 0.06, 0.30]},
        165,
    ),
    (
        18,
        {"0": [3, 1, 19.35, 40.79], "1": [4, 1, 1.09, 1.92], "2": [4, 4, 0.59, 1.09], "3": [4, 1, 0.30, 0.59], "4": [4, 4, 0.06, 0.30]},
        99,
    ),
    (18, {"0": [5, 1, 19.35, 40.79], "1": [5, 1, 1.09, 1.92], "2": [5, 1, 0.59, 1.09], "3": [5, 1, 0.06, 0.30]}, 67),
    (14, {"0": [3, 1, 19.35, 40.79], "1": [3, 1, 1.09, 1.92], "2": [3, 1, 0.06, 0.30]}, 39),
]


def counted_restart_nfe(n_main, restart, sigmas, **kwargs) -> int:
    counter = CountingDenoiser(zero_denoiser)
    x = torch.ones(2, 3, dtype=torch.float64) * float(sigmas[0])
    sample_restart(counter, x, sigmas, noise=GlobalNoise(0), restart=restart, **kwargs)
    return counter.nfe


@pytest.mark.parametrize("n_main, restart, paper_nfe", TABLE3_HEUN + TABLE5)
def test_restart_heun_nfe_matches_paper(n_main, restart, paper_nfe):
    sigmas = edm_sigmas(n_main)
    assert restart_nfe(n_main, restart) == paper_nfe
    assert sampler_nfe("restart", n_main, restart=restart) == paper_nfe
    assert counted_restart_nfe(n_main, restart, sigmas) == paper_nfe
    # the official churn inside restarts adds noise, never evaluations
    assert counted_restart_nfe(n_main, restart, sigmas, restart_gamma=0.05, s_min=0.01, s_max=1.0) == paper_nfe


@pytest.mark.parametrize("n_main, restart, paper_nfe", TABLE3_DPM)
def test_restart_dpm_solver3_nfe_matches_paper(n_main, restart, paper_nfe):
    # Official generate_dpm_solver.py: DPM-Solver-3 for the main process and the restart passes, on an EDM grid over
    # the VP sigma range [0.0105, 152.17]; the main process ends with one DPM-Solver-2 step and one Euler step.
    sigmas = edm_sigmas(n_main, VP_SIGMA_MIN, VP_SIGMA_MAX)
    assert restart_nfe(n_main, restart, solver="dpm_solver3") == paper_nfe
    assert sampler_nfe("restart", n_main, restart=restart, inner_solver="dpm_solver3") == paper_nfe
    assert counted_restart_nfe(n_main, restart, sigmas, inner_solver="dpm_solver3") == paper_nfe


def test_dpm_rows_restart_from_last_nonzero_grid_point():
    # On these short VP grids t_min = 0.06 rounds to sigma_min = 0.0105 (restart.md, derived from the official code).
    for n_main, restart, _ in TABLE3_DPM:
        sigmas = edm_sigmas(n_main, VP_SIGMA_MIN, VP_SIGMA_MAX)
        counter = CountingDenoiser(zero_denoiser, record_sigmas=True)
        x = torch.ones(1, 1, dtype=torch.float64)
        sample_restart(counter, x, sigmas, noise=GlobalNoise(0), restart=restart, inner_solver="dpm_solver3")
        t_max = restart[0][3]
        restart_start = counter.sigmas.index(t_max)  # first evaluation at t_max opens the restart pass
        # the main process had reached its last nonzero point (steps of order 3 x (n-2) + 2) before restarting
        assert restart_start == 3 * (n_main - 2) + 2
        assert counter.sigmas[-1] == pytest.approx(VP_SIGMA_MIN)  # the final Euler step starts at sigma_min


def test_restart_t_min_rounds_to_main_grid():
    # With N_main = 36 the ImageNet interval (0.06, 0.30) restarts from 0.0555 (restart.md §2)
    sigmas = edm_sigmas(36)
    counter = CountingDenoiser(zero_denoiser, record_sigmas=True)
    sample_restart(counter, torch.ones(1, 1, dtype=torch.float64), sigmas, noise=GlobalNoise(0), restart=[[2, 1, 0.06, 0.30]])
    i = counter.sigmas.index(0.30)
    # a 2-point restart grid is one Heun step 0.30 -> t_min; its second evaluation is at the rounded t_min
    assert counter.sigmas[i + 1] == pytest.approx(0.0555, abs=5e-4)
    assert counter.sigmas[i + 1] in sigmas.tolist()


@pytest.mark.parametrize("name", ["euler", "heun", "edm_sde", "vanilla_sde", "dpm_solver3"])
@pytest.mark.parametrize("n_steps", [1, 2, 3, 18, 35])
def test_baseline_sampler_nfe_counted_equals_analytic(name, n_steps):
    counter = CountingDenoiser(zero_denoiser)
    kwargs = {"noise": GlobalNoise(0)}
    if name == "edm_sde":
        kwargs.update(s_churn=40.0)
    SAMPLERS[name](counter, torch.ones(2, 2, dtype=torch.float64), edm_sigmas(n_steps), **kwargs)
    assert counter.nfe == sampler_nfe(name, n_steps)


def test_paper_baseline_nfe_values():
    # Table 2/4 columns: Heun / Improved SDE with 18, 32, 64, ... points give 35, 63, 127, ...; vanilla SDE = steps
    assert [sampler_nfe("heun", n) for n in (18, 32, 64, 128, 256, 512)] == [35, 63, 127, 255, 511, 1023]
    assert [sampler_nfe("edm_sde", n) for n in (18, 32, 64, 128, 256, 512)] == [35, 63, 127, 255, 511, 1023]
    assert [sampler_nfe("vanilla_sde", n) for n in (128, 256, 512, 1024)] == [128, 256, 512, 1024]
    assert sampler_nfe("edm_sde", 18, second_order=False) == 18


def test_dpm_solver3_step_orders_follow_official_schedule():
    counter = CountingDenoiser(zero_denoiser, record_sigmas=True)
    sigmas = edm_sigmas(5, VP_SIGMA_MIN, VP_SIGMA_MAX)
    sample_dpm_solver3(counter, torch.ones(1, 1, dtype=torch.float64), sigmas)
    grid = sigmas.tolist()
    # 3 evaluations starting at each of the first 3 points, 2 at the 4th, 1 at the last nonzero point
    starts = [s for s in counter.sigmas if s in grid]
    assert starts == [grid[0], grid[1], grid[2], grid[3], grid[4]]
    assert counter.nfe == 3 * 3 + 2 + 1 == sampler_nfe("dpm_solver3", 5)


def test_sampler_nfe_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_nfe("ddim", 10)
    with pytest.raises(ValueError, match="unknown restart solver"):
        restart_nfe(18, [[3, 2, 0.06, 0.3]], solver="rk4")
    with pytest.raises(ValueError, match="positive integer"):
        sampler_nfe("heun", 0)
