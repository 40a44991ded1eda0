"""Room ``processes/gaussian.py`` (with ``processes/base.py`` and ``processes/rng.py``): the diagonal-Gaussian core
that DDPM, DDIM, blur, blurring, SIE, EPDM and GDDM share. DDPM/DDIM is its reference instance here: closed-form
marginals, the loss, the posterior and the ancestral/DDIM steps driven by the exact (oracle) denoiser; a generic
per-coordinate process in a rotated basis checks the posterior step itself; per-sample noise streams (``rng.py``).
The method-specific processes are tested in their own files (test_blur.py, test_epdm.py, ...).

Expected numbers come from methods_blur_sie_baselines.md §9.2-9.3 (exact linear recursion, float64).
"""

import math

import pytest
import torch

from diffproc.processes.ddpm import DDPMProcess, ddim_timesteps
from diffproc.processes.rng import PerSampleGenerator, randn, sample_seed
from diffproc.samplers import sample_loop
from diffproc.nets.precond import denoiser_for, make_head
from modules import PerModeVP

MU, S = 0.3, 0.5  # oracle data law N(MU, S^2)


def oracle_eps(process):
    """Exact E[eps | x_t] for x0 ~ N(MU, S^2 I) (spec §1.4)."""

    def fn(x, t):
        a, s = process.coefficients(t, x)
        return s * (x - a * MU) / (a * a * S * S + s * s)

    return fn


def run(process, steps=None, solver="ancestral", n=20000, seed=0, ddim_eta=0.0):
    g = torch.Generator().manual_seed(seed)
    out = sample_loop(process, denoiser_for(process, oracle_eps(process)), (n, 1, 1, 1), steps, solver, g,
                      dtype=torch.float64, ddim_eta=ddim_eta).sample
    return out.mean().item(), out.var().item()


def test_marginal_matches_markov_chain():
    """Iterating x_t = sqrt(1-b_t) x_{t-1} + sqrt(b_t) z reproduces the closed form q(x_t|x_0)."""
    p = DDPMProcess()
    assert p.alphas_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x = x0.clone()
    checkpoints = {}
    for t in range(1, 1001):
        b = p.betas[t - 1]
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if t in (1, 10, 250, 1000):
            checkpoints[t] = x.clone()
    for t, xt in checkpoints.items():
        a, s = p.alpha_sigma(torch.tensor([t]))
        se = s.item() / math.sqrt(n)
        assert abs(xt.mean().item() - a.item() * 0.7) < 4 * se
        assert xt.var().item() == pytest.approx(s.item() ** 2, rel=4 * math.sqrt(2 / n))
    # the closed-form sampler itself: empirical moments of forward(x0, t, eps)
    t = torch.full((n,), 300)
    xt = p.forward(x0.view(n, 1, 1, 1), t, torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64))
    a, s = p.alpha_sigma(torch.tensor([300]))
    assert xt.mean().item() == pytest.approx(a.item() * 0.7, abs=4 * s.item() / math.sqrt(n))
    assert xt.var().item() == pytest.approx(s.item() ** 2, rel=0.02)


@pytest.mark.parametrize("head", ["eps", "x0", "v"])
def test_loss_zero_for_perfect_model(head):
    p = DDPMProcess()
    h = make_head(head, p)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = p.sample_time(4, g)
    perfect = h.target(p, x0, noise, t)
    assert p.loss(denoiser_for(p, lambda z, tt: perfect, h), x0, t, noise).item() < 1e-10
    assert p.loss(denoiser_for(p, lambda z, tt: perfect + 0.1, h), x0, t, noise).item() == pytest.approx(0.01, rel=1e-4)


