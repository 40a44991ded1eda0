"""GDDM / LDDM / hybrid: process (methods_gddm_epdm.md §2.4-2.8), method, and CLI.

The operator checks §2.10.1-8 live in tests/test_ops.py; here §2.10.9-12 plus domain round trips,
operator-noise equivalence, Poisson-net training and few-step CLI fits.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from diffproc.callbacks.gddm_diagnostics import GDDMDiagnostics, diagnostics
from diffproc.data.shapes import ShapesDataModule, generate_shapes
from diffproc.errors import ConfigError
from diffproc.methods.gddm import GDDM
from diffproc.nets.precond import EpsHead, ModeEDM, denoiser_for, sigma_data_spectrum
from modules import build, gddm
from diffproc.ops import grad
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.gradient_stats import (image_snr_crossing, integrability, mode_snr_crossing, signal_energy,
                                               snr_crossing, sparsity)
from diffproc.samplers import SamplingSpec, sample_loop

ROOT = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [16, 32], "layers_per_block": 1}



def image_view(p, parameterisation="x0", spectrum=None, colour_basis=None, weighting="edm"):
    """GDDM's image-view head on process ``p`` (16² RGB), with a σ_data spectrum ((H, W), or (C, H, W) with a colour
    basis) set by hand; None: the scalar σ_data."""
    mode = "uniform" if spectrum is None else ("spectrum_colour" if spectrum.dim() == 3 else "spectrum")
    h = ModeEDM(parameterisation=parameterisation, weighting=weighting, sigma_data_mode=mode).setup(p, 16, 3)
    if spectrum is not None:
        h.spectrum.copy_(spectrum)
        h.count.fill_(1.0)
    if colour_basis is not None:
        h.colour_basis.copy_(colour_basis)
    return h

def shapes(n: int, size: int, dtype=torch.float64) -> torch.Tensor:
    imgs, _ = generate_shapes(n, size, seed=0, start=0)
    return imgs.to(dtype) / 127.5 - 1


def rand_images(b=2, c=3, h=16, w=12, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=torch.float64) * 2 - 1


# --- domain maps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["gradient", "laplacian", "hybrid"])
@pytest.mark.parametrize("dc_mode", ["aux", "oracle", "dataset_mean", "poisson_net"])
def test_domain_round_trip(domain, dc_mode):
    """from_domain(to_domain(x)) == x for every domain and DC source (float64, non-square)."""
    x = rand_images()
    m = x.mean(dim=(-2, -1))
    ds_mean = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    p = GradientDomainProcess(domain=domain, dc_mode=dc_mode, dataset_mean=ds_mean)
    z = p.to_domain(x)
    assert z.shape[1] == p.domain_channels(3) == {"gradient": 6, "laplacian": 3, "hybrid": 9}[domain] + (
        3 if dc_mode == "aux" and domain != "hybrid" else 0)
    if dc_mode in ("oracle", "poisson_net"):
        assert (p.from_domain(z, dc=m) - x).abs().max() < 1e-10
        if domain != "hybrid" or dc_mode == "oracle":
            with pytest.raises(ValueError, match="dc"):
                p.from_domain(z)
    elif dc_mode == "dataset_mean":  # exact shape, the mean replaced by the dataset mean
        want = x - m[..., None, None] + ds_mean[:, None, None]
        assert (p.from_domain(z) - want).abs().max() < 1e-10
    else:
        assert (p.from_domain(z) - x).abs().max() < 1e-10
    # float32 goes through the float64 solve and comes back float32
    x32 = x.float()
    dc = m.float() if dc_mode in ("oracle", "poisson_net") else None
    out = p.from_domain(p.to_domain(x32), dc)
    assert out.dtype == torch.float32
    if dc_mode != "dataset_mean":
        assert (out - x32).abs().max() < 1e-4


def test_noise_scale_overrides_and_bounds():
    """The stencil normalisation and its literal-paper override; clean states lie inside the clip box."""
    x = rand_images(4)
    p = GradientDomainProcess(domain="laplacian", dc_mode="oracle")
    lit = GradientDomainProcess(domain="laplacian", dc_mode="oracle", laplacian_noise_scale=1.5811)
    assert p.s_l == pytest.approx(math.sqrt(20))
    q = GradientDomainProcess(domain="laplacian", laplacian_stencil="5point_quarter", dc_mode="oracle")
    assert q.s_l == pytest.approx(math.sqrt(5) / 2)
    # the quarter stencil with its own scale gives the same normalised domain (the choice cancels, §0.5)
    assert (q.to_domain(x) - p.to_domain(x)).abs().max() < 1e-12
    # the literal √(5/2) with the 5-point stencil raises the field energy 20/2.5 = 8x
    assert (signal_energy(lit, lit.to_domain(x)) / signal_energy(p, p.to_domain(x))).sub(8.0).abs().max() < 1e-3
    g = GradientDomainProcess(domain="gradient", gradient_noise_scale=2.0, dc_mode="oracle")
    assert (g.to_domain(x) * 2.0 - grad(x)).abs().max() < 1e-12
    for domain in ("gradient", "laplacian", "hybrid"):
        pr = GradientDomainProcess(domain=domain)
        z = pr.to_domain(torch.sign(x))  # extreme images reach the box edges
        b = pr._bounds(3, z)
        assert (z.abs() <= b + 1e-12).all()


# --- §2.10.9 exact-denoiser round trip ---------------------------------------------------------------
@pytest.mark.parametrize("domain", ["gradient", "laplacian", "hybrid"])
@pytest.mark.parametrize("dc_mode", ["aux", "oracle"])
@pytest.mark.parametrize("solver", ["ancestral", "ddim"])
def test_exact_denoiser_round_trip(domain, dc_mode, solver):
    """Delta data x*: the exact ε-denoiser through the sampler and the reconstruction returns x* (≤1e-8)."""
    x_star = rand_images(2, 3, 16, 16, seed=3)
    p = GradientDomainProcess(domain=domain, dc_mode=dc_mode)
    z_star = p.to_domain(x_star)

    def model_fn(z, t):
        a, s = p.coefficients(t, z)
        return (z - a * z_star) / s

    g = torch.Generator().manual_seed(0)
    res = sample_loop(p, denoiser_for(p, model_fn), z_star.shape, 10, solver, g, dtype=torch.float64)
    dc = x_star.mean(dim=(-2, -1)) if dc_mode == "oracle" else None
    x = p.from_domain(res.sample, dc)
    assert res.nfe == 10
    assert (x - x_star).abs().max() < 1e-8


def test_exact_denoiser_noisy_last_step_marginal():
    """Stopping at t=1 (last step keeps its fixed-small noise): the exact sampler reproduces the marginal
    q(z_1 | z*) = N(sqrt(γ_1) z*, 1−γ_1), so the error is within 6x the last step's noise std."""
    x_star = rand_images(2, 3, 16, 16, seed=4)
    p = GradientDomainProcess(domain="gradient", dc_mode="oracle")
    z_star = p.to_domain(x_star)

    def model_fn(z, t):
        a, s = p.coefficients(t, z)
        return (z - a * z_star) / s

    grid = p.timesteps(10)[:-1] + [1]
    g = torch.Generator().manual_seed(0)
    z = sample_loop(p, denoiser_for(p, model_fn), z_star.shape, timesteps=grid, generator=g, dtype=torch.float64).sample
    a1, s1 = (v.item() for v in p.alpha_sigma(torch.tensor([1])))
    r = (z - a1 * z_star) / s1
    assert r.std().item() == pytest.approx(1.0, rel=0.05)
    assert r.abs().max().item() < 6


