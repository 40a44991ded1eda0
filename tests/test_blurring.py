"""Blurring diffusion (Hoogeboom & Salimans 2022; processes/blurring.py): the forward marginal against its closed
form written independently (the paper's appendix formulas, scipy's orthonormal DCT), the limit cases, the
analytic α', σ' against finite differences, the ancestral step against the paper's ``denoise``, sampling with
the exact denoiser of Gaussian data, and a CLI fit of configs/blurring_shapes.yaml. Numerics in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch
from scipy.special import expit

from diffproc.nets.precond import denoiser_for
from diffproc.processes.base import build_process
from diffproc.processes.blurring import BlurringDiffusionProcess
from diffproc.samplers import sample_loop
from clitools import REPO, TINY, run_cli

F64 = torch.float64


def _x(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def paper_alpha_sigma(t: float, h: int, w: int, sigma_blur_max=20.0, min_scale=1e-3, logsnr_min=-10.0,
                      logsnr_max=10.0):
    """The paper's appendix ``get_alpha_sigma`` in numpy: α ``(H, W)`` and the scalar σ at time ``t``."""
    sigma_blur = sigma_blur_max * np.sin(t * np.pi / 2) ** 2
    tau = sigma_blur**2 / 2
    fh, fw = np.pi * np.arange(h) / h, np.pi * np.arange(w) / w
    lam = fh[:, None] ** 2 + fw[None, :] ** 2
    scaling = np.exp(-lam * tau) * (1 - min_scale) + min_scale
    limit_max = np.arctan(np.exp(-0.5 * logsnr_max))
    limit_min = np.arctan(np.exp(-0.5 * logsnr_min)) - limit_max
    logsnr = -2 * np.log(np.tan(limit_min * t + limit_max))
    return np.sqrt(expit(logsnr)) * scaling, float(np.sqrt(expit(-logsnr)))


def dct(x):
    return scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")


def idct(u):
    return scipy.fft.idctn(u, axes=(-2, -1), norm="ortho")


# --- 1. the forward marginal is the closed form --------------------------------------------------------
def test_forward_is_the_closed_form():
    """``forward(z0, t, ε)`` = IDCT(α_t ⊙ DCT(z0)) + σ_t ε with α_t, σ_t from the paper's formulas and scipy's DCT,
    to 1e-12, on a non-square image (H ≠ W catches a transposed λ grid) with B = W (catches a σ that broadcasts
    against W instead of the batch)."""
    B, C, H, W = 8, 2, 6, 8
    p = BlurringDiffusionProcess().set_geometry((H, W), C)
    z0, eps = _x((B, C, H, W), 0), _x((B, C, H, W), 1)
    ts = [0.0, 0.013, 0.25, 0.37, 0.5, 0.71, 0.9, 1.0]
    out = p.forward(z0, torch.tensor(ts, dtype=F64), eps).numpy()
    for i, t in enumerate(ts):
        a, s = paper_alpha_sigma(t, H, W)
        ref = idct(a * dct(z0[i].numpy())) + s * eps[i].numpy()
        assert np.abs(out[i] - ref).max() < 1e-12, t
        pa, ps = p.alpha_sigma(torch.tensor([t], dtype=F64))
        assert pa.shape == (1, H, W) and ps.shape == (1, 1, 1)
        assert np.abs(pa[0].numpy() - a).max() < 1e-14 and abs(float(ps) - s) < 1e-14
    # log-SNR of the DC coefficient (d = 1) runs from logsnr_max to logsnr_min
    a, s = p.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.allclose(2 * (a[:, 0, 0].log() - s[:, 0, 0].log()), torch.tensor([10.0, -10.0], dtype=F64))


