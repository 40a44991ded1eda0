"""Room ``samplers.py``: the sampling spec (:class:`SamplingSpec`: one default on the module, overrides that inherit
it, resolved and checked against a process on every surface), the time grids, NFE counting and the loops over a
process, here DPM-Solver++(2M), its SDE variant and 3M (``dpmpp_step``, the Gaussian core's step that ``sample_loop``
drives), run with the exact denoiser of Gaussian data N(0, diag λ) (benchmarks/gaussian_w2.py): first-order step =
DDIM, the final step to σ = 0, convergence orders, exact NFE, per-sample noise, exact W2 against DDIM, EPDM's refusal.
The ODE solvers are tested with SIE (test_sie.py), SDEdit's loop with EPDM (test_epdm.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.gaussian_w2 import (EIGENVALUES, deterministic_gain, exact_denoiser, load_eigenvalues,
                                    multistep_sde_variance, paper_process, solver_processes, solver_w2,
                                    start_variance)
from diffproc.methods.base import DiffusionModule
from diffproc.processes.base import MULTISTEP_SOLVERS
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.edge import EdgePreservingProcess
from diffproc.processes.gaussian import MultistepState, dpmpp_step
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.interpolation import InterpolationProcess
from diffproc.processes.rng import PerSampleGenerator, randn
from diffproc.processes.vp_sde import VPSDEProcess
from diffproc.nets.precond import denoiser_for
from diffproc.samplers import (DEFAULT_STRENGTH, NFE_PER_STEP, SamplingSpec, _median_log_snr, sample_loop,
                               time_grid)
from modules import PerModeVP

F64 = torch.float64


def _blur() -> BlurProcess:
    return BlurProcess(clip_x0=False, data_range="minus_one_one").set_geometry(8, 1)


def _lam(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(shape, generator=g, dtype=F64) * 2.0 - 2.0)


@pytest.mark.parametrize("make", [lambda: DDPMProcess(clip_x0=False), _blur], ids=["ddpm", "blur"])
def test_first_order_step_is_ddim(make):
    """The first (first-order) DPM-Solver++ step equals the DDIM η = 0 step, coordinate by coordinate (blur:
    per-DCT-mode α, σ), on any sub-grid; the final step to t = 0 equals DDIM's last step (α' û0 = û0)."""
    p = make()
    shape = (3, 1, 8, 8)
    lam = _lam(shape[1:])
    denoiser = exact_denoiser(p, lam)
    z = randn(shape, torch.Generator().manual_seed(1), dtype=F64)
    for t, s in ((900, 700), (400, 399), (50, 1), (20, 0)):
        ref = p.reverse_step(denoiser, z, t, s, solver="ddim")
        for solver in ("dpmpp_2m", "dpmpp_3m"):
            got = dpmpp_step(p, denoiser, z, t, s, solver, MultistepState())
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        one = sample_loop(p, denoiser, shape, solver="dpmpp_2m", dtype=F64, z_init=z, timesteps=[t, s])
        torch.testing.assert_close(one.sample, ref, rtol=1e-10, atol=1e-12)
    # final step returns û0 even after a second-order history (a grid long enough that the run over grid[:-1]
    # keeps its second-order last step: shorter grids lower the order of their last steps, lower_order_final)
    grid = p.timesteps(20)
    assert grid[-1] == 0
    res = sample_loop(p, denoiser, shape, solver="dpmpp_2m", dtype=F64, z_init=z, timesteps=grid[:-1])
    u0, _ = p.predict(denoiser, res.sample, torch.full((3,), grid[-2]))
    full = sample_loop(p, denoiser, shape, solver="dpmpp_2m", dtype=F64, z_init=z, timesteps=grid)
    torch.testing.assert_close(full.sample, p.from_basis(u0), rtol=1e-12, atol=1e-12)
    for solver in MULTISTEP_SOLVERS:  # and no noise is added on the last step of the SDE variant
        a = sample_loop(p, denoiser, shape, solver=solver, dtype=F64, z_init=res.sample,
                        timesteps=[grid[-2], 0], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a.sample, p.from_basis(u0), rtol=1e-12, atol=1e-12)


def _exact_gain(process, lam, grid, t):
    """The exact probability-flow map from ``grid[0]`` to ``t`` of a Gaussian law: ``√(var(t)/var(t_0))`` per
    coordinate."""
    return (start_variance(process, lam, t) / start_variance(process, lam, grid[0])).sqrt()


def _order(process, lam, solver, ns=(100, 200, 400, 800), exact_start: int = 0, grid_kind: str = "process") -> float:
    """Order = −slope of log max|a(N) − a_exact| against log N: the deterministic gain against the exact flow map of
    the probability-flow ODE, ``√(var(t_end)/var(t_start))`` per coordinate. ``exact_start = k``: the multistep
    history of the first ``k`` grid points is taken on the exact flow (the order of the multistep update itself,
    without the lower-order warm-up steps, whose O(h²) local error caps any end-to-end order at 2)."""
    shape = tuple(lam.shape)
    denoiser = exact_denoiser(process, lam)
    errs = []
    for n in ns:
        grid = time_grid(process, n, grid_kind)
        exact = _exact_gain(process, lam, grid, grid[-1])
        if not exact_start:
            a, nfe = deterministic_gain(process, denoiser, n, solver, shape, timesteps=grid)
            assert nfe == n
        else:
            state = MultistepState()
            for t in grid[:exact_start]:  # fill the history with predictions made on the exact flow
                z = process.from_basis(_exact_gain(process, lam, grid, t)[None])
                state.u0_2, state.h_2 = state.u0, state.h
                state.u0, _ = process.predict(denoiser, z, torch.full((1,), t, dtype=F64))
                state.steps += 1
                state.h = None
            if exact_start >= 2:
                state.h_2 = _log_snr_step(process, grid[exact_start - 2], grid[exact_start - 1])
            state.h = _log_snr_step(process, grid[exact_start - 1], grid[exact_start])
            z = process.from_basis(_exact_gain(process, lam, grid, grid[exact_start])[None])
            for t, t_next in zip(grid[exact_start:-1], grid[exact_start + 1:]):
                z = dpmpp_step(process, denoiser, z, t, t_next, solver, state)
            a = process.to_basis(z)[0]
        errs.append(float((a - exact).abs().max()))
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def _log_snr_step(process, t, s) -> torch.Tensor:
    a_t, s_t = process.alpha_sigma(torch.tensor([t], dtype=F64))
    a_s, s_s = process.alpha_sigma(torch.tensor([s], dtype=F64))
    return (torch.log(a_s) - torch.log(s_s)) - (torch.log(a_t) - torch.log(s_t))


@pytest.mark.parametrize("make,shape", [(lambda: VPSDEProcess(clip_x0=False), (1, 4)), (PerModeVP, (1, 2, 2))],
                         ids=["vp_sde", "per_mode"])
def test_convergence_order(make, shape):
    """On a smooth problem (the exact denoiser of a Gaussian law, N = 100..800 steps uniform in log-SNR) the measured
    order is ≈ 1 for DDIM, ≈ 2 for DPM-Solver++(2M) and ≥ 3 for DPM-Solver++(3M) once its history lies on the exact
    flow (error of the deterministic gain against the exact ODE flow). End to end, 3M's lower-order warm-up steps
    cost some of that, but it stays clearly above 2M. (On the processes' own uniform-t grids the last steps are
    long in log-SNR and no solver is in its asymptotic regime at these N.)"""
    p = make()
    lam = torch.tensor([1e-3, 0.1, 1.0, 5.0], dtype=F64).reshape(shape)
    o1 = _order(p, lam, "ddim", grid_kind="logsnr")
    o2 = _order(p, lam, "dpmpp_2m", grid_kind="logsnr")
    o3x = _order(p, lam, "dpmpp_3m", exact_start=2, grid_kind="logsnr")
    o3 = _order(p, lam, "dpmpp_3m", grid_kind="logsnr")
    assert 0.9 < o1 < 1.1, o1
    assert 1.8 < o2 < 2.2, o2
    assert o3x > 2.8, o3x
    assert o3 > o2 + 0.3, (o3, o2)


def _processes_small():
    c = 1
    gddm = GradientDomainProcess(clip_x0=False)
    return {
        "ddpm": (DDPMProcess(clip_x0=False), (c, 8, 8)),
        "vp_sde": (VPSDEProcess(clip_x0=False), (c, 8, 8)),
        "sie": (InterpolationProcess(clip_x0=False), (c, 8, 8)),
        "blur": (_blur(), (c, 8, 8)),
        "gddm": (gddm, (gddm.domain_channels(c), 8, 8)),
    }


@pytest.mark.parametrize("name", ["ddpm", "vp_sde", "sie", "blur", "gddm"])
def test_registered_and_nfe_exact(name):
    """Every Gaussian process lists both solvers; ``sample_loop`` spends exactly 1 NFE a step on its own grid;
    ``reverse_step`` refuses them (multistep) with a pointer to sample_loop."""
    p, shape = _processes_small()[name]
    lam = _lam(shape)
    denoiser = exact_denoiser(p, lam)
    for solver in MULTISTEP_SOLVERS:
        assert solver in p.solvers and NFE_PER_STEP[solver] == 1
        for n in (1, 2, 7):
            res = sample_loop(p, denoiser, (2, *shape), num_steps=n, solver=solver, dtype=F64,
                              generator=torch.Generator().manual_seed(0))
            assert res.nfe == n == res.steps and res.timesteps == list(p.timesteps(n)), (name, solver, n)
            assert torch.isfinite(res.sample).all()
    grid = p.timesteps(4)
    with pytest.raises(ValueError, match="multistep"):
        p.reverse_step(denoiser, torch.zeros(1, *shape, dtype=F64), grid[0], grid[1], solver="dpmpp_2m")


@pytest.mark.parametrize("make", [lambda: DDPMProcess(clip_x0=False), _blur], ids=["ddpm", "blur"])
def test_sde_samples_independent_of_batch(make):
    """Per-sample generators: sample i of DPM-Solver++(2M) SDE is the same in a batch of 4 and of 2."""
    p = make()
    lam = _lam((1, 8, 8))
    denoiser = exact_denoiser(p, lam)
    big = sample_loop(p, denoiser, (4, 1, 8, 8), num_steps=6, solver="dpmpp_2m_sde", dtype=F64,
                      generator=PerSampleGenerator(7, range(4))).sample
    small = sample_loop(p, denoiser, (2, 1, 8, 8), num_steps=6, solver="dpmpp_2m_sde", dtype=F64,
                        generator=PerSampleGenerator(7, [2, 3])).sample
    torch.testing.assert_close(big[2:], small, rtol=1e-12, atol=1e-12)
    other = sample_loop(p, denoiser, (2, 1, 8, 8), num_steps=6, solver="dpmpp_2m_sde", dtype=F64,
                        generator=PerSampleGenerator(8, [2, 3])).sample
    assert not torch.allclose(other, small)


def test_sde_variance_matches_monte_carlo():
    """The exact propagated variance of the 2M SDE chain (benchmark helper, explicit noise) equals the
    empirical variance of ``sample_loop`` (4 coordinates, 20 000 samples, 15 steps: within 5 SE)."""
    lam4 = torch.tensor([1e-3, 0.1, 1.0, 5.0], dtype=F64)
    p = VPSDEProcess(clip_x0=False)
    denoiser = exact_denoiser(p, lam4)
    grid = p.timesteps(15)
    var0 = start_variance(p, lam4, grid[0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((20000, 4), generator=g, dtype=F64) * var0.sqrt()
    out = sample_loop(p, denoiser, x.shape, solver="dpmpp_2m_sde", generator=g, dtype=F64, z_init=x,
                      timesteps=grid).sample
    var, nfe = multistep_sde_variance(p, denoiser, grid, var0, (4,))
    assert nfe == 15
    emp = out.var(0)
    assert torch.all((emp - var).abs() <= 5 * var * math.sqrt(2 / 20000)), (emp, var)


@pytest.fixture(scope="module")
def lam_cifar():
    if not EIGENVALUES.is_file():
        pytest.skip(f"{EIGENVALUES} missing (see shared/data/README.md)")
    return load_eigenvalues()


def test_w2_dpmpp_20_vs_ddim_100(lam_cifar):
    """Exact W2 on N(0, diag λ_CIFAR): on a log-SNR-uniform grid DPM-Solver++(2M) at 20 NFE beats DDIM at 100 NFE
    (VP SDE and DDPM); on the processes' own uniform grids it beats DDIM at equal NFE but not 5x the NFE (the
    numbers of docs/results/gaussian_w2/table.md)."""
    procs = solver_processes(lam_cifar)
    for name in ("VP-SDE", "DDPM"):
        p, lam, shape = procs[name]
        w_dpm, n_dpm = solver_w2(p, lam, shape, "dpmpp_2m", 20, "logsnr")
        w_ddim, n_ddim = solver_w2(p, lam, shape, "ddim", 100, "logsnr")
        assert n_dpm == 20 and n_ddim <= 100 and w_dpm < w_ddim, (name, w_dpm, w_ddim)
        for n in (20, 100):
            assert solver_w2(p, lam, shape, "dpmpp_2m", n)[0] < solver_w2(p, lam, shape, "ddim", n)[0]
    p = paper_process()
    assert solver_w2(p, lam_cifar, tuple(lam_cifar.shape), "dpmpp_2m", 20)[0] == pytest.approx(2.1449, abs=1e-3)


def test_grids():
    """``time_grid``: every kind is descending between the ends of the process's full grid; ``logsnr`` is uniform in
    the log-SNR (above the floor) with its own last step to σ = 0."""
    for p in (DDPMProcess(), VPSDEProcess(), InterpolationProcess(), _blur()):
        full = p.timesteps(None)
        for kind in ("process", "uniform_t", "quadratic", "logsnr"):
            g = time_grid(p, 10, kind)
            assert all(a > b for a, b in zip(g[:-1], g[1:])), (kind, g)
            assert g[-1] == full[-1] and 9 <= len(g) - 1 <= 10, (kind, g)
            if kind != "process":
                assert g[0] == pytest.approx(full[0])
    for p in (VPSDEProcess(), InterpolationProcess()):  # continuous time: exactly uniform in λ
        g = time_grid(p, 10, "logsnr")
        clean = p.alpha_sigma(torch.tensor([g[-1]], dtype=F64))[1].item() == 0
        lam = _median_log_snr(p, g[1:-1] if clean else g[1:])
        steps = np.diff(lam)
        assert np.allclose(steps, steps[0], rtol=1e-3) and steps[0] > 0, lam
        assert _median_log_snr(p, [g[0]])[0] <= -4.0  # starts at t_max (SIE: λ ≈ −37, the grid from the floor −10)


def test_epdm_refuses_with_reason():
    """EPDM (σ_t depends on x0) refuses the exponential integrators with one clear message, through
    sample_loop and through the step function."""
    p = EdgePreservingProcess(num_timesteps=20)
    assert not set(MULTISTEP_SOLVERS) & set(p.solvers)
    for solver in MULTISTEP_SOLVERS:
        with pytest.raises(ValueError, match="depends on the clean image x0"):
            sample_loop(p, denoiser_for(p, lambda z, t: z), (1, 1, 8, 8), num_steps=3, solver=solver)
        with pytest.raises(ValueError, match="depends on the clean image x0"):
            dpmpp_step(p, denoiser_for(p, lambda z, t: z), torch.zeros(1, 1, 8, 8), 10, 5, solver, MultistepState())


@pytest.mark.parametrize("solver", MULTISTEP_SOLVERS)
def test_module_sample_through_diffusion_module(solver):
    """``DiffusionModule.sample`` runs them (the path of ``cli.py predict/test --model.init_args.sampling.solver``): exact
    NFE, and the same images whatever the batch split (per-sample noise of the SDE variant)."""
    from diffproc.errors import ConfigError

    torch.manual_seed(0)
    m = DiffusionModule(process=DDPMProcess(num_timesteps=50), image_size=8, channels=3, ema_decay=0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1},
                        sampling=SamplingSpec(solver=solver, num_steps=6, time_grid="logsnr"))
    whole = m.sample(5, SamplingSpec(seed=11), progress=False)
    assert whole.nfe == 6 == m.planned_nfe() and whole.solver == solver
    assert whole.timesteps == time_grid(m.process, 6, "logsnr") != m.process.timesteps(6)
    with pytest.raises(ConfigError, match="time_grid"):
        DiffusionModule(process=DDPMProcess(num_timesteps=50), image_size=8, channels=3,
                        sampling=SamplingSpec(time_grid="log-snr"))
    parts = torch.cat([m.sample(len(ix), SamplingSpec(seed=11), indices=ix, progress=False).images
                       for ix in ([0, 1], [2, 3, 4])])
    torch.testing.assert_close(parts, whole.images, rtol=0, atol=1e-5)


def test_epdm_module_refuses_at_config_time():
    from diffproc.errors import ConfigError

    with pytest.raises(ConfigError, match="depends on the clean image x0"):
        DiffusionModule(process=EdgePreservingProcess(), image_size=8, channels=1, ema_decay=0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1},
                        sampling=SamplingSpec(solver="dpmpp_2m"))


def test_one_sampling_spec_resolves_the_same_on_every_surface(tmp_path):
    """One spec (solver, num_steps, time_grid, ddim_eta, seed): the module holds the default; a callback's override
    of one field inherits the rest; ``cli.py predict`` with ``--model.init_args.sampling.num_steps`` over the
    checkpoint's spec, SDEdit's predict path and the exported pipeline's call give the images ``sample()`` gives for
    that same spec; a spec the process cannot run is refused at set-up, naming the option."""
    import json

    import yaml
    from PIL import Image

    from diffproc.callbacks.gddm_diagnostics import GDDMDiagnostics
    from diffproc.callbacks.metrics import FIDCallback, TestMetricsCallback
    from diffproc.callbacks.sample_grid import SampleGrid
    from diffproc.cli import main as cli_main
    from diffproc.errors import ConfigError
    from diffproc.interop.export import export_module
    from diffproc.interop.pipelines import DiffprocPipeline
    from diffproc.methods.sdedit import sdedit

    torch.manual_seed(0)
    default = SamplingSpec(solver="ddim", num_steps=5, time_grid="uniform_t", ddim_eta=0.5, seed=3)
    m = DiffusionModule(process=InterpolationProcess(num_timesteps=20), image_size=8, channels=3, ema_decay=0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1}, sampling=default)
    with torch.no_grad():  # a non-trivial network
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert m.sampling == SamplingSpec(solver="ddim", num_steps=5, time_grid="uniform_t", ddim_eta=0.5, seed=3)

    # the module's default = the loop run with exactly those values (per-sample noise from (seed, i), η, grid)
    ref = sample_loop(m.process, m.denoiser(m.sampling_net), (2, 3, 8, 8), 5, "ddim", PerSampleGenerator(3, [0, 1]),
                      grid="uniform_t", ddim_eta=0.5).sample.clamp(-1, 1)
    base = m.sample(2, progress=False)
    assert torch.equal(base.images, ref) and base.nfe == 5 and base.solver == "ddim"
    assert not torch.equal(m.sample(2, SamplingSpec(ddim_eta=0.0), progress=False).images, ref)  # η is used

    # every callback: an override of one field inherits the rest of the module's spec
    four = SamplingSpec(solver="ddim", num_steps=4, time_grid="uniform_t", ddim_eta=0.5, seed=3)
    assert SampleGrid(sampling=SamplingSpec(num_steps=4), cpu_budget_seconds=0).size(m) == (16, four)
    for cb, group in ((TestMetricsCallback(sampling=SamplingSpec(num_steps=4)), "metrics"),
                      (FIDCallback(sampling=SamplingSpec(num_steps=4)), "fid"),
                      (GDDMDiagnostics(sampling=SamplingSpec(num_steps=4)), "gddm_diagnostics")):
        assert m.check_sampling(cb.sampling, f"--{group}.sampling") == four
    assert m.sampling_spec(GDDMDiagnostics().sampling).num_steps == 20  # its own default: 20 steps, the rest inherited
    four_images = m.sample(2, SamplingSpec(num_steps=4), progress=False).images
    assert m.sample(2, four, progress=False).images.equal(four_images)

    # cli.py predict: the command line's spec field over the checkpoint's, the rest inherited
    hp = json.loads(json.dumps(dict(m.hparams), default=list))
    hp["_class_path"] = "diffproc.methods.base.DiffusionModule"
    import lightning as L
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hp, "global_step": 1, "epoch": 0,
                "pytorch-lightning_version": L.__version__}, tmp_path / "m.ckpt")
    cfg = {"trainer": {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                       "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path)},
           "model": {"class_path": "diffproc.methods.base.DiffusionModule",
                     "init_args": {k: v for k, v in hp.items() if k not in ("_class_path", "image_size", "channels")}},
           "data": {"class_path": "diffproc.data.shapes.ShapesDataModule",
                    "init_args": {"image_size": 8, "num_train": 8, "num_val": 8, "num_test": 8}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli_main(["predict", "--config", str(tmp_path / "cfg.yaml"), "--ckpt_path", str(tmp_path / "m.ckpt"),
              "--model.init_args.sampling.num_steps", "4", "--model.init_args.predict_num_samples", "2",
              "--model.init_args.predict_dir", str(tmp_path / "pred")])
    png = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "pred" / f"{i:06d}.png").convert("RGB"),
                                                   dtype=np.float32)).permute(2, 0, 1) / 255 for i in range(2)])
    assert float((png - (four_images + 1) / 2).abs().max()) <= 0.5 / 255 + 1e-4

    # SDEdit's predict path: the module's spec (strength, seed, ...) as sdedit() resolves it
    guides = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m.hparams.predict_dir = str(tmp_path / "sdedit")
    m.predict_step({"image": guides, "name": ["a", "b"], "index": torch.tensor([0, 1])}, 0)
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "sdedit" / f"{n}_result.png").convert("RGB"),
                                                   dtype=np.float32)).permute(2, 0, 1) / 255 for n in "ab"])
    want = sdedit(m, guides, SamplingSpec(seed=3, strength=0.5))
    assert want.timesteps[0] == 0.5 and want.nfe == 3  # default strength 0.5 of t_max = 1, then uniform_t 0.4, 0.2, 0
    assert float((got - (want.images + 1) / 2).abs().max()) <= 0.5 / 255 + 1e-4

    # the pipeline: the scheduler config holds the module's spec; the call's arguments override it
    out = export_module(m, tmp_path / "export")
    pipe = DiffprocPipeline.from_pretrained(out)
    assert pipe.scheduler.config.sampling == m.hparams["sampling"]
    tol = 1e-5
    assert float(((pipe(batch_size=2, output_type="pt").images) - (ref + 1) / 2).abs().max()) <= tol
    assert float((pipe(batch_size=2, num_inference_steps=4, output_type="pt").images
                  - (four_images + 1) / 2).abs().max()) <= tol
    eta0 = m.sample(2, SamplingSpec(ddim_eta=0.0, seed=7), progress=False).images
    assert float((pipe(batch_size=2, ddim_eta=0.0, seed=7, output_type="pt").images - (eta0 + 1) / 2).abs().max()) <= tol

    # a spec the process cannot run is refused at set-up, naming the option
    with pytest.raises(ConfigError, match=r"--sample_grid\.sampling\.solver: .*no solver 'official'"):
        SampleGrid(sampling=SamplingSpec(solver="official")).setup(None, m, "fit")
    with pytest.raises(ConfigError, match=r"--metrics\.sampling\.time_grid"):
        TestMetricsCallback(sampling=SamplingSpec(time_grid="log-snr")).setup(None, m, "test")
    with pytest.raises(ConfigError, match=r"--fid\.sampling\.ddim_eta must be >= 0"):
        FIDCallback(every_n_train_steps=1, sampling=SamplingSpec(ddim_eta=-0.1)).setup(None, m, "fit")
    with pytest.raises(ConfigError, match=r"model\.init_args\.sampling\.num_steps must be >= 1"):
        DiffusionModule(process=InterpolationProcess(num_timesteps=20), image_size=8, sampling=SamplingSpec(num_steps=0))
    with pytest.raises(ConfigError, match=r"model\.init_args\.sampling\.strength"):
        DiffusionModule(process=InterpolationProcess(num_timesteps=20), image_size=8, sampling=SamplingSpec(strength=2))
    with pytest.raises(ValueError, match=r"pipeline call\.solver"):
        pipe(batch_size=1, solver="nope")


def test_sampling_spec_inherits_field_by_field_resolves_and_refuses():
    """The spec's algebra that every surface relies on: ``over`` keeps the fields an override sets (a falsy 0 too) and
    takes the unset (None) ones from its base, through a chain of overrides; ``of`` reads a dict (hyperparameters, a
    scheduler config) and refuses an unknown field or another type; ``resolve`` completes a spec from the process (its
    ``default_solver``, the ``process`` grid, η 0, seed 0, a strength only for SDEdit) and refuses, naming
    ``<where>.<field>``, more steps than the process's chain has and a NaN η; ``nfe`` is steps × evaluations per
    step."""
    base = SamplingSpec(solver="ddim", num_steps=10, time_grid="uniform_t", ddim_eta=0.5, seed=3)
    override = SamplingSpec(num_steps=4, seed=7)
    assert override.over(base) == SamplingSpec(solver="ddim", num_steps=4, time_grid="uniform_t", ddim_eta=0.5, seed=7)
    assert SamplingSpec(solver="ancestral").over(override.over(base)) == SamplingSpec(
        solver="ancestral", num_steps=4, time_grid="uniform_t", ddim_eta=0.5, seed=7)
    assert SamplingSpec().over(base) == base == base.over(None) == base.over(SamplingSpec())
    assert SamplingSpec(ddim_eta=0.0, seed=0).over(base) == SamplingSpec(solver="ddim", num_steps=10,
                                                                          time_grid="uniform_t", ddim_eta=0.0, seed=0)
    assert SamplingSpec.of(base.to_dict()) == base and SamplingSpec.of(None) == SamplingSpec()
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['steps'\]"):
        SamplingSpec.of({"steps": 4})
    with pytest.raises(TypeError, match="a SamplingSpec or a dict, got int"):
        SamplingSpec.of(4)

    p, sie = DDPMProcess(num_timesteps=20), InterpolationProcess(num_timesteps=20)
    full = SamplingSpec().resolve(p)
    assert full == SamplingSpec(solver="ancestral", num_steps=None, time_grid="process", ddim_eta=0.0, seed=0)
    assert full.nfe(p) == 20 and SamplingSpec(solver="ddim", num_steps=5).resolve(p).nfe(p) == 5
    assert SamplingSpec().resolve(p, sdedit=True).strength == DEFAULT_STRENGTH and full.strength is None
    assert SamplingSpec(solver="rk4", num_steps=5).resolve(sie).nfe(sie) == 5 * NFE_PER_STEP["rk4"] == 20
    # (the refusals of an unknown solver or grid, η < 0, num_steps < 1 and a strength outside [0, 1], named by each
    # surface's option group: test_one_sampling_spec_resolves_the_same_on_every_surface)
    with pytest.raises(ValueError, match=r"here\.num_steps: num_steps=21 is more than DDPMProcess can take: its grid "
                                         r"has 20 steps at most .* Ask for 20 or fewer"):
        SamplingSpec(num_steps=21).resolve(p, "here")
    assert SamplingSpec(num_steps=20).resolve(p).nfe(p) == 20
    with pytest.raises(ValueError, match=r"here\.ddim_eta must be >= 0 .*got nan"):
        SamplingSpec(ddim_eta=float("nan")).resolve(p, "here")