# --- operator noise = image DDPM seen through the operator -------------------------------------------
@pytest.mark.parametrize("domain", ["gradient", "laplacian", "hybrid"])
def test_operator_noise_equivalence(domain):
    x0 = rand_images(3, 3, 16, 16)
    eps = rand_images(3, 3, 16, 16, seed=7) * 1.7
    t = torch.tensor([1, 400, 1000])
    p = GradientDomainProcess(domain=domain, noise_kind="operator")
    ddpm = DDPMProcess()
    z_t = p.forward(p.to_domain(x0), t, p.to_domain(eps))
    assert (z_t - p.to_domain(ddpm.forward(x0, t, eps))).abs().max() < 1e-12
    # noise drawn by the process (training and sampling) is to_domain(image noise): integrable, aux constant
    g = torch.Generator().manual_seed(0)
    n = p.noise_like(z_t, g)
    pr = p.prior(tuple(z_t.shape), g, dtype=torch.float64)
    for s in (n, pr):
        ig = integrability(p, s)
        assert ig["ls_residual"] < 1e-12
        if domain != "laplacian":
            assert ig["curl_energy"] < 1e-12
    # i.i.d. noise is not integrable
    assert integrability(GradientDomainProcess(domain=domain), torch.randn(3, z_t.shape[1], 16, 16))["ls_residual"] > 0.01
    # the loss's state is integrable too (operator noise in training)
    seen = []
    p.loss(denoiser_for(p, lambda z, tt: seen.append(z) or torch.zeros_like(z)), p.to_domain(x0), generator=g)
    assert integrability(p, seen[0])["ls_residual"] < 1e-6


def test_forward_noise_statistics():
    """std(z_t − sqrt(γ) z0) = sqrt(1−γ) for i.i.d. and (interior entries) operator noise (§2.10.7)."""
    x0 = shapes(32, 32)
    g = torch.Generator().manual_seed(0)
    for domain in ("gradient", "laplacian"):
        for noise in ("iid", "operator"):
            p = GradientDomainProcess(domain=domain, noise_kind=noise, dc_mode="oracle")
            z0 = p.to_domain(x0)
            t = torch.full((32,), 500)
            a, s = p.alpha_sigma(t[:1])
            z_t = p.forward(z0, t, p.noise_like(z0, g))
            r = (z_t - a.item() * z0)[..., 1:-1, 1:-1]  # interior: every entry of Dε/√2, Lε/√20 has unit variance
            assert r.std().item() == pytest.approx(s.item(), rel=0.02), (domain, noise)


# --- §2.10.10-11 sparsity and faster forward convergence -------------------------------------------
def test_sparsity_claim_on_shapes():
    s = sparsity(GradientDomainProcess(), shapes(64, 32), delta=0.02)
    assert s["domain_frac"] > s["image_frac"]
    assert s["domain_kurtosis"] > 3
    assert s["domain_l1_l2"] < s["image_l1_l2"]


def test_faster_forward_convergence():
    """SNR<0.01 crossing: t_lap < t_grad < t_img on every shapes image and t_lap < t_grad < t_img on photographs
    (skimage astronaut/coffee at 64², spec §2.4 table: 593/361/258 and 583/283/188)."""
    ab = DDPMProcess().alphas_bar
    grad_p = GradientDomainProcess(domain="gradient")
    lap_p = GradientDomainProcess(domain="laplacian")
    x = shapes(16, 32)
    assert (snr_crossing(grad_p, x) < image_snr_crossing(x, ab)).all()
    assert (snr_crossing(lap_p, x) < snr_crossing(grad_p, x)).all()
    skimage = pytest.importorskip("skimage")
    from skimage import data, transform

    want = {"astronaut": (593, 361, 258), "coffee": (583, 283, 188)}
    for name, (ti, tg, tl) in want.items():
        im = transform.resize(getattr(data, name)(), (64, 64), anti_aliasing=True)
        x = torch.tensor(im, dtype=torch.float64).permute(2, 0, 1)[None] * 2 - 1
        t_img, t_grad, t_lap = int(image_snr_crossing(x, ab)), int(snr_crossing(grad_p, x)), int(snr_crossing(lap_p, x))
        assert t_lap < t_grad < t_img
        assert abs(t_img - ti) <= 20 and abs(t_grad - tg) <= 10 and abs(t_lap - tl) <= 10, (name, t_img, t_grad, t_lap)


def test_mode_snr_crossing():
    """When each image DCT mode's SNR crosses 1 (docs/gddm.md §5), on the shapes data's per-mode RMS: the brute
    force definition; a noise scale s/k is the SNR shift k² (= σ_d·k) of every mode but the DC; image DDPM (operator noise) spreads
    the modes' crossings over a wider range of t than GDDM (which decides them all at once); LDDM decides its
    lowest modes last, at t ≤ 2 with the normalised scale."""
    from diffproc.ops import dct2

    sd = dct2(shapes(256, 16)).pow(2).mean((0, 1)).sqrt()  # (16, 16) RMS per mode over images and channels
    ab = DDPMProcess().alphas_bar
    lap = GradientDomainProcess(domain="laplacian")
    t = mode_snr_crossing(lap, sd)
    c = lap.mode_noise_scale(16, 16)
    for k in [(0, 1), (3, 5), (15, 15)]:
        want = next(i for i in range(1, 1001) if ab[i] * sd[k] ** 2 < (1 - ab[i]) * c[k] ** 2)
        assert int(t[k]) == want, k
    shifted = GradientDomainProcess(domain="laplacian", laplacian_noise_scale=lap.s_l / 8)
    assert torch.equal(mode_snr_crossing(shifted, sd).flatten()[1:], mode_snr_crossing(lap, 8 * sd).flatten()[1:])
    assert mode_snr_crossing(shifted, sd)[0, 0] == t[0, 0]  # the DC (aux channels) is not scaled
    spread = {}
    for name, p in {"ddpm": GradientDomainProcess(noise_kind="operator"), "gddm": GradientDomainProcess()}.items():
        q = torch.quantile(mode_snr_crossing(p, sd)[1:].double().flatten(), torch.tensor([0.1, 0.9], dtype=torch.float64))
        spread[name] = float(q[1] - q[0])
    assert spread["ddpm"] > 1.5 * spread["gddm"], spread
    assert int(t[0, 1]) <= 2 and int(t[1, 0]) <= 2 and int(t[0, 1]) < int(t[15, 15])


