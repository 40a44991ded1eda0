"""The preconditioning layer (diffproc/nets/precond.py): every head turns its own training target back into the exact
(x̂0, ε̂) on any basis; its objective is zero exactly there; heads rebuild from their config; the processes refuse the
heads they cannot use; ModeEDM's σ_data spectrum is the head's own state (one pure function, in the state dict,
restored from a checkpoint, never written into the process)."""

from __future__ import annotations

import pytest
import torch

from diffproc.methods.base import DiffusionModule
from diffproc.nets.precond import (HEADS, DualHead, EpsHead, ModeEDM, SigmaEpsHead, VHead, X0Head, denoiser_for,
                                   make_head, sigma_data_spectrum)
from diffproc.ops import dct2
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.edge import EdgePreservingProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.interpolation import InterpolationProcess

F64 = torch.float64
UNET = {"block_out_channels": [8, 16], "layers_per_block": 1}


def _data(shape=(3, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=F64) * 1.8 - 0.9), torch.randn(shape, generator=g, dtype=F64)


PROCESSES = {"ddpm": lambda: DDPMProcess(num_timesteps=100, clip_x0=False),
             "blur-dct": lambda: BlurProcess(num_timesteps=100, clip_x0=False).set_geometry(8, 3),
             "sie": lambda: InterpolationProcess(gamma=0.0)}
CASES = [(p, h) for p in ("ddpm", "blur-dct") for h in ("eps", "x0", "v", "sigma_eps")] + [
    ("sie", h) for h in ("dual", "eps", "x0", "v")]


@pytest.mark.parametrize("name,head", CASES)
def test_every_head_inverts_its_target_and_its_objective_vanishes_there(name, head):
    """Fed its own training target, a head returns the true (x0, ε) in the process basis to rounding (blur: per-DCT-mode
    α, σ), and its training error is exactly 0 there and (o − target)² elsewhere."""
    process = PROCESSES[name]()
    h = make_head(head, process).setup(process, 8, 3)
    x0, eps = _data()
    t = (torch.tensor([0.2, 0.5, 0.9], dtype=F64) if isinstance(process, InterpolationProcess)
         else torch.tensor([3, 40, 97]))
    z_t = process.forward(x0, t, eps)
    target = h.target(process, x0, eps, t)
    d = denoiser_for(process, lambda z, tt: target, h)
    u0, e = d(z_t, t)
    torch.testing.assert_close(u0, process.to_basis(x0), rtol=0, atol=1e-9)
    torch.testing.assert_close(e, process.to_basis(eps), rtol=0, atol=1e-9)
    assert float(d.error(z_t, t, x0, eps).abs().max()) == 0.0
    off = denoiser_for(process, lambda z, tt: target + 0.25, h)
    torch.testing.assert_close(off.error(z_t, t, x0, eps), torch.full_like(target, 0.0625))


def test_heads_rebuild_from_their_config_and_processes_refuse_the_wrong_ones():
    p = DDPMProcess()
    for h in (EpsHead(min_alpha=1e-3), X0Head(), VHead(), SigmaEpsHead()):
        again = make_head(h.config, p)
        assert type(again) is type(h) and again.config == h.config
    assert set(HEADS) == {"eps", "x0", "v", "sigma_eps", "dual", "mode_edm"}
    assert isinstance(make_head(None, p), EpsHead) and isinstance(make_head(None, InterpolationProcess()), DualHead)
    assert isinstance(make_head(None, EdgePreservingProcess()), SigmaEpsHead)
    with pytest.raises(ValueError, match="sigma_eps"):
        EpsHead().setup(EdgePreservingProcess(), 8, 3)  # σ_t depends on x0: only the σε head
    with pytest.raises(ValueError, match="dual"):
        DualHead().setup(p, 8, 3)
    with pytest.raises(ValueError, match="gamma"):
        X0Head().setup(InterpolationProcess(gamma=1.0), 8, 3)  # Eq. 12's derivative term needs two heads
    with pytest.raises(ValueError, match="hybrid"):
        ModeEDM().setup(GradientDomainProcess(domain="hybrid"), 8, 3)
    with pytest.raises(ValueError, match="not a head"):
        make_head({"class_path": "diffproc.processes.ddpm.DDPMProcess"}, p)


def test_module_takes_the_head_by_class_path_and_restores_it(tmp_path):
    """``DiffusionModule(precond=...)``: the head decides the UNet's channels and is saved as its own config; a
    checkpoint rebuilds it (a v-prediction DDPM is one option, no process parameter)."""
    m = DiffusionModule(process=DDPMProcess(num_timesteps=50), precond=VHead(), image_size=8, channels=3, unet=UNET,
                        ema_decay=0)
    assert m.hparams.precond == {"class_path": "diffproc.nets.precond.VHead", "init_args": {}}
    assert "prediction" not in m.hparams.process["init_args"]
    sie = DiffusionModule(process=InterpolationProcess(), image_size=8, channels=3, unet=UNET, ema_decay=0)
    assert isinstance(sie.precond, DualHead) and sie.unet.config.out_channels == 6
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "pytorch-lightning_version": "2.5.0"}, path)
    again = DiffusionModule.load_from_checkpoint(path)
    assert isinstance(again.precond, VHead)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        a = m.compute_loss(x, m.unet, torch.Generator().manual_seed(0))
        b = again.compute_loss(x, again.unet, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_mode_edm_statistics_are_the_heads_own_state():
    """The σ_data spectrum and colour basis: one pure function (``sigma_data_spectrum``), the head's buffers (in its
    state dict, loadable into a fresh head), needed before use, and nothing of it on the process."""
    p = GradientDomainProcess(domain="gradient")
    h = ModeEDM(sigma_data_mode="spectrum_colour").setup(p, 8, 3)
    assert h.needs_statistics and h.statistics_images == 2048
    with pytest.raises(ValueError, match="no spectrum yet"):
        h.coefficients(p, torch.tensor([10]), torch.zeros(1, 3, 8, 8))
    x, _ = _data((16, 3, 8, 8), seed=3)
    rms, q = sigma_data_spectrum(x, colour=True)
    assert torch.equal(h.estimate(x), rms) and torch.equal(h.colour_basis, q) and not h.needs_statistics
    assert torch.allclose(rms, torch.einsum("dc,bchw->bdhw", q, dct2(x)).pow(2).mean(0).sqrt().clamp_min(1e-3))
    fresh = ModeEDM(sigma_data_mode="spectrum_colour").setup(p, 8, 3)
    fresh.load_state_dict(h.state_dict())
    assert not fresh.needs_statistics and torch.equal(fresh.spectrum, rms)
    assert set(h.state_dict()) == {"spectrum", "count", "colour_basis"}
    assert not ModeEDM().setup(p, 8, 3).state_dict()  # the scalar σ_data mode keeps no state
    assert not any("sigma" in k or "colour" in k for k in vars(p))
