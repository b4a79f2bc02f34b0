"""PFGM++ prior and Restart kernel (repro.restart.samplers.pfgmpp_prior / pfgmpp_perturb) and their wiring.

Reference laws: PFGM++'s kernel at r = sigma sqrt(D) around 0 has ||x||^2 / (||x||^2 + r^2) ~ Beta(N/2, D/2) and
E||x||^2 = sigma^2 N D / (D - 2); the official Restart jump has E||dx||^2 = N (2 s_from^2 + D (s_to^2 - s_from^2)) / (D - 2).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from repro.errors import ReproError
from repro.restart import image_experiments as IE
from repro.restart.denoisers import GaussianMixtureDenoiser
from repro.restart.samplers import NoiseSource, edm_sigmas, pfgmpp_perturb, pfgmpp_prior, sample_heun, sample_restart


class PointMassPFGMppDenoiser:
    """Exact PFGM++ posterior mean E[y | x] at sigma for data = weighted point masses in R^N.

    p_r(x | y) ~ (||x - y||^2 + r^2)^(-(N + D) / 2) with r = sigma sqrt(D), so the responsibilities are closed-form.
    (The Gaussian-mixture denoiser of repro.restart.denoisers is the posterior mean under the *Gaussian* kernel, which
    is only right for PFGM++ as D -> inf.)
    """

    def __init__(self, points: list[list[float]], weights: list[float], D: int):
        self.points = torch.tensor(points, dtype=torch.float64)
        self.log_w = torch.tensor(weights, dtype=torch.float64).log()
        self.D = D

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        n = flat.shape[1]
        r2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2 * self.D
        d2 = ((flat[:, None, :] - self.points[None]) ** 2).sum(-1)
        resp = torch.softmax(-(n + self.D) / 2 * torch.log(d2 + r2) + self.log_w, dim=-1)
        return (resp @ self.points).reshape(x.shape)


def _beta_variable(x: torch.Tensor, sigma: float, D: int) -> torch.Tensor:
    r2 = (x.flatten(1) ** 2).sum(1)
    return r2 / (r2 + sigma**2 * D)


# ------------------------------------------------------------------------------------------------------- (a) prior


@pytest.mark.parametrize("shape, D", [((1, 2, 3), 10), ((3,), 3)])
def test_prior_radius_follows_the_beta_law(shape: tuple, D: int) -> None:
    batch, sigma = 4000, 2.0
    n = math.prod(shape)
    x = pfgmpp_prior(NoiseSource(range(batch)), (batch, *shape), sigma, D)
    assert x.dtype == torch.float64 and x.shape == (batch, *shape)
    b = _beta_variable(x, sigma, D).numpy()
    assert stats.kstest(b, stats.beta(n / 2, D / 2).cdf).pvalue > 1e-3
    # The test has power: a neighbouring D is rejected.
    assert stats.kstest(b, stats.beta(n / 2, (D + 6) / 2).cdf).pvalue < 1e-3
    if D > 4:  # finite variance of ||x||^2
        r2 = (x.flatten(1) ** 2).sum(1)
        expected = sigma**2 * n * D / (D - 2)
        assert abs(float(r2.mean()) - expected) < 4 * float(r2.std()) / math.sqrt(batch)


def test_prior_direction_is_the_edm_latent_of_the_seed() -> None:
    seeds, shape = [11, 12, 13], (3, 1, 4, 4)
    x = pfgmpp_prior(NoiseSource(seeds), shape, 80.0, 2048)
    edm = NoiseSource(seeds).randn(shape).to(torch.float64)
    cos = (x.flatten(1) * edm.flatten(1)).sum(1) / (x.flatten(1).norm(dim=1) * edm.flatten(1).norm(dim=1))
    assert torch.allclose(cos, torch.ones(3, dtype=torch.float64), atol=1e-12)
    # Large D: radius ~ sigma * ||latent||, i.e. x ~ sigma * the EDM latent.
    ratio = x.flatten(1).norm(dim=1) / (80.0 * edm.flatten(1).norm(dim=1))
    assert float((ratio - 1).abs().max()) < 0.1


# ------------------------------------------------------------------------------------------------ (b) kernel


def _jump_moments(D: int, s_from: float, s_to: float, batch: int = 2000, n: int = 16) -> tuple[float, float, torch.Tensor]:
    x0 = torch.zeros(batch, 1, 4, n // 4, dtype=torch.float64)
    dx = pfgmpp_perturb(NoiseSource(range(batch)), x0, s_from, s_to, D).flatten(1)
    m2 = float((dx**2).mean())
    return m2, float((dx**4).mean()) / m2**2, dx


def test_kernel_second_moment_matches_the_official_construction() -> None:
    # s_from large relative to the gap, so the <z, u> term of the construction matters (0.92 vs 0.587 without it).
    D, s_from, s_to = 8, 1.0, 1.2
    m2, _, _ = _jump_moments(D, s_from, s_to, batch=4000)
    assert m2 == pytest.approx((2 * s_from**2 + D * (s_to**2 - s_from**2)) / (D - 2), rel=0.05)


def test_kernel_tends_to_a_gaussian_as_D_grows() -> None:
    s_from, s_to = 0.5, 1.5
    var = s_to**2 - s_from**2
    m2_small, kurt_small, _ = _jump_moments(8, s_from, s_to)
    m2_big, kurt_big, dx_big = _jump_moments(4096, s_from, s_to)
    # D = 8: heavy-tailed and wider than N(0, var) (analytic E dx^2 = 2.75 vs 2.0).
    assert m2_small == pytest.approx((2 * s_from**2 + 8 * var) / 6, rel=0.06)
    assert kurt_small > 3.3
    # D = 4096: N(0, var I) moments and a Gaussian marginal.
    assert m2_big == pytest.approx(var, rel=0.04)
    assert abs(kurt_big - 3.0) < 0.15
    assert stats.kstest(dx_big[:, 0].numpy() / math.sqrt(var), "norm").pvalue > 1e-3


def test_kernel_input_checks() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma_from < sigma_to"):
        pfgmpp_perturb(NoiseSource([0, 1]), x, 0.3, 0.1, 16)
    with pytest.raises(ValueError, match="pfgmpp_D"):
        pfgmpp_perturb(NoiseSource([0, 1]), x, 0.1, 0.3, 0)
    with pytest.raises(ValueError, match="pfgmpp_D"):
        sample_restart(lambda x, s, class_labels=None: x, x, edm_sigmas(3), noise=NoiseSource([0, 1]),
                       restart=[[2, 1, 0.1, 0.3]], pfgmpp_D=2.5)
    with pytest.raises(ValueError, match="noise.randn"):
        pfgmpp_prior(object(), (2, 3), 1.0, 8)


# ------------------------------------------------------------------------------------- (c) sampling converges


def _mass_near_zero(out: torch.Tensor) -> tuple[float, float]:
    """Fraction of samples nearest to the point 0 (vs 1), and the largest distance to the nearest point."""
    d = torch.stack([out.reshape(-1).abs(), (out.reshape(-1) - 1).abs()], dim=1)
    return float((d.argmin(1) == 0).double().mean()), float(d.min(1).values.max())


def test_restart_with_the_pfgmpp_kernel_recovers_the_data_at_small_D() -> None:
    """1-D data (0 w.p. 0.8, 1 w.p. 0.2), D = 2 (far from Gaussian). Many restarts on (0.05, 1.0): with the PFGM++
    prior and kernel the weights come out right; with Gaussian ones they do not (measured 0.872 with B=8000)."""
    D, batch = 2, 4000
    den = PointMassPFGMppDenoiser([[0.0], [1.0]], [0.8, 0.2], D)
    sigmas = edm_sigmas(18, 0.002, 20.0)
    restart = [[10, 20, 0.05, 1.0]]
    noise = NoiseSource(range(batch))
    x = pfgmpp_prior(noise, (batch, 1), 20.0, D)
    w0, worst = _mass_near_zero(sample_restart(den, x, sigmas, noise=noise, restart=restart, pfgmpp_D=D))
    assert abs(w0 - 0.8) < 0.025 and worst < 0.05
    noise = NoiseSource(range(batch))
    x = pfgmpp_prior(noise, (batch, 1), 20.0, D)
    w0_gauss, _ = _mass_near_zero(sample_restart(den, x, sigmas, noise=noise, restart=restart))
    assert w0_gauss - 0.8 > 0.04


def test_the_pfgmpp_prior_gives_the_right_weights_through_the_ode() -> None:
    D, batch, smax = 2, 4000, 20.0
    den = PointMassPFGMppDenoiser([[0.0], [1.0]], [0.8, 0.2], D)
    sigmas = edm_sigmas(40, 0.002, smax)
    w0, worst = _mass_near_zero(sample_heun(den, pfgmpp_prior(NoiseSource(range(batch)), (batch, 1), smax, D), sigmas))
    assert abs(w0 - 0.8) < 0.025 and worst < 0.05
    gaussian_prior = NoiseSource(range(batch)).randn((batch, 1), dtype=torch.float64) * smax
    w0_gauss, _ = _mass_near_zero(sample_heun(den, gaussian_prior, sigmas))
    assert w0_gauss - 0.8 > 0.03  # measured 0.8535 with B=8000


def test_large_D_restart_lands_on_the_gaussian_mixture() -> None:
    """D = 512 >> N = 1: PFGM++ is close to the diffusion model, so Restart with the PFGM++ prior and kernel and the
    (Gaussian-kernel) mixture denoiser still lands on the mixture. Loose: 3000 samples, mode weight 0.6 +- 4.4 s.e."""
    gmm = GaussianMixtureDenoiser([-1.0, 1.5], [0.3, 0.2], [0.6, 0.4])
    batch, D = 3000, 512
    noise = NoiseSource(range(batch))
    x = pfgmpp_prior(noise, (batch, 1), 80.0, D)
    out = sample_restart(gmm, x, edm_sigmas(18, 0.002, 80.0), noise=noise, restart=[[4, 2, 0.1, 1.0]], pfgmpp_D=D)
    assert abs(float((out < 0.25).double().mean()) - 0.6) < 0.04
    assert gmm.w1_to(out) < 0.09  # measured 0.036-0.052 over three seed sets


# ------------------------------------------------------------------------------------------ (d) per-seed draws


def test_samples_do_not_depend_on_the_batch_split() -> None:
    D = 16
    den = GaussianMixtureDenoiser([[0.0, 0.0], [1.0, 0.5]], 0.3)  # continuous data: different seeds, different samples
    sigmas = edm_sigmas(6, 0.002, 10.0)
    restart = [[3, 2, 0.1, 1.0]]

    def run(seeds: list[int]) -> torch.Tensor:
        noise = NoiseSource(seeds)
        x = pfgmpp_prior(noise, (len(seeds), 2), 10.0, D)
        return sample_restart(den, x, sigmas, noise=noise, restart=restart, pfgmpp_D=D)

    together = run([3, 4, 5, 6, 7])
    split = torch.cat([run([3, 4]), run([5, 6, 7])])
    assert torch.allclose(together, split, rtol=0, atol=1e-12)
    assert not torch.allclose(together[0], together[1])
    # The kernel itself, on a fixed x: row i depends on seed i only.
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = pfgmpp_perturb(NoiseSource([3, 4, 5, 6, 7]), x0, 0.1, 0.5, D)
    assert torch.equal(full[2:], pfgmpp_perturb(NoiseSource([5, 6, 7]), x0[2:], 0.1, 0.5, D))


# ------------------------------------------------------------------------------------ wiring (image_experiments)

SMOKE = {"dataset": "mnist", "checkpoints": {"pfgmpp": "random:tiny-songunet"}}
RESTART_CELL = {"model": "pfgmpp", "sampler": "restart", "nfe": 9, "n_main": 3, "intervals": [[2, 2, 0.14, 0.30]]}


def test_resolve_sampler_for_pfgmpp_cells() -> None:
    plan = IE.resolve_sampler(RESTART_CELL, SMOKE)
    assert plan.kwargs["pfgmpp_D"] == 2048 and plan.description["pfgmpp_D"] == 2048 and plan.expected_nfe == 9
    assert IE.resolve_sampler(dict(RESTART_CELL, pfgmpp_D=128), SMOKE).kwargs["pfgmpp_D"] == 128
    assert IE.resolve_sampler({"model": "pfgmpp", "sampler": "heun", "nfe": 35}, {"pfgmpp_D": 64}).description["pfgmpp_D"] == 64
    edm = IE.resolve_sampler(dict(RESTART_CELL, model="edm"), dict(SMOKE, pfgmpp_D=64))
    assert "pfgmpp_D" not in edm.kwargs and "pfgmpp_D" not in edm.description
    with pytest.raises(ReproError, match="not implemented for PFGM"):
        IE.resolve_sampler({"model": "pfgmpp", "sampler": "edm_sde", "nfe": 35}, {})
    with pytest.raises(ReproError, match="pfgmpp_D"):
        IE.resolve_sampler(dict(RESTART_CELL, pfgmpp_D="2048"), SMOKE)


def test_generate_images_starts_pfgmpp_cells_from_the_prior() -> None:
    net = IE.build_random_network("tiny-songunet", RESTART_CELL, SMOKE).eval()
    plan = IE.resolve_sampler(RESTART_CELL, SMOKE)
    seen = {}

    def capture(den, x, sigmas, **kwargs):
        seen["x"], seen["kwargs"] = x, kwargs
        return x * 0

    seeds = [5, 6, 7]
    IE.generate_images(net, IE.SamplerPlan(plan.name, capture, plan.sigmas, plan.kwargs, plan.n_steps,
                                           plan.expected_nfe, plan.description), seeds, "cpu")
    expected = pfgmpp_prior(NoiseSource(seeds), (3, 1, 28, 28), 80.0, 2048)
    assert torch.equal(seen["x"], expected) and seen["kwargs"]["pfgmpp_D"] == 2048

    together, nfe = IE.generate_images(net, plan, [7, 8, 9, 10], "cpu")
    split = torch.cat([IE.generate_images(net, plan, s, "cpu")[0] for s in ([7, 8], [9, 10])])
    assert nfe == 9
    assert (together.int() - split.int()).abs().max() <= 1 and (together != split).float().mean() < 0.01


def test_pfgmpp_smoke_cell_is_planned() -> None:
    from repro.spec import load_table

    cells = [c for c in load_table("restart.table3").cells("smoke") if c.params["model"] == "pfgmpp"]
    assert len(cells) == 1 and IE.plan_image_fid(cells[0])["nfe"] == 9
    paper = [IE.plan_image_fid(c)["nfe"] for c in load_table("restart.table1").cells("paper")
             if c.seed == 0 and c.params["model"] == "pfgmpp"]
    assert sorted(paper) == [35, 43, 63]