def test_time_sampling_modes():
    """time_sampling='modes': without jitter and uniform share every t is a mode's SNR-1 crossing (±1: nearest
    log-SNR vs first t below it), every mode is drawn; the default mixes in uniform times; it needs σ_data per mode."""
    from diffproc.ops import dct2

    images = shapes(64, 8)
    sd = dct2(images).pow(2).mean((0, 1)).sqrt()
    p = GradientDomainProcess(domain="laplacian")
    h = ModeEDM(sigma_data_mode="spectrum", time_sampling="modes").setup(p, 8, 3)
    with pytest.raises(ValueError, match="no spectrum yet"):
        h.train_time(p, 4, None, "cpu")
    h.estimate(images)
    assert torch.allclose(h.spectrum, sd.double().clamp_min(1e-3))
    cross = mode_snr_crossing(p, sd).flatten()
    h.modes_uniform_share, h.modes_logsnr_std = 0.0, 0.0
    t = h.train_time(p, 4000, torch.Generator().manual_seed(0), "cpu")
    near = (t[:, None] - cross[None, :]).abs() <= 1
    assert near.any(1).all() and near.any(0).all()
    h.modes_uniform_share, h.modes_logsnr_std = 0.5, 2.0
    t = h.train_time(p, 20000, torch.Generator().manual_seed(1), "cpu")
    assert t.min() >= 1 and t.max() <= 1000 and float((t > 600).double().mean()) > 0.18  # the uniform half
    with pytest.raises(ValueError, match="sigma_data_mode"):
        gddm(image_size=8, channels=3, unet=TINY, time_sampling="modes")
    with pytest.raises(ValueError, match="time_sampling"):
        GradientDomainProcess(time_sampling="modes")  # the process's own laws: uniform, quad


# --- process extras ---------------------------------------------------------------------------------
def test_project_every_step_and_clip():
    """project_every_step gives integrable x̂0; clip_x0 keeps x̂0 in the domain's box; ε̂ stays consistent."""
    x_star = rand_images(2, 3, 16, 16, seed=5)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500, 500])
    for domain in ("gradient", "laplacian", "hybrid"):
        for opts in (dict(project_every_step=True), dict(clip_x0=True)):
            p = GradientDomainProcess(domain=domain, **opts)
            z = torch.randn(2, p.domain_channels(3), 16, 16, dtype=torch.float64, generator=g)
            out = torch.randn(z.shape, dtype=torch.float64, generator=g) * 3
            u0, eps = p.predict(denoiser_for(p, lambda zz, tt: out), z, t)
            if "clip_x0" in opts:
                assert (u0.abs() <= p._bounds(3, u0) + 1e-12).all()
                assert (u0 - denoiser_for(p, lambda zz, tt: out)(z, t)[0]).abs().max() > 0.1  # something was clipped
            else:
                assert integrability(p, u0)["ls_residual"] < 1e-10
            a, s = p.coefficients(t, z)
            assert (a * u0 + s * eps - z).abs().max() < 1e-10
        assert (p.project(p.to_domain(x_star)) - p.to_domain(x_star)).abs().max() < 1e-12


def test_bad_options_raise_config_errors():
    with pytest.raises(ValueError, match="domain"):
        gddm(domain="curl", image_size=8, channels=3, unet=TINY)
    with pytest.raises(ConfigError, match="poisson_only"):
        gddm(poisson_net_stage="poisson_only", image_size=8, channels=3, unet=TINY)
    m = gddm(dc_mode="oracle", image_size=8, channels=3, unet=TINY, ema_decay=0)
    with pytest.raises(ConfigError, match="oracle"):
        m.sample(1, SamplingSpec(num_steps=2), progress=False)


# --- method: Poisson network -------------------------------------------------------------------------
def _gddm(**kw) -> GDDM:
    base = dict(image_size=16, channels=3, unet=TINY, poisson_net=TINY, ema_decay=0.9)
    base.update(kw)
    return gddm(**base)


def test_poisson_net_init_is_dct_and_stages():
    """Zero-initialised residual net: the initial error is exactly the DCT solve's DC error (§2.10.12);
    stage flags freeze the right parts; the net is in the checkpoint and outside the EMA."""
    x = shapes(4, 16, torch.float32)
    m = _gddm(dc_mode="poisson_net", reconstruction="poisson_net", poisson_net_stage="joint")
    with torch.no_grad():
        xh = m.reconstruct(m.process.to_domain(x))
    dc_err = x.mean(dim=(-2, -1)).pow(2).mean()
    assert float((xh - x).pow(2).mean()) == pytest.approx(float(dc_err), rel=1e-4)
    keys = m.state_dict().keys()
    assert any(k.startswith("poisson_net.") for k in keys) and not any(k.startswith("ema_unet.poisson") for k in keys)
    assert all(p.requires_grad for p in m.poisson_net.parameters()) and all(p.requires_grad for p in m.unet.parameters())
    sep = _gddm(reconstruction="poisson_net")  # default stage: separate
    assert not any(p.requires_grad for p in sep.poisson_net.parameters())
    only = _gddm(reconstruction="poisson_net", poisson_net_stage="poisson_only")
    assert not any(p.requires_grad for p in only.unet.parameters())
    assert all(p.requires_grad for p in only.poisson_net.parameters())
    # joint with its own learning rate: a second param group holding exactly the Poisson net
    j = _gddm(reconstruction="poisson_net", poisson_net_stage="joint", poisson_lr=5e-5)
    opt = j.configure_optimizers()["optimizer"]
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == pytest.approx(5e-5 * 1 / 1000)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in j.poisson_net.parameters()}
    # no Poisson net for the default configuration
    assert _gddm().poisson_net is None


def test_parameter_groups_hook():
    """GDDM overrides only DiffusionModule.parameter_groups; configure_optimizers builds AdamW from those
    groups and the base's warm-up scales every group's own learning rate."""
    assert "parameter_groups" in GDDM.__dict__ and "configure_optimizers" not in GDDM.__dict__
    plain = _gddm()
    (group,) = plain.parameter_groups()
    assert "lr" not in group and [id(p) for p in group["params"]] == [id(p) for p in plain.parameters()
                                                                       if p.requires_grad]
    # poisson_lr matters only when the Poisson net trains jointly
    for kw in (dict(poisson_net_stage="separate"), dict(poisson_net_stage="poisson_only")):
        assert len(_gddm(reconstruction="poisson_net", poisson_lr=5e-5, **kw).parameter_groups()) == 1
    j = _gddm(reconstruction="poisson_net", poisson_net_stage="joint", poisson_lr=5e-5, lr=1e-3, warmup_steps=4)
    groups = j.parameter_groups()
    net = [id(p) for p in j.poisson_net.parameters()]
    assert len(groups) == 2 and "lr" not in groups[0] and groups[1]["lr"] == 5e-5
    assert [id(p) for p in groups[1]["params"]] == net
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in j.parameters() if p.requires_grad and id(p) not in net]
    cfg = j.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in groups]
    for step in range(6):  # linear warm-up over 4 steps, then constant: the same factor on both groups
        f = min(1.0, (step + 1) / 4)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * f, 5e-5 * f])
        opt.step()
        sched.step()