def test_conversions_roundtrip_and_cheat_oracle():
    """With the true eps (a cheat oracle knowing x0), x0_hat is exact at every t, for every
    parameterisation."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    p = DDPMProcess(clip_x0=False)
    for head in ("eps", "x0", "v"):
        h = make_head(head, p)
        for t in (1, 37, 500, 1000):
            tt = torch.full((3,), t)
            zt = p.forward(x0, tt, noise)
            u0, eps = p.predict(denoiser_for(p, lambda z, s: h.target(p, x0, noise, tt), h), zt, tt)
            assert torch.allclose(u0, x0, atol=1e-9) and torch.allclose(eps, noise, atol=1e-9)


@pytest.mark.parametrize("variance,ratio", [("fixedsmall", 0.985), ("fixedlarge", 1.003)])
def test_ancestral_oracle_reproduces_data_law(variance, ratio):
    """Exact-posterior-mean denoiser: ancestral sampling must give back N(MU, S^2).

    Expected variance ratios (spec §9.2) are those of the exact linear recursion (discretisation, not
    MC error); 20k samples give a relative MC std of the variance of sqrt(2/20000) = 1%, so the
    tolerance is 0.01 + 3 * 0.01 on the ratio and 3 * S/sqrt(n) on the mean.
    """
    p = DDPMProcess(variance=variance, clip_x0=False)
    m, v = run(p)
    assert abs(m - MU) < 3 * S / math.sqrt(20000)
    assert abs(v / S**2 - ratio) < 0.04


def test_ddim_oracle_converges_monotonically():
    """DDIM eta=0 with S = 10/20/50/100/1000 steps: variance deficit shrinks towards the data
    variance as S grows; compare to the exact recursion values of spec §9.3."""
    p = DDPMProcess(clip_x0=False)
    expected = {10: 0.13997, 20: 0.18813, 50: 0.22320, 100: 0.23618, 1000: 0.24850}
    got = {}
    for steps, var in expected.items():
        m, v = run(p, steps, "ddim", n=20000, seed=steps)
        got[steps] = v
        assert abs(m - MU) < 3 * S / math.sqrt(20000)
        # deterministic map of Gaussian noise: the MC error on the variance is ~1% relative
        assert v == pytest.approx(var, rel=0.04)
    vals = [got[k] for k in sorted(got)]
    assert all(a < b for a, b in zip(vals, vals[1:]))


def test_ddim_eta1_full_grid_equals_ancestral_and_eta0_deterministic():
    p1 = DDPMProcess(clip_x0=False)
    m, v = run(p1, 1000, "ddim", n=20000, ddim_eta=1.0)
    assert v / S**2 == pytest.approx(0.985, abs=0.04)
    # same start, same noise stream -> eta=1 DDIM step equals the ancestral fixedsmall step exactly
    pa = DDPMProcess(clip_x0=False)
    x = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for t in (1000, 500, 2):
        ga, gd = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        xa = pa.reverse_step(denoiser_for(pa, oracle_eps(pa)), x, t, t - 1, "ancestral", ga)
        xd = p1.reverse_step(denoiser_for(p1, oracle_eps(p1)), x, t, t - 1, "ddim", gd, ddim_eta=1.0)
        assert torch.allclose(xa, xd, atol=1e-12)
    # eta = 0: deterministic regardless of the generator
    p0 = DDPMProcess(clip_x0=False)
    xt = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    a = sample_loop(p0, denoiser_for(p0, oracle_eps(p0)), xt.shape, 10, "ddim", torch.Generator().manual_seed(1), z_init=xt).sample
    b = sample_loop(p0, denoiser_for(p0, oracle_eps(p0)), xt.shape, 10, "ddim", torch.Generator().manual_seed(2), z_init=xt).sample
    assert torch.equal(a, b)


def test_timestep_grids_and_nfe():
    assert ddim_timesteps(1000, 10, "uniform") == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]
    quad = ddim_timesteps(1000, 10, "quad")
    assert quad == [801, 633, 484, 356, 247, 159, 89, 40, 10, 1, 0]
    p = DDPMProcess()
    calls = []
    res = sample_loop(p, denoiser_for(p, lambda z, t: calls.append(1) or torch.zeros_like(z)), (2, 1, 4, 4), 25, "ddim")
    assert res.nfe == 25 == len(calls) and len(res.timesteps) == 26


def test_cosine_schedule():
    p = DDPMProcess(schedule="cosine")
    ab = p.alphas_bar
    assert ab[0] == 1 and torch.all(ab[1:] < ab[:-1]) and ab[-1] < 1e-6
    with pytest.raises(ValueError, match="unknown beta schedule"):
        DDPMProcess(schedule="quadratic")


def test_final_step_is_decided_from_the_grid_on_the_host():
    """A step ends at σ = 0 (no noise added) exactly when its grid value says so; the samplers pass the grid's Python
    numbers, which are read on the host (no accelerator sync per step)."""
    from diffproc.processes.interpolation import InterpolationProcess
    from diffproc.processes.vp_sde import VPSDEProcess

    ddpm, sie, vp = DDPMProcess(num_timesteps=20), InterpolationProcess(), VPSDEProcess()
    assert ddpm.final_step(0) and not ddpm.final_step(1) and ddpm.final_step(torch.zeros(3, dtype=torch.long))
    assert sie.final_step(0.0) and not sie.final_step(0.05)
    assert not vp.final_step(vp.timesteps(10)[-1])  # the VP grid stops at t = eps > 0: noise is still added
    grid = ddpm.timesteps(5)
    assert [ddpm.final_step(t) for t in grid[1:]] == [False] * (len(grid) - 2) + [True]


def test_per_sample_generator_rows_do_not_depend_on_the_batch():
    whole = randn((5, 3, 4, 4), PerSampleGenerator(7, range(5)))
    parts = torch.cat([randn((2, 3, 4, 4), PerSampleGenerator(7, [0, 1])),
                       randn((3, 3, 4, 4), PerSampleGenerator(7, [2, 3, 4]))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])
    assert sample_seed(0, 1) != sample_seed(1, 0) and sample_seed(3, 4) == sample_seed(3, 4)
    with pytest.raises(ValueError, match="first dimension"):
        randn((4, 3), PerSampleGenerator(7, range(5)))


class Rotation:
    """An orthonormal basis of 2x2 images, ``M x = R x Rᵀ`` with ``R`` a rotation: every coefficient mixes every
    pixel."""

    def __init__(self, angle: float) -> None:
        c, s = math.cos(angle), math.sin(angle)
        self.r = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    def forward(self, x):
        return self.r.to(x.dtype) @ x @ self.r.T.to(x.dtype)

    def inverse(self, u):
        return self.r.T.to(u.dtype) @ u @ self.r.to(u.dtype)


def test_ancestral_step_given_x0_samples_the_exact_posterior_of_any_diagonal_process():
    """A generic diagonal process (per-coordinate α_k(t), σ_k(t) in a basis that mixes the pixels), denoised by the
    true x0: the forward marginal gives u_t ~ N(α_t u0, σ_t²) per basis coordinate, and one ancestral step
    (``fixedsmall``) t → s from it draws from the true posterior q(u_s | u_t, x0), i.e. the pair (u_t, u_s) has the
    forward process's joint law: E u_s = α_s u0, Var u_s = σ_s², Cov(u_t, u_s) = (α_t/α_s) σ_s² per coordinate, and
    the coordinates uncorrelated (the noise is drawn in the basis, not in pixels). Monte Carlo: 40 000 draws, every
    moment within 5 standard errors (``fixedlarge`` gives Var u_s = 0.66 where σ_s² = 0.19, in the slowest mode)."""
    p = PerModeVP(basis=Rotation(0.6))
    n, t, s = 40_000, 0.5, 0.2
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.5, -0.3], [0.8, 0.1]], dtype=torch.float64).expand(n, 1, 2, 2)
    u0 = p.to_basis(x0)

    def exact(z, tt):  # û0 = the true u0; ε̂ consistent with it
        a, sigma = p.coefficients(tt, z)
        return u0, (p.to_basis(z) - a * u0) / sigma

    z_t = p.forward(x0, torch.full((n,), t, dtype=torch.float64), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    z_s = p.reverse_step(exact, z_t, t, s, "ancestral", g)
    (a_t, s_t), (a_s, s_s) = (tuple(c.reshape(4) for c in p.alpha_sigma(torch.tensor([x], dtype=torch.float64)))
                              for x in (t, s))
    m, u_t, u_s = u0[0].reshape(4), p.to_basis(z_t).reshape(n, 4), p.to_basis(z_s).reshape(n, 4)
    k = 5 / math.sqrt(n)  # 5 standard errors, relative
    for u, a, sigma in ((u_t, a_t, s_t), (u_s, a_s, s_s)):
        assert torch.all((u.mean(0) - a * m).abs() <= k * sigma), (u.mean(0), a * m)
        assert torch.all((u.var(0) / sigma**2 - 1).abs() <= k * math.sqrt(2)), (u.var(0), sigma**2)
    cov = ((u_t - u_t.mean(0)) * (u_s - u_s.mean(0))).mean(0)
    assert torch.all((cov - a_t / a_s * s_s**2).abs() <= k * math.sqrt(2) * s_t * s_s), (cov, a_t / a_s * s_s**2)
    assert (torch.corrcoef(u_s.T) - torch.eye(4, dtype=torch.float64)).abs().max() <= k