def test_forward_marginal_moments_over_noise_draws():
    """Over 20 000 noise draws the DCT coefficients of z_t have mean α_t ⊙ u0 and variance σ_t² (5 standard
    errors per coefficient, and the average variance ratio within 2%)."""
    p = BlurringDiffusionProcess().set_geometry(8, 1)
    n, t = 20000, 0.3
    z0 = _x((1, 1, 8, 8), 2).expand(n, 1, 8, 8)
    u = p.to_basis(p.forward(z0, torch.full((n,), t, dtype=F64), _x((n, 1, 8, 8), 3)))
    a, s = paper_alpha_sigma(t, 8, 8)
    mean = torch.from_numpy(a * dct(z0[0, 0].numpy()))
    assert ((u.mean(0)[0] - mean).abs() / (s / math.sqrt(n))).max() < 5
    ratio = u.var(0)[0] / s**2
    assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / n) and abs(float(ratio.mean()) - 1) < 0.02


def test_limit_cases():
    """t = 0 is the identity (d_0 = 1; exactly so once the log-SNR clip is lifted); a long dissipation time sends
    every non-constant frequency's scaling to d_min while the DC coefficient is never blurred; t = 1 is noise up to
    α_1 ≤ e^{-5}; d_min = 1 or σ_B,max = 0 is the plain cosine schedule, isotropic in pixels; the scaling decreases
    with t and with the frequency (coarse to fine)."""
    z0, eps = _x((2, 3, 8, 8), 0), _x((2, 3, 8, 8), 1)
    p = BlurringDiffusionProcess(logsnr_max=80.0).set_geometry(8, 3)
    assert (p.forward(z0, torch.zeros(2, dtype=F64), eps) - z0).abs().max() < 1e-13
    p = BlurringDiffusionProcess().set_geometry(8, 3)
    a0, s0 = p.alpha_sigma(torch.zeros(1, dtype=F64))
    assert torch.equal(p.frequency_scaling(torch.zeros(1, dtype=F64)), torch.ones(1, 8, 8, dtype=F64))
    assert abs(float(s0) - math.sqrt(expit(-10.0))) < 1e-15 and (a0 - math.sqrt(expit(10.0))).abs().max() < 1e-15

    d = BlurringDiffusionProcess(sigma_blur_max=200.0).set_geometry(8, 3).frequency_scaling(torch.ones(1, dtype=F64))
    assert d[0, 0, 0] == 1.0 and (d[0].flatten()[1:] - 1e-3).abs().max() < 1e-15
    a1, s1 = p.alpha_sigma(torch.ones(1, dtype=F64))
    assert a1.max() <= math.exp(-5) and (p.forward(z0, torch.ones(2, dtype=F64), eps) - eps).abs().max() < 0.05

    t = torch.tensor([0.1, 0.4, 0.8], dtype=F64)
    for flat in (BlurringDiffusionProcess(min_scale=1.0), BlurringDiffusionProcess(sigma_blur_max=0.0)):
        flat.set_geometry(8, 3)
        a, s = flat.noise_scaling(t)
        ref = a.view(-1, 1, 1, 1) * z0[:1] + s.view(-1, 1, 1, 1) * eps[:1]
        assert (flat.forward(z0[:1].expand(3, -1, -1, -1), t, eps[:1].expand(3, -1, -1, -1)) - ref).abs().max() < 1e-14

    d = p.frequency_scaling(torch.linspace(0, 1, 21, dtype=F64))
    assert (d[1:] <= d[:-1]).all()  # in t
    assert (d[:, 1:, :] <= d[:, :-1, :]).all() and (d[:, :, 1:] <= d[:, :, :-1]).all()  # in frequency


# --- 2. α', σ' -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{}, dict(sigma_blur_max=3.0, min_scale=0.05, logsnr_min=-6.0, logsnr_max=8.0)])
def test_alpha_sigma_dot_matches_finite_differences(cfg):
    p = BlurringDiffusionProcess(**cfg).set_geometry((6, 8), 1)
    t = torch.tensor([0.02, 0.3, 0.5, 0.77, 0.98], dtype=F64)
    h = 1e-6
    (ap, sp), (am, sm) = p.alpha_sigma(t + h), p.alpha_sigma(t - h)
    da, ds = p.alpha_sigma_dot(t)
    assert da.shape == (5, 6, 8) and ds.shape == (5, 1, 1)
    fa, fs = (ap - am) / (2 * h), (sp - sm) / (2 * h)
    assert ((da - fa).abs().amax((1, 2)) / fa.abs().amax((1, 2))).max() < 1e-7
    assert ((ds - fs).abs() / fs.abs()).max() < 1e-7


