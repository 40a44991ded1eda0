"""Pierret & Galerne's published W2 table (ICML 2025), reproduced through the project's own solvers: the VP
SDE process, ``sample_loop``'s Euler / Heun and the reverse-SDE Euler–Maruyama step, driven by the exact
denoiser of N(0, diag λ) (benchmarks/gaussian_w2.py). Plus the process's marginals against the SDE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.gaussian_w2 import (EIGENVALUES, GRID_POINTS, PUBLISHED, SHAPE, deterministic_gain, exact_denoiser,
                                    load_eigenvalues, paper_process, pT_variance, w2_cell, w2_diag)
from diffproc.processes.rng import PerSampleGenerator, randn
from diffproc.processes.vp_sde import VPSDEProcess
from diffproc.samplers import NFE_PER_STEP, sample_loop
from diffproc.nets.precond import denoiser_for

TOL = 0.01  # the table prints two decimals


@pytest.fixture(scope="module")
def lam():
    if not EIGENVALUES.is_file():
        pytest.skip(f"{EIGENVALUES} missing (cifar10.npy of emilePi/Preprint_code, see shared/data/README.md)")
    return load_eigenvalues()


@pytest.fixture(scope="module")
def table(lam):
    process = paper_process()
    return {(s, n): w2_cell(s, n, lam, process) for s in PUBLISHED for n in GRID_POINTS}


@pytest.mark.parametrize("n", GRID_POINTS)
@pytest.mark.parametrize("scheme", list(PUBLISHED))
def test_published_cell(table, scheme, n):
    w2, _ = table[scheme, n]
    assert abs(w2 - PUBLISHED[scheme][n]) <= TOL, (scheme, n, w2, PUBLISHED[scheme][n])


def test_nfe_counts_are_exact(table, lam):
    """N grid points = N − 1 steps: EM and Euler spend 1 evaluation a step, Heun 2, as counted by the
    samplers; the same counts come out of a plain stochastic ``sample_loop`` run."""
    for (scheme, n), (_, nfe) in table.items():
        assert nfe == NFE_PER_STEP[scheme] * (n - 1), (scheme, n, nfe)
    process = paper_process()
    denoiser = exact_denoiser(process, lam)
    for solver, per_step in (("euler_maruyama", 1), ("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)):
        res = sample_loop(process, denoiser, (2, *SHAPE), num_steps=7, solver=solver,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert res.nfe == per_step * 7 and res.steps == 7 and res.sample.shape == (2, *SHAPE)


def _paper_recursion(lam: np.ndarray, n: int, scheme: str) -> float:
    """The scalar variance recursions of the paper's notebook, derived here from the equations (an
    independent path to the same numbers: no process, no solver)."""
    eps = 1e-3
    beta = lambda t: 0.05 + 9.95 * t  # noqa: E731
    big_b = lambda t: 0.05 * t + 9.95 * t * t / 2  # noqa: E731
    var_t = lambda t: np.exp(-2 * big_b(t)) * lam + 1 - np.exp(-2 * big_b(t))  # noqa: E731
    grid = [eps + (1 - eps) * k / (n - 1) for k in range(n - 1, -1, -1)]
    v = var_t(1.0)
    for t, s in zip(grid[:-1], grid[1:]):
        h = t - s
        k1 = 1 + h * beta(t) * (1 - 1 / var_t(t))  # Euler gain of the PF-ODE -βx + βx/v_t
        if scheme == "euler":
            v = k1**2 * v
        elif scheme == "heun":
            v = (1 + h / 2 * beta(t) * (1 - 1 / var_t(t)) + h / 2 * beta(s) * (1 - 1 / var_t(s)) * k1) ** 2 * v
        else:
            v = (1 + h * beta(t) * (1 - 2 / var_t(t))) ** 2 * v + 2 * h * beta(t)
    return float(np.sqrt(np.sum((np.sqrt(v) - np.sqrt(lam)) ** 2)))


@pytest.mark.parametrize("scheme", list(PUBLISHED))
def test_solver_code_equals_the_scalar_recursion(table, lam, scheme):
    """Beyond ±0.01: the project's solvers give the paper's recursion to round-off (N = 50)."""
    ref = _paper_recursion(lam.flatten().numpy(), 50, scheme)
    assert table[scheme, 50][0] == pytest.approx(ref, rel=1e-9, abs=1e-10)


def test_exact_propagation_is_the_solver_run(lam):
    """The helper's shortcuts equal the plain runs: a deterministic solver is ``a ⊙ x_1`` on any ``x_1``, and
    an EM step drawn from a generator is ``A z + B ξ`` with the generator's ξ."""
    process = paper_process()
    denoiser = exact_denoiser(process, lam)
    x1 = randn((3, *SHAPE), torch.Generator().manual_seed(1), dtype=torch.float64)
    a, _ = deterministic_gain(process, denoiser, 9, "heun")
    run = sample_loop(process, denoiser, x1.shape, num_steps=9, solver="heun", dtype=torch.float64, z_init=x1)
    torch.testing.assert_close(run.sample, a * x1, rtol=1e-12, atol=1e-12)

    t, s = 0.6, 0.55
    one = torch.ones((1, *SHAPE), dtype=torch.float64)
    ab = process.reverse_sde_step(denoiser, torch.cat([one, 0 * one]), t, s, torch.cat([0 * one, one]))
    got = process.reverse_step(denoiser, x1, t, s, solver="euler_maruyama", generator=torch.Generator().manual_seed(5))
    xi = randn(x1.shape, torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(got, ab[0] * x1 + ab[1] * xi, rtol=1e-12, atol=1e-12)
    # per-sample generators drive the same step (one noise stream per sample)
    g = PerSampleGenerator(3, range(3))
    got = process.reverse_step(denoiser, x1, t, s, solver="euler_maruyama", generator=g)
    xi = randn(x1.shape, PerSampleGenerator(3, range(3)), dtype=torch.float64)
    torch.testing.assert_close(got, ab[0] * x1 + ab[1] * xi, rtol=1e-12, atol=1e-12)


def test_sde_variance_matches_monte_carlo():
    """The propagated EM variance equals the empirical variance of the stochastic sampler (4 coordinates,
    20 000 samples, 20 steps: within 5 standard errors)."""
    lam4 = torch.tensor([1e-3, 0.1, 1.0, 5.0], dtype=torch.float64)
    process = VPSDEProcess(clip_x0=False)

    def denoiser(z, t):  # the exact (x̂0, ε̂)
        a, s = process.coefficients(t, z)
        var = a * a * lam4 + s * s
        return a * lam4 * z / var, s * z / var

    a1, s1 = process.alpha_sigma(torch.ones(1, dtype=torch.float64))
    var1 = a1**2 * lam4 + s1**2
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((20000, 4), generator=g, dtype=torch.float64) * var1.sqrt()
    out = sample_loop(process, denoiser, x1.shape, num_steps=20, solver="euler_maruyama", generator=g,
                      dtype=torch.float64, z_init=x1).sample
    var = var1.clone()
    one = torch.ones((1, 4), dtype=torch.float64)
    grid = process.timesteps(20)
    for t, s in zip(grid[:-1], grid[1:]):
        ab = process.reverse_sde_step(denoiser, torch.cat([one, 0 * one]), t, s, torch.cat([0 * one, one]))
        var = ab[0] ** 2 * var + ab[1] ** 2
    emp = out.var(0)
    assert torch.all((emp - var).abs() <= 5 * var * math.sqrt(2 / 20000)), (emp, var)


def test_marginals_match_the_sde():
    """α_t, σ_t (and their derivatives) against a numerical integration of the moment equations of
    ``dx = −β_t x dt + √(2β_t) dw``: ``m' = −β_t m`` (m_0 = 1) and ``v' = −2β_t v + 2β_t`` (v_0 = 0)."""
    process = VPSDEProcess()
    beta = lambda t: 0.05 + 9.95 * t  # noqa: E731  (β_min 0.1, β_max 20 with the factor 2)
    ts = [1e-3, 0.1, 0.37, 0.5, 0.9, 1.0]
    tt = torch.tensor(ts, dtype=torch.float64)
    a, s = process.alpha_sigma(tt)
    for i, tq in enumerate(ts):
        m, v = _integrate_to(tq, beta)
        assert a[i].item() == pytest.approx(m, rel=1e-9), tq
        assert s[i].item() ** 2 == pytest.approx(v, rel=1e-8, abs=1e-12), tq
    assert a.dtype == s.dtype == torch.float64
    # derivatives against central differences
    d = 1e-6
    da, ds = process.alpha_sigma_dot(tt[1:-1])
    ap, sp = process.alpha_sigma(tt[1:-1] + d)
    am, sm = process.alpha_sigma(tt[1:-1] - d)
    torch.testing.assert_close(da, (ap - am) / (2 * d), rtol=1e-7, atol=0)
    torch.testing.assert_close(ds, (sp - sm) / (2 * d), rtol=1e-7, atol=0)


def _integrate_to(tq: float, beta, n: int = 4000) -> tuple[float, float]:
    """RK4 of the moment equations from 0 to ``tq`` (n steps; error ~1e-12 here)."""
    h, m, v, t = tq / n, 1.0, 0.0, 0.0
    f = lambda t, y: (-beta(t) * y[0], -2 * beta(t) * y[1] + 2 * beta(t))  # noqa: E731
    for _ in range(n):
        y = (m, v)
        k1 = f(t, y)
        k2 = f(t + h / 2, [y[i] + h / 2 * k1[i] for i in range(2)])
        k3 = f(t + h / 2, [y[i] + h / 2 * k2[i] for i in range(2)])
        k4 = f(t + h, [y[i] + h * k3[i] for i in range(2)])
        m, v = (y[i] + h / 6 * (k1[i] + 2 * k2[i] + 2 * k3[i] + k4[i]) for i in range(2))
        t += h
    return m, v


def test_paper_grid_and_process_basics():
    """The grid is the paper's ``t_k = eps + (1 − eps) k/(N − 1)``; p_1 is N(0, α_1² λ + σ_1²); the
    training times lie in [eps, 1]; ODE solver names are refused by ``reverse_step``."""
    p = VPSDEProcess()
    for n in (2, 50, 1000):
        grid = p.timesteps(n - 1)
        assert len(grid) == n and grid[0] == 1.0 and grid[-1] == pytest.approx(1e-3, abs=1e-15)
        assert np.allclose(np.diff(grid), -(1 - 1e-3) / (n - 1), rtol=0, atol=1e-14)
        assert p.ode_timesteps(n - 1) == grid
    assert len(p.timesteps()) == 1000
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    b1 = 0.05 + 9.95 / 2
    torch.testing.assert_close(pT_variance(p, lam), math.exp(-2 * b1) * lam + 1 - math.exp(-2 * b1))
    t = p.sample_time(1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.min() >= 1e-3 and t.max() <= 1.0
    with pytest.raises(ValueError, match="sample_loop"):
        p.reverse_step(denoiser_for(p, lambda z, t: z), torch.zeros(1, 2), 0.5, 0.4, solver="heun")
    assert w2_diag(lam, lam) == 0.0