def _train_poisson(size: int, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    x = shapes(8, size, torch.float32)
    m = _gddm(image_size=size, dc_mode="poisson_net", reconstruction="poisson_net",
              poisson_net_stage="poisson_only", ema_decay=0)
    p = m.process
    z0 = p.to_domain(x)
    e_mean = float((p.from_domain(z0, dc=x.mean(dim=(0, 2, 3)).expand(8, 3)) - x).pow(2).mean())
    with torch.no_grad():
        e0 = float((m.reconstruct(z0) - x).pow(2).mean())
    opt = torch.optim.Adam(m.poisson_net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = m.compute_loss(x, m.unet, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        e1 = float((m.reconstruct(z0) - x).pow(2).mean())
    return e0, e1, e_mean


def test_poisson_net_smoke_short():
    """60 steps at 16²: the learned DC beats the dataset-mean reconstruction (§2.10.12, shortened)."""
    e0, e1, e_mean = _train_poisson(16, 60)
    assert e1 < e_mean < e0


@pytest.mark.slow
def test_poisson_net_smoke_spec():
    """§2.10.12 as written: 200 steps on 8 shapes images at 32²."""
    e0, e1, e_mean = _train_poisson(32, 200)
    assert e1 < e_mean < e0


@pytest.mark.parametrize("kw", [dict(domain="gradient", reconstruction="poisson_net", poisson_net_stage="joint"),
                                dict(domain="laplacian", dc_mode="dataset_mean"),
                                dict(domain="hybrid", dc_mode="poisson_net", precond="eps")])
def test_module_loss_sample_diagnostics(kw):
    torch.manual_seed(0)
    m = _gddm(**kw)
    x = shapes(4, 16, torch.float32)
    m.train()
    loss = m.compute_loss(x, m.unet, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    if m.process.dc_mode == "dataset_mean":  # running mean of the training images
        assert torch.allclose(m.dc_mean, x.double().mean(dim=(0, 2, 3)), atol=1e-6)
    res = m.sample(2, SamplingSpec(num_steps=3), generator=torch.Generator().manual_seed(0), progress=False)
    imgs = res.images
    assert imgs.shape == (2, 3, 16, 16) and imgs.abs().max() <= 1 and res.nfe == 3
    d = diagnostics(m, num=2, spec=SamplingSpec(num_steps=2), x_real=x)
    assert d["gen_ls_residual"] > 0 and d["real_domain_frac"] > d["real_image_frac"]
    assert all(math.isfinite(v) for v in d.values())
    if m.poisson_net is not None:
        assert {"dct_seconds", "poisson_net_seconds", "gen_net_vs_dct_rms", "real_dct_rms", "real_net_rms"} <= d.keys()
    if kw["domain"] != "laplacian":
        assert d["gen_curl_energy"] > 0


def test_gddm_diagnostics_callback(tmp_path):
    """GDDMDiagnostics driven by a real Trainer: sparsity per batch, generated-field and Poisson-net numbers
    per validation / test run, all finite; its cadence is in the checkpoint state."""
    torch.manual_seed(0)
    tiny = {"block_out_channels": [8, 16], "layers_per_block": 1}
    m = gddm(image_size=8, channels=3, unet=tiny, poisson_net=tiny, reconstruction="poisson_net",
             poisson_net_stage="joint", ema_decay=0.9, warmup_steps=1, num_steps=2)
    dm = ShapesDataModule(image_size=8, batch_size=4, num_train=8, num_val=4, num_test=4, random_flip=False)
    cb = GDDMDiagnostics(every_n_val=1, num=2, sampling=SamplingSpec(num_steps=2))  # 2 batches per epoch: validation at step 2
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                        callbacks=[cb])
    trainer.fit(m, dm)
    gen = ["gen_curl_energy", "gen_ls_residual", "gen_seconds", "gen_net_vs_dct_rms", "dct_seconds",
           "poisson_net_seconds", "real_dct_rms", "real_net_rms"]
    sp = ["domain_frac", "image_frac", "domain_kurtosis", "image_kurtosis", "domain_l1_l2", "image_l1_l2"]
    for stage in ("val", "test"):
        if stage == "test":
            trainer.test(m, dm, verbose=False)
        got = trainer.callback_metrics
        for key in [f"{stage}/diag_{k}" for k in gen] + [f"{stage}/sparsity_{k}" for k in sp]:
            assert key in got and math.isfinite(float(got[key])), (key, sorted(got))
        assert not any(k.startswith(f"{stage}/diag_real_domain") for k in got)  # sparsity: per batch only
        assert float(got[f"{stage}/sparsity_domain_frac"]) > float(got[f"{stage}/sparsity_image_frac"])
    assert cb.val_runs == 1 and cb.state_dict() == {"val_runs": 1}


# --- CLI ---------------------------------------------------------------------------------------------
def _cli(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _fit(config: str, tmp: Path, extra: list[str] = ()) -> Path:
    _cli(["fit", "--config", f"configs/{config}", "--trainer.max_steps", "3",
          "--trainer.logger.init_args.save_dir", str(tmp), "--data.init_args.num_train", "32",
          "--data.init_args.num_val", "8", "--data.init_args.image_size", "16",
          "--data.init_args.batch_size", "8", "--trainer.limit_val_batches", "2",
          "--trainer.val_check_interval", "3", "--sample_grid.num_images", "4",
          "--model.init_args.sampling.num_steps", "3", "--gddm_diagnostics.sampling.num_steps", "2",
          "--gddm_diagnostics.num", "2", "--trainer.enable_progress_bar", "false", *extra], tmp)
    runs = sorted(glob.glob(str(tmp / "*" / "version_*")))
    assert runs, "no run directory written"
    run = Path(runs[-1])
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    return run


def _scalars(run: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {k: acc.Scalars(k)[-1].value for k in acc.Tags()["scalars"]}


def test_cli_fit_gradient(tmp_path):
    run = _fit("gddm_shapes.yaml", tmp_path)
    s = _scalars(run)
    for key in ("val/loss", "val/sparsity_domain_frac", "val/sparsity_image_frac",
                "val/diag_gen_curl_energy", "val/diag_gen_ls_residual"):
        assert key in s and math.isfinite(s[key]), key
    assert s["val/sparsity_domain_frac"] > s["val/sparsity_image_frac"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    process = ckpt["hyper_parameters"]["process"]
    assert process["class_path"] == "diffproc.processes.gradient.GradientDomainProcess"
    assert process["init_args"]["domain"] == "gradient"
    # the default image view: the UNet sees and predicts a C-channel image, the state is 2C field + C aux
    assert ckpt["state_dict"]["unet.conv_in.weight"].shape[1] == 3
    assert ckpt["state_dict"]["unet.conv_out.weight"].shape[0] == 3
    # the config's ModeEDM head with sigma_data_mode: spectrum_colour (issue 14): estimated at fit start into the
    # head's buffers, kept in the checkpoint
    assert ckpt["hyper_parameters"]["precond"]["init_args"]["sigma_data_mode"] == "spectrum_colour"
    assert process["init_args"]["noise_cap"] == 1.0  # docs/gddm.md §6
    sd = ckpt["state_dict"]["precond.spectrum"]
    assert sd.shape == (3, 16, 16) and float(ckpt["state_dict"]["precond.count"]) > 0
    assert float(sd[0, 0, 0]) > float(sd[0, 8, 8]) > 0
    q = ckpt["state_dict"]["precond.colour_basis"]
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=q.dtype), atol=1e-10)
    lit = _fit("gddm_literal_shapes.yaml", tmp_path / "literal")
    ckpt = torch.load(lit / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["unet.conv_in.weight"].shape[1] == 9  # seed-literal: the UNet sees the field


@pytest.mark.slow
@pytest.mark.parametrize("config", ["lddm_shapes.yaml", "gddm_hybrid_shapes.yaml"])
def test_cli_fit_other_domains(config, tmp_path):
    run = _fit(config, tmp_path)
    s = _scalars(run)
    assert "val/diag_gen_ls_residual" in s and math.isfinite(s["val/loss"])
    if config == "lddm_shapes.yaml":  # the config's noise scale √20/2 and noise_cap 1 (docs/gddm.md §6): on the fitted
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)  # spectrum the
        hp = ckpt["hyper_parameters"]["process"]["init_args"]  # lowest modes cross SNR 1 where image DDPM's do, not at t <= 3
        assert hp["laplacian_noise_scale"] == pytest.approx(math.sqrt(20) / 2, rel=1e-4) and hp["noise_cap"] == 1.0
        sd = ckpt["state_dict"]["precond.spectrum"][0]  # first colour component (luma-like)
        kw = dict(domain="laplacian", laplacian_noise_scale=hp["laplacian_noise_scale"])
        t_cfg = mode_snr_crossing(GradientDomainProcess(noise_cap=1.0, **kw), sd)
        t_ddpm = mode_snr_crossing(GradientDomainProcess(noise_kind="operator", **kw), sd)
        t_norm = mode_snr_crossing(GradientDomainProcess(domain="laplacian"), sd)
        assert int(t_norm[0, 1]) <= 3 and int(t_cfg[0, 1]) == int(t_ddpm[0, 1]) > 100, (int(t_norm[0, 1]), int(t_cfg[0, 1]))


@pytest.mark.slow
def test_cli_separate_poisson_stage_and_test(tmp_path):
    """Stage 1 trains the diffusion UNet; stage 2 (poisson_only + init_from) trains only the Poisson net;
    `cli.py test` logs the diagnostics."""
    s1 = _fit("gddm_shapes.yaml", tmp_path / "s1", ["--model.init_args.reconstruction", "poisson_net",
                                                      "--model.init_args.poisson_net", str(TINY)])
    ck1 = torch.load(s1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    s2 = _fit("gddm_shapes.yaml", tmp_path / "s2", ["--model.init_args.reconstruction", "poisson_net",
                                                      "--model.init_args.poisson_net", str(TINY),
                                                      "--model.init_args.poisson_net_stage", "poisson_only",
                                                      "--model.init_args.init_from", str(s1 / "checkpoints" / "last.ckpt")])
    ck2 = torch.load(s2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for k in ("unet.conv_in.weight", "ema_unet.conv_in.weight"):
        assert torch.equal(ck1[k], ck2[k]), k  # diffusion UNet and its EMA untouched
    assert not torch.equal(ck1["poisson_net.conv_out.weight"], ck2["poisson_net.conv_out.weight"])
    assert "val/poisson_loss" in _scalars(s2)
    _cli(["test", "--config", "configs/gddm_shapes.yaml", "--ckpt_path", str(s2 / "checkpoints" / "last.ckpt"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "t"), "--data.init_args.image_size", "16",
          "--data.init_args.num_test", "8", "--data.init_args.batch_size", "8",
          "--model.init_args.reconstruction", "poisson_net", "--model.init_args.poisson_net", str(TINY),
          "--gddm_diagnostics.sampling.num_steps", "2", "--gddm_diagnostics.num", "2",
          "--metrics.num_samples", "0", "--trainer.enable_progress_bar", "false"], tmp_path)
    runs = glob.glob(str(tmp_path / "t" / "*" / "version_*"))
    s = _scalars(Path(runs[0]))
    assert "test/diag_real_net_rms" in s and "test/diag_poisson_net_seconds" in s


@pytest.mark.slow
@pytest.mark.parametrize("config", ["gddm_celeba.yaml", "lddm_celeba.yaml", "gddm_cifar10.yaml",
                                    "gddm_shapes.yaml", "lddm_shapes.yaml", "gddm_hybrid_shapes.yaml",
                                    "gddm_literal_shapes.yaml", "lddm_literal_shapes.yaml"])
def test_configs_parse(config, tmp_path):
    r = _cli(["fit", "--config", f"configs/{config}", "--print_config"], tmp_path)
    assert "diffproc.methods.gddm.GDDM" in r.stdout


# --- the image-weighted loss and the image clip (docs/gddm.md "Why the seed-literal setting fails") -------
@pytest.mark.parametrize("domain", ["gradient", "laplacian", "hybrid"])
def test_image_loss_is_ddpm_image_mse(domain):
    """objective='image' = (α/σ)² · image MSE of x̂0 (DDPM's L_simple in image units) + the uniform
    ε-MSE on the part of the domain that never reaches the image, for an arbitrary (linear) error model."""
    p = GradientDomainProcess(domain=domain, objective="image")
    x0 = rand_images(4, 3, 16, 16, seed=1)
    z0 = p.to_domain(x0)
    t = torch.tensor([1, 200, 500, 999])
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(z0.shape, dtype=torch.float64, generator=g)
    err = torch.randn(z0.shape, dtype=torch.float64, generator=g) * 0.3
    loss = p.loss(denoiser_for(p, lambda z, tt: noise + err), z0, t, noise)
    a, s = p.coefficients(t, z0)
    x0_hat = p.from_domain((p.forward(z0, t, noise) - s * (noise + err)) / a)
    image_mse = ((a / s) ** 2 * (x0_hat - x0) ** 2).mean()
    proj = p.to_domain(p.image_part(err))
    assert float((proj * (err - proj)).sum()).__abs__() < 1e-9  # Π is an orthogonal projection
    assert torch.allclose(loss, image_mse + ((err - proj) ** 2).mean(), rtol=1e-10, atol=0)
    # the seed-literal weighting is the plain ε-MSE
    q = GradientDomainProcess(domain=domain, objective="head")
    assert torch.allclose(q.loss(denoiser_for(q, lambda z, tt: noise + err), z0, t, noise), (err**2).mean(), rtol=1e-12)


def test_image_loss_weights_per_dct_mode():
    """A field error along image DCT mode k costs s²/λ_k (gradient) or s²/λ_k² (Laplacian) times its
    uniform ε-MSE — the weights docs/gddm.md tabulates; the uniform loss gives every mode weight 1."""
    from diffproc.ops import idct2
    from diffproc.ops.finite_diff import neumann_eigenvalues

    n = 16
    lam = neumann_eigenvalues(n, n, torch.float64)
    for domain, power in (("gradient", 1), ("laplacian", 2)):
        p = GradientDomainProcess(domain=domain, objective="image")
        s = p.s_g if domain == "gradient" else p.s_l
        for k, l in ((0, 1), (1, 1), (4, 4), (8, 8), (15, 15)):
            coef = torch.zeros(1, 1, n, n, dtype=torch.float64)
            coef[..., k, l] = 1.0
            e = p.to_domain(idct2(coef))  # the field of image mode k (aux = 0: zero mean)
            e = e / e.norm() * math.sqrt(e.numel())  # unit uniform ε-MSE
            weight = float(p.image_loss(e, torch.zeros_like(e))) / float((e**2).mean())
            expect = s**2 / float(lam[k, l]) ** power * (p.domain_channels(1) / 1)  # per-pixel vs per-entry mean
            assert weight == pytest.approx(expect, rel=1e-9), (domain, k, l)


@pytest.mark.parametrize("domain", ["gradient", "laplacian", "hybrid"])
def test_clip_image(domain):
    """clip_image: the decoded x̂0 lies in [−1, 1] and is integrable; ε̂ stays consistent with z_t; a clean
    state inside the box is left unchanged."""
    p = GradientDomainProcess(domain=domain, clip_image=True)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500, 20])
    z = torch.randn(2, p.domain_channels(3), 16, 16, dtype=torch.float64, generator=g)
    out = torch.randn(z.shape, dtype=torch.float64, generator=g) * 5
    u0, eps = p.predict(denoiser_for(p, lambda zz, tt: out), z, t)
    x = p.from_domain(u0)
    assert x.abs().max() <= 1 + 1e-12 and (p.to_domain(x) - u0).abs().max() < 1e-10
    assert (p.from_domain(denoiser_for(p, lambda zz, tt: out)(z, t)[0]).abs() > 1).any()  # something was clipped
    a, s = p.coefficients(t, z)
    assert (a * u0 + s * eps - z).abs().max() < 1e-10
    z0 = p.to_domain(rand_images(2, 3, 16, 16, seed=3) * 0.9)
    eps0 = torch.randn(z0.shape, dtype=torch.float64, generator=g)
    u0, _ = p.predict(denoiser_for(p, lambda zz, tt: eps0), p.forward(z0, t, eps0), t)
    assert (u0 - z0).abs().max() < 1e-9
    with pytest.raises(ValueError, match="dc_mode='aux'"):
        GradientDomainProcess(domain="gradient", dc_mode="dataset_mean", clip_image=True)


def test_gddm_defaults_and_seed_literal_option():
    """The process's and the module's defaults are the seed-literal setting (eps head on the domain, the head's own
    uniform loss, no image clip); the measured fix (the ModeEDM head with x0 and EDM weighting, image clip) is two
    options away (configs/gddm_shapes.yaml), and non-aux DC modes run without the image clip."""
    m = gddm(image_size=8, channels=3, unet=TINY, ema_decay=0)
    assert isinstance(m.precond, ModeEDM) and (m.precond.parameterisation, m.precond.weighting) == ("x0", "edm")
    assert m.process.clip_image and m.process.objective == "head"
    assert m.unet.config.in_channels == 3 and m.unet.config.out_channels == 3
    lit = build(GradientDomainProcess, image_size=8, channels=3, unet=TINY, ema_decay=0)
    assert isinstance(lit.precond, EpsHead) and lit.process.objective == "head" and not lit.process.clip_image
    assert lit.unet.config.in_channels == 9 and lit.hparams.precond["class_path"].endswith(".EpsHead")
    with pytest.raises(ValueError, match="hybrid"):
        gddm(domain="hybrid", image_size=8, channels=3, unet=TINY)
    with pytest.raises(ValueError, match="parameterisation"):
        gddm(parameterisation="v", image_size=8, channels=3, unet=TINY)
    assert not gddm(image_size=8, channels=3, unet=TINY, ema_decay=0, dc_mode="dataset_mean").process.clip_image
    with pytest.raises(ValueError, match="weighting"):
        gddm(image_size=8, channels=3, unet=TINY, weighting="min_snr")
    with pytest.raises(ValueError, match="objective"):
        GradientDomainProcess(objective="edm")


@pytest.mark.parametrize("domain,parameterisation,spectrum", [("gradient", "x0", False), ("laplacian", "x0", False),
                                                               ("gradient", "eps", False), ("gradient", "x0", True),
                                                               ("laplacian", "eps", True)])
def test_image_view_noise_scale_and_exact_denoiser(domain, parameterisation, spectrum):
    """The image view (ModeEDM; x0 or eps parameterisation, scalar or per-mode σ_data): (1) the per-mode noise of
    image_part(ε) has std c_k (Monte Carlo, ±5%); (2) the exact F* = (x* − c_skip x̃)/c_out (delta data)
    gives loss 0 and DDIM / ancestral sampling that returns x* to 1e-10; (3) the EDM weighting is 1/c_out²
    per image DCT mode."""
    from diffproc.ops import dct2, idct2

    g = torch.Generator().manual_seed(0)
    for noise in ("iid", "operator"):  # operator noise is image DDPM seen through T: c_k = 1 for every mode
        q = GradientDomainProcess(domain=domain, noise_kind=noise)
        eps = q.noise_like(torch.zeros(4000, q.domain_channels(1), 8, 8, dtype=torch.float64), g)
        ratio = dct2(q.image_part(eps)).std(0)[0] / q.mode_noise_scale(8, 8)
        assert 0.95 < float(ratio.min()) and float(ratio.max()) < 1.05, noise
    assert bool((q.mode_noise_scale(8, 8) == 1).all())
    p = GradientDomainProcess(domain=domain)
    sd = 0.1 + torch.rand(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if spectrum else None
    h = image_view(p, parameterisation, sd)
    x_star = rand_images(2, 3, 16, 16, seed=4) * 0.9

    def exact(inp, t):  # the backbone's view is c_in ⊙ x̃ (DCT basis); undo it, then EDM's ideal F
        c_in, c_skip, c_out, _ = h.coefficients(p, t, inp)
        return idct2((dct2(x_star) - c_skip * dct2(inp) / c_in) / c_out)

    z0 = p.to_domain(x_star)
    assert float(p.loss(h.bind(p, exact), z0, torch.tensor([1, 700]))) < 1e-20
    for solver in ("ddim", "ancestral"):
        res = sample_loop(p, h.bind(p, exact), (2, p.domain_channels(3), 16, 16), 10, solver,
                          torch.Generator().manual_seed(1), "cpu", torch.float64)
        assert float((p.from_domain(res.sample) - x_star).abs().max()) < 1e-10, solver
    # EDM weighting: an x̂0 error along one image DCT mode k costs 1/c_out,k² per unit squared error
    t = torch.tensor([300])
    _, _, c_out, _ = h.coefficients(p, t, z0)
    for k, l in ((0, 0), (0, 1), (5, 3)):
        coef = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
        coef[:, :, k, l] = 1.0
        z0_hat = p.to_domain(x_star[:1] + idct2(coef))
        got = float(p.reduce(h.mode_error(p, z0_hat, z0[:1], t) ** 2)) * 3 * 16 * 16 / 3
        assert got == pytest.approx(float(c_out[0, 0, k, l]) ** -2, rel=1e-9)


def test_image_view_per_mode_weights_closed_form():
    """The image view's per-mode coefficients and loss weights are what docs/gddm.md says: x0 parameterisation
    (EDM) ``1/c_out² = α²/σ_k² + 1/σ_d,k²`` with σ_d,k the spectrum when set (else the scalar); eps
    ``c_skip = 1/α``, ``c_out = −σ_k/α``, so 1/c_out² = α²/σ_k² and the ``edm`` loss is the ε-MSE of the image noise
    per mode, ``mean_k ((ε̂_k − ε_k)/c_k)²`` over the image DCT modes."""
    from diffproc.ops import dct2

    t = torch.tensor([50, 400, 900])
    sd = 0.1 + torch.rand(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for domain in ("gradient", "laplacian"):
        p = GradientDomainProcess(domain=domain)
        for parameterisation in ("x0", "eps"):
            ref = torch.zeros(3, 1, 16, 16, dtype=torch.float64)
            a, sig = (v.double().view(-1, 1, 1, 1) for v in p.alpha_sigma(t))
            sk = sig * p.mode_noise_scale(16, 16)
            for modes in (None, sd):
                h = image_view(p, parameterisation, modes)
                s_d = 0.5 if modes is None else modes
                c_in, c_skip, c_out, _ = h.coefficients(p, t, ref)
                assert torch.allclose(c_in, (a * a * s_d**2 + sk * sk).rsqrt(), rtol=1e-12)
                if parameterisation == "x0":
                    assert torch.allclose(c_out ** -2, a * a / sk**2 + 1 / s_d**2, rtol=1e-10)
                else:
                    assert torch.allclose(c_skip, (1 / a).expand_as(sk)) and torch.allclose(c_out, -sk / a)
                    assert torch.allclose(c_out ** -2, a * a / sk**2, rtol=1e-10)
            if parameterisation == "eps":  # edm loss == per-mode ε-MSE of the image noise
                g = torch.Generator().manual_seed(1)
                x0 = rand_images(3, 3, 16, 16, seed=1)
                z0 = p.to_domain(x0)
                eps_hat = torch.randn(z0.shape, dtype=torch.float64, generator=g)
                eps = torch.randn(z0.shape, dtype=torch.float64, generator=g)
                a4, s4 = p.coefficients(t, z0)
                z_t = a4 * z0 + s4 * eps
                z0_hat = (z_t - s4 * eps_hat) / a4
                c = p.mode_noise_scale(16, 16)
                want = ((dct2(p.image_part(eps_hat)) - dct2(p.image_part(eps))) / c).pow(2).mean()
                got = p.reduce(h.mode_error(p, z0_hat, z0, t) ** 2)
                assert float(got) == pytest.approx(float(want), rel=1e-9)
    with pytest.raises(ValueError, match="parameterisation"):
        ModeEDM(parameterisation="v")


def test_sigma_data_spectrum_estimate_checkpoint_and_fit(tmp_path):
    """sigma_data_mode='spectrum': σ_data per mode = RMS of the training images' orthonormal DCT coefficients
    (over images and channels), estimated at fit start from the first ``sigma_data_images`` training images into
    the head's own buffers, saved in the checkpoint, never written into the process; sampling before any estimate
    raises."""
    from diffproc.ops import dct2

    m = gddm(image_size=8, channels=3, unet=TINY, ema_decay=0, sigma_data_mode="spectrum", sigma_data_images=64)
    with pytest.raises(ConfigError, match="no spectrum yet"):
        m.sample(2, SamplingSpec(num_steps=2), progress=False)
    dm = ShapesDataModule(image_size=8, batch_size=16, num_train=128, num_val=16, num_test=16)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(m, dm)
    x = torch.stack([dm.train_dataloader().dataset[i][0] for i in range(64)]).double()
    want = dct2(x).pow(2).mean(dim=(0, 1)).sqrt()
    assert torch.allclose(m.precond.spectrum, want, rtol=1e-6)
    assert float(m.precond.spectrum[0, 0]) > 5 * float(m.precond.spectrum[4, 4])  # DC ≫ high modes
    assert not any("sigma" in k for k in vars(m.process))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    m2 = GDDM.load_from_checkpoint(path)
    assert torch.equal(m2.precond.spectrum, m.precond.spectrum) and float(m2.precond.count) == 64
    assert m2.sample(2, SamplingSpec(num_steps=2), progress=False).images.shape == (2, 3, 8, 8)
    assert not any(k.startswith("precond.") for k in gddm(image_size=8, channels=3, unet=TINY, ema_decay=0).state_dict())


def test_time_sampling_quad_distribution():
    """time_sampling='quad': t = ceil(T u²) on {1..T}, so P(t <= s) = sqrt(s/T) (0.316 at T/10 vs 0.1 for
    DDPM's uniform), and 'uniform' is DDPM's U{1..T}; GDDM passes the option through."""
    p = GradientDomainProcess(time_sampling="quad")
    t = p.sample_time(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 1 and int(t.max()) <= 1000
    for s in (10, 100, 500):
        assert float((t <= s).double().mean()) == pytest.approx(math.sqrt(s / 1000), abs=4e-3)
    u = GradientDomainProcess().sample_time(200_000, torch.Generator().manual_seed(0))
    assert float((u <= 100).double().mean()) == pytest.approx(0.1, abs=4e-3)
    assert gddm(image_size=8, channels=3, unet=TINY, ema_decay=0, time_sampling="quad").process.time_sampling == "quad"
    with pytest.raises(ValueError, match="time_sampling"):
        gddm(image_size=8, channels=3, unet=TINY, ema_decay=0, time_sampling="cubic")


def test_spectrum_colour_basis_exact_denoiser_and_estimate():
    """sigma_data_mode='spectrum_colour': the image view preconditions in an orthogonal colour basis Q with σ_data
    per (component, mode). (1) estimate: Q = eigenvectors of the channel second moments of the DCT coefficients
    (orthogonal, largest first) and σ_d[c, k] = RMS of (Q DCT(x))[c, k]; (2) the exact F* (delta data) in that
    basis gives loss 0 and DDIM returns x* to 1e-10; (3) the loss is invariant to Q for the same x̂0 error
    when σ_d is constant (Q orthogonal)."""
    from diffproc.ops import dct2, idct2

    x, _ = generate_shapes(256, 8, seed=0)
    x = x.double() / 127.5 - 1
    m = gddm(image_size=8, channels=3, unet=TINY, ema_decay=0, sigma_data_mode="spectrum_colour")
    sd = m.precond.estimate(x)
    q = m.precond.colour_basis
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    want = torch.einsum("dc,bchw->bdhw", q, dct2(x)).pow(2).mean(0).sqrt()
    assert torch.allclose(sd, want) and sd.shape == (3, 8, 8)
    assert float(sd[0, 0, 0]) > float(sd[1, 0, 0]) > float(sd[2, 0, 0])  # luma-like component first
    assert torch.equal(sigma_data_spectrum(x, True)[1], q)  # the one pure function behind the estimate

    p = GradientDomainProcess(domain="gradient")
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=g))[0]
    h = image_view(p, "x0", 0.1 + torch.rand(3, 16, 16, dtype=torch.float64, generator=g), basis)
    x_star = rand_images(2, 3, 16, 16, seed=4) * 0.9

    def exact(inp, t):
        c_in, c_skip, c_out, _ = h.coefficients(p, t, inp)
        return idct2((dct2(h._rotate(x_star)) - c_skip * dct2(inp) / c_in) / c_out)

    z0 = p.to_domain(x_star)
    assert float(p.loss(h.bind(p, exact), z0, torch.tensor([1, 700]))) < 1e-20
    res = sample_loop(p, h.bind(p, exact), (2, p.domain_channels(3), 16, 16), 10, "ddim",
                      torch.Generator().manual_seed(1), "cpu", torch.float64)
    assert float((p.from_domain(res.sample) - x_star).abs().max()) < 1e-10
    z0_hat = p.to_domain(x_star + 0.1 * torch.randn(x_star.shape, dtype=torch.float64, generator=g))
    t = torch.tensor([100, 600])
    with_q = float(p.reduce(image_view(p, "x0", torch.full((3, 16, 16), 0.5, dtype=torch.float64), basis)
                            .mode_error(p, z0_hat, z0, t) ** 2))
    assert with_q == pytest.approx(float(p.reduce(image_view(p, "x0").mode_error(p, z0_hat, z0, t) ** 2)), rel=1e-10)


def test_snr_weighting_equals_eps_edm_loss():
    """weighting='snr' (x0 parameterisation) weights image DCT mode k by α²/σ_k²: the same loss, for the same x̂0,
    as parameterisation='eps' with the edm weighting (DDPM's ε-MSE of the per-mode image noise)."""
    t = torch.tensor([30, 300, 900])
    x0 = rand_images(3, 3, 16, 16, seed=2)
    g = torch.Generator().manual_seed(3)
    for domain in ("gradient", "laplacian"):
        p = GradientDomainProcess(domain=domain)
        a, b = image_view(p, "x0", weighting="snr"), image_view(p, "eps")
        z0 = p.to_domain(x0)
        z0_hat = p.to_domain(x0 + 0.1 * torch.randn(x0.shape, dtype=torch.float64, generator=g))
        la = float(p.reduce(a.mode_error(p, z0_hat, z0, t) ** 2))
        assert la == pytest.approx(float(p.reduce(b.mode_error(p, z0_hat, z0, t) ** 2)), rel=1e-10)


@pytest.mark.parametrize("domain", ["gradient", "laplacian"])
def test_noise_cap(domain):
    """``noise_cap``: (1) the image noise per DCT mode has std ``min(c_k, cap)`` (Monte Carlo, ±5%), the DC 1;
    (2) exactly, the part of the noise that never reaches the image and the modes under the cap are the
    i.i.d. noise's own; the prior is the same law; (3) the exact denoiser still samples x* with DDIM and
    ancestral steps (which draw capped noise); (4) the capped modes cross SNR 1 where image DDPM's do, the
    others where the uncapped process's do; (5) a cap with operator noise or the hybrid domain is refused."""
    from diffproc.ops import dct2, idct2

    cap = 1.0
    kw = dict(laplacian_noise_scale=math.sqrt(20) / 2) if domain == "laplacian" else {}  # configs/lddm_shapes.yaml
    p = GradientDomainProcess(domain=domain, noise_cap=cap, **kw)
    h = image_view(p, "x0")
    ref = GradientDomainProcess(domain=domain, **kw)
    c_iid = ref.mode_noise_scale(8, 8)
    capped = c_iid > cap
    capped[0, 0] = False
    assert 3 <= int(capped.sum()) < 63 and not capped[-1].any()  # a lower set: only the lowest modes
    low = capped.clone()
    low[0, 0] = True  # (the DC is never capped)
    assert bool((low[1:] <= low[:-1]).all() and (low[:, 1:] <= low[:, :-1]).all())
    c = p.mode_noise_scale(8, 8)
    assert torch.equal(c[~capped], c_iid[~capped]) and bool((c[capped] == cap).all())
    g = torch.Generator().manual_seed(0)
    eps = p.noise_like(torch.zeros(4000, p.domain_channels(1), 8, 8, dtype=torch.float64), g)
    ratio = dct2(p.image_part(eps)).std(0)[0] / c
    assert 0.95 < float(ratio.min()) and float(ratio.max()) < 1.05
    e0 = torch.randn(6, p.domain_channels(2), 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e1 = p.cap_noise(e0)
    rest = lambda e: e - p.to_domain(p.image_part(e))  # noqa: E731
    assert float((rest(e1) - rest(e0)).abs().max()) < 1e-12
    u0, u1 = dct2(p.image_part(e0)), dct2(p.image_part(e1))
    assert float((u1 - u0)[..., ~capped].abs().max()) < 1e-12
    assert torch.allclose(u1[..., capped], u0[..., capped] * (cap / c_iid[capped]), atol=1e-12)
    prior = p.prior((6, p.domain_channels(2), 8, 8), torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(prior, e1, atol=1e-12)

    x_star = rand_images(2, 3, 16, 16, seed=4) * 0.9

    def exact(inp, t):
        c_in, c_skip, c_out, _ = h.coefficients(p, t, inp)
        return idct2((dct2(x_star) - c_skip * dct2(inp) / c_in) / c_out)

    assert float(p.loss(h.bind(p, exact), p.to_domain(x_star), torch.tensor([1, 700]))) < 1e-20
    for solver in ("ddim", "ancestral"):
        res = sample_loop(p, h.bind(p, exact), (2, p.domain_channels(3), 16, 16), 10, solver,
                          torch.Generator().manual_seed(1), "cpu", torch.float64)
        assert float((p.from_domain(res.sample) - x_star).abs().max()) < 1e-10, solver

    sd = 0.05 + torch.rand(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t_cap, t_iid = mode_snr_crossing(p, sd), mode_snr_crossing(ref, sd)
    t_ddpm = mode_snr_crossing(GradientDomainProcess(domain=domain, noise_kind="operator", **kw), sd)
    assert torch.equal(t_cap[:, capped], t_ddpm[:, capped]) and torch.equal(t_cap[:, ~capped], t_iid[:, ~capped])
    assert bool((t_cap[:, capped] >= t_iid[:, capped]).all())  # less noise on the lowest modes: decided earlier
    assert float((t_cap[:, capped] > t_iid[:, capped]).double().mean()) > 0.8
    for bad in (dict(noise_kind="operator"), dict(domain="hybrid"), dict(noise_cap=0.0)):
        with pytest.raises(ValueError, match="noise_cap"):
            GradientDomainProcess(**{"domain": domain, "noise_cap": cap, **bad})