# --- 3. the ancestral step is the paper's `denoise` --------------------------------------------------------
def paper_denoise(z_t, hat_eps, noise, t, s, delta):
    """The appendix's ``denoise`` from t to s (its ``t − 1/T``), numpy, one image ``(C, H, W)``; the draw
    ``noise`` is given in pixels (``DCT(noise)`` is the paper's frequency-space ε)."""
    h, w = z_t.shape[-2:]
    alpha_s, sigma_s = paper_alpha_sigma(s, h, w)
    alpha_t, sigma_t = paper_alpha_sigma(t, h, w)
    alpha_ts = alpha_t / alpha_s
    alpha_st = 1 / alpha_ts
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    sigma2_denoise = 1 / np.clip(1 / np.clip(sigma_s**2, delta, None) + alpha_ts**2 / np.clip(sigma2_ts, delta, None),
                                 delta, None)
    coeff_term1 = alpha_ts * sigma2_denoise / (sigma2_ts + delta)
    coeff_term2 = alpha_st * sigma2_denoise / np.clip(sigma_s**2, delta, None)
    u_t = dct(z_t)
    mu = idct(coeff_term1 * u_t) + idct(coeff_term2 * (u_t - sigma_t * dct(hat_eps)))
    return mu + idct(np.sqrt(sigma2_denoise) * dct(noise))


@pytest.mark.parametrize("t, s", [(0.5, 0.499), (0.9, 0.7), (1.0, 0.999), (0.002, 0.001), (0.001, 0.0)])
def test_ancestral_step_is_the_papers_denoise(t, s):
    """``reverse_step(solver="ancestral")`` equals the appendix's ``denoise`` for the same ε̂ and noise: to 1e-10
    with its guard δ → 0. With the paper's δ = 1e-8 the two differ by < 2e-3 (on values of size ~3): δ is added to
    σ²_ts ~ 1e-5 on the last steps, and by < 1e-5 elsewhere."""
    p = BlurringDiffusionProcess().set_geometry((6, 8), 2)
    z, out = _x((3, 2, 6, 8), 4), _x((3, 2, 6, 8), 5)
    y = p.reverse_step(denoiser_for(p, lambda zz, tt: out), z, t, s, "ancestral",
                       torch.Generator().manual_seed(7)).numpy()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=F64).numpy()
    for i in range(3):
        ref = paper_denoise(z[i].numpy(), out[i].numpy(), noise[i], t, s, 0.0)
        assert np.abs(y[i] - ref).max() < 1e-10
        ref = paper_denoise(z[i].numpy(), out[i].numpy(), noise[i], t, s, 1e-8)
        assert np.abs(y[i] - ref).max() < (2e-3 if s < 0.01 else 1e-5)


# --- 4. sampling with the exact denoiser reproduces the data law ----------------------------------------------
H = W = 8


def _data_law():
    """Gaussian data with a smooth mean image and an image-like decaying spectrum, diagonal in the DCT basis
    (``m``, ``v``: mean and variance of each DCT coefficient, ``(H, W)``)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, dtype=F64), torch.linspace(-1, 1, W, dtype=F64), indexing="ij")
    m = torch.from_numpy(dct((0.4 * torch.tanh(3 * xx) - 0.2 * yy).numpy()))
    k = torch.arange(H, dtype=F64)
    v = 0.3 / (1.0 + k[:, None] ** 2 + k[None, :] ** 2)
    return m, v


def exact_eps(process, m, v):
    """The exact denoiser per DCT coefficient: ε̂ = E[ε | u_t] = σ (u_t − α m) / (α² v + σ²) and
    x̂0 = E[u0 | u_t] = m + α v (u_t − α m) / (α² v + σ²), in the process basis (what any head approximates)."""

    def denoiser(z, t):
        u = process.to_basis(z)
        a, s = process.coefficients(t, u)
        r = (u - a * m) / (a * a * v + s * s)
        return m + a * v * r, s * r

    return denoiser


def _law_at(process, t, m, v):
    a, s = process.alpha_sigma(torch.tensor([t], dtype=F64))
    return a[0] * m, a[0] ** 2 * v + s[0] ** 2


def _affine_map_errors(process, m, v, solver, steps):
    """Per-coefficient errors of a deterministic sampler with the exact denoiser. The sampler is then an affine map
    u_1 ↦ g ⊙ u_1 + b (read off from two runs); pushing the exact law at t = 1, N(α_1 m, α_1² v + σ_1²), through it
    must give the law at t = 0, N(α_0 m, α_0² v + σ_0²) (the data, to the clipped log-SNR). Returns the relative
    variance error and the mean error in standard deviations."""
    z_init = process.from_basis(torch.stack([torch.zeros(1, H, W, dtype=F64), torch.ones(1, H, W, dtype=F64)]))
    res = sample_loop(process, exact_eps(process, m, v), z_init.shape, num_steps=steps, solver=solver, dtype=F64,
                      z_init=z_init)
    assert res.timesteps[0] == 1.0 and res.timesteps[-1] == 0.0
    u = process.to_basis(res.sample)[:, 0]
    b, g = u[0], u[1] - u[0]
    (m1, v1), (m0, v0) = _law_at(process, 1.0, m, v), _law_at(process, 0.0, m, v)
    return ((g * g * v1 / v0) - 1).abs(), (g * m1 + b - m0).abs() / v0.sqrt()


@pytest.mark.parametrize("solver, steps, order, var_tol, mean_tol", [
    ("ddim", (100, 400), (3.0, 5.0), 0.07, 1e-10),          # first order; keeps the mean exactly
    ("dpmpp_2m", (100, 400), (10.0, 20.0), 0.01, 1e-10),    # second order (DPM-Solver++(2M))
    ("heun", (25, 100), (12.0, 20.0), 0.02, 1e-3),          # second order on the PF-ODE (uses alpha_sigma_dot)
])
def test_deterministic_samplers_reproduce_the_data_law(solver, steps, order, var_tol, mean_tol):
    """DDIM, DPM-Solver++(2M) and Heun with the exact denoiser of Gaussian data carry the exact law at t = 1 to the
    data law at t = 0 (:func:`_affine_map_errors`), with the error shrinking at the solver's order: 4x the steps
    divides the worst coefficient's variance error by about 4 (first order) or 16 (second). The worst coefficient is
    the highest frequency, whose α_t falls from 1 to d_min within t < 0.2 (measured: DDIM 0.21 → 5.6e-2,
    2M 0.11 → 8.9e-3, Heun 0.29 → 1.8e-2)."""
    p = BlurringDiffusionProcess().set_geometry(H, 1)
    m, v = _data_law()
    (ev_c, _), (ev, em) = (_affine_map_errors(p, m, v, solver, n) for n in steps)
    assert order[0] < float(ev_c.max() / ev.max()) < order[1]
    assert ev.max() < var_tol and em.max() < mean_tol


def _ancestral_law(process, denoiser, steps, mu, var):
    """The exact law after the ancestral sampler on ``timesteps(steps)`` from N(mu, diag var) (DCT coefficients):
    with the exact denoiser each step is u_s = G ⊙ u_t + K + √(posterior var) ξ, G and K read off the core's
    posterior mean at u_t = 0 and 1, so mean and variance propagate in closed form."""
    u = torch.stack([torch.zeros(1, H, W, dtype=F64), torch.ones(1, H, W, dtype=F64)])
    z = process.from_basis(u)
    ts = process.timesteps(steps)
    for t, s in zip(ts[:-1], ts[1:]):
        tb, sb = torch.full((2,), t, dtype=F64), torch.full((2,), s, dtype=F64)
        u0, _ = process.predict(denoiser, z, tb)
        mean, var_small, _ = process.posterior(u, u0, tb, sb)
        gain, shift = mean[1, 0] - mean[0, 0], mean[0, 0]
        mu, var = gain * mu + shift, gain * gain * var + var_small[0, 0]
    return mu, var


def test_ancestral_sampler_reproduces_the_data_law():
    """The paper's sampler (``ancestral``) with the exact denoiser, from the exact law at t = 1: (a) its output law,
    propagated exactly (:func:`_ancestral_law`), is the data law up to a first-order discretisation error (the worst
    coefficient's variance off by 0.18 at 250 steps, 0.053 at the paper's T = 1000; the mean exact); (b) 4000
    samples drawn with ``reverse_step`` on a 50-step grid have that propagated law (each coefficient's mean within 5
    standard errors, its variance within 5 standard errors, the average variance ratio within 1.5%)."""
    p = BlurringDiffusionProcess().set_geometry(H, 1)
    m, v = _data_law()
    denoiser = exact_eps(p, m, v)
    m1, v1 = _law_at(p, 1.0, m, v)
    m0, v0 = _law_at(p, 0.0, m, v)
    (_, var_c), (mu, var) = (_ancestral_law(p, denoiser, n, m1, v1) for n in (250, 1000))
    err_c, err = (var_c / v0 - 1).abs().max(), (var / v0 - 1).abs().max()
    assert 3.0 < float(err_c / err) < 5.0 and err < 0.06 and ((mu - m0).abs() / v0.sqrt()).max() < 1e-10

    n = 4000
    mu, var = _ancestral_law(p, denoiser, 50, m1, v1)
    z_init = p.from_basis(m1 + v1.sqrt() * _x((n, 1, H, W), 8))
    res = sample_loop(p, denoiser, z_init.shape, num_steps=50, solver="ancestral", dtype=F64, z_init=z_init,
                      generator=torch.Generator().manual_seed(9))
    u = p.to_basis(res.sample)[:, 0]
    assert ((u.mean(0) - mu).abs() / (var / n).sqrt()).max() < 5
    ratio = u.var(0) / var
    assert (ratio - 1).abs().max() < 5 * math.sqrt(2 / n) and abs(float(ratio.mean()) - 1) < 0.015


# --- 5. API ----------------------------------------------------------------------------------------------------
def test_grid_time_law_config_and_errors():
    p = BlurringDiffusionProcess()
    with pytest.raises(ValueError, match="set_geometry"):
        p.alpha_sigma(torch.zeros(1, dtype=F64))
    assert p.timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0] and len(p.timesteps()) == 1001
    t = p.sample_time(1000, torch.Generator().manual_seed(0))
    assert t.dtype == F64 and 0 <= float(t.min()) and float(t.max()) < 1 and abs(float(t.mean()) - 0.5) < 0.03
    assert torch.equal(p.model_time(torch.tensor([0.25], dtype=F64)), torch.tensor([250.0]))
    q = build_process(BlurringDiffusionProcess(sigma_blur_max=7.0, clip_x0=True).config)
    assert isinstance(q, BlurringDiffusionProcess) and q.sigma_blur_max == 7.0 and q.clip_x0
    for bad in (dict(min_scale=0.0), dict(sigma_blur_max=-1.0), dict(logsnr_min=5.0, logsnr_max=5.0),
                dict(default_solver="official")):
        with pytest.raises(ValueError):
            BlurringDiffusionProcess(**bad)
    with pytest.raises(ValueError, match="sample_loop"):
        p.set_geometry(8, 1).reverse_step(lambda z, t: z, torch.zeros(1, 1, 8, 8), 0.5, 0.4, "heun")


# --- 6. the config fits end to end --------------------------------------------------------------------------
def test_cli_fit_and_predict(tmp_path):
    """A 3-step fit of configs/blurring_shapes.yaml through the CLI (DiffusionModule + this process, nothing
    else), then a short predict with the paper's ancestral sampler."""
    log = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    run_cli("fit", "--config", "configs/blurring_shapes.yaml", "--trainer.max_steps", "3", *TINY, *log)
    run = tmp_path / "blurring_shapes" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "BlurringDiffusionProcess" in (run / "config.yaml").read_text()
    pred = tmp_path / "pred"
    run_cli("predict", "--config", "configs/blurring_shapes.yaml", "--ckpt_path", str(ckpt), *TINY, *log,
            "--model.init_args.sampling.solver", "ancestral", "--model.init_args.predict_num_samples", "3",
            "--model.init_args.predict_dir", str(pred))
    assert len(list(pred.glob("0*.png"))) == 3
    assert REPO.joinpath("configs/blurring_shapes.yaml").is_file()
