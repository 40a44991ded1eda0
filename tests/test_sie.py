"""SIE (spec methods_blur_sie_baselines.md §5, §9.5): forward end points, v = dx/dη, zero loss for
perfect heads, ODE convergence orders with the Gaussian oracle (§1.4), NFE accounting, ddim_dual = DDIM
η=0, β* table, and a few-step fit through the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffproc.processes.interpolation import InterpolationProcess, betas_for_alpha_bar
from diffproc.nets.precond import EpsHead, SigmaEpsHead, denoiser_for, make_head
from diffproc.samplers import NFE_PER_STEP, ODE_SOLVERS, CountingDenoiser, SamplingSpec, sample_loop

ROOT = Path(__file__).resolve().parents[1]
MU, S = 0.3, 0.5
D = torch.float64


def oracle(process: InterpolationProcess, mu: float = MU, s: float = S, heads: str = "dual"):
    """Exact posterior predictions for x0 ~ N(mu, s²) per element (spec §1.4)."""

    def fn(x, t):
        a, sg = process.coefficients(t, x)
        den = a * a * s * s + sg * sg
        x0 = mu + a * s * s * (x - a * mu) / den
        eps = sg * (x - a * mu) / den
        if heads == "eps":
            return eps
        return torch.cat([x0, eps], 1)

    return fn


# --- forward process (§9.5.1) -------------------------------------------------------------------------
def test_forward_end_points_and_schedule():
    p = InterpolationProcess()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=D) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=D)
    one, zero = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    assert (p.forward(x0, one, eps) - eps).abs().max() < 1e-15
    assert torch.equal(p.forward(x0, zero, eps), x0)
    # ᾱ_t = cos²η_t; β_t = 1 − ᾱ_t/ᾱ_{t−1} satisfies Π(1 − β) = ᾱ (t = k/T)
    T = p.num_timesteps
    k = torch.arange(T + 1, dtype=D)
    a, s = p.alpha_sigma(k / T)
    assert torch.allclose(a**2, torch.cos(k / T * math.pi / 2) ** 2, atol=1e-15, rtol=0)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-15, rtol=0)
    ab = a**2
    betas = 1 - ab[1:] / ab[:-1]
    assert abs(float(betas[-1]) - 1.0) < 1e-12  # β_T = 1: x_T is pure noise
    assert torch.allclose(torch.cumprod(1 - betas, 0), ab[1:], atol=1e-12, rtol=0)
    assert p.model_time(torch.tensor([0.25], dtype=D)).item() == 250.0


def test_velocity_is_derivative_of_forward_map():
    """v = dx/dη: central differences (x(η+h) − x(η−h))/2h − v = O(h²) (§9.5.2)."""
    p = InterpolationProcess()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=D), torch.randn(3, 2, 4, 4, generator=g, dtype=D)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=D)
    v = p.velocity(x0, eps, t)
    errs = []
    for h in (1e-2, 5e-3, 2.5e-3):
        dt = h / (math.pi / 2)  # a step h in η
        fd = (p.forward(x0, t + dt, eps) - p.forward(x0, t - dt, eps)) / (2 * h)
        errs.append(float((fd - v).abs().max()))
    assert errs[0] < 1e-4
    for e1, e2 in zip(errs, errs[1:]):
        assert 3.6 < e1 / e2 < 4.4  # halving h quarters the error


@pytest.mark.parametrize("schedule", ["sin", "beta_star", "linear"])
def test_zero_loss_for_perfect_heads_and_terms(schedule):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 3, 8, 8, generator=g, dtype=D) * 2 - 1
    eps = torch.randn(6, 3, 8, 8, generator=g, dtype=D)
    t = torch.rand(6, generator=g, dtype=D)
    p = InterpolationProcess(schedule=schedule, gamma=0.7)
    perfect = lambda z, tt: torch.cat([x0, eps], 1)  # noqa: E731
    assert p.loss(denoiser_for(p, perfect), x0, t, eps).item() == 0.0
    # loss = ‖Δx0‖² + ‖Δε‖² + γ‖−sin η Δx0 + cos η Δε‖² with a known perturbation
    d0, de = 0.1 * torch.randn_like(x0, generator=g), 0.2 * torch.randn_like(x0, generator=g)
    off = lambda z, tt: torch.cat([x0 + d0, eps + de], 1)  # noqa: E731
    a, s = p.coefficients(t, x0)
    expect = (d0**2).mean() + (de**2).mean() + 0.7 * ((-s * d0 + a * de) ** 2).mean()
    terms = p.loss_terms(denoiser_for(p, off), x0, t, eps)
    assert abs(terms["loss"].item() - expect.item()) < 1e-12
    # l1 norm, and gradient_wrt='t' scales the v term by η'/T = π/(2T) for sin
    p1 = InterpolationProcess(schedule=schedule, gamma=0.7, loss_norm="l1")
    assert abs(p1.loss_terms(denoiser_for(p1, off), x0, t, eps)["x0"].item() - d0.abs().mean().item()) < 1e-12
    if schedule == "sin":
        pt = InterpolationProcess(gamma=1.0, gradient_wrt="t")
        vt = pt.loss_terms(denoiser_for(pt, off), x0, t, eps)["v"].item()
        assert abs(vt - ((math.pi / 2000) ** 2) * ((-s * d0 + a * de) ** 2).mean().item()) < 1e-15


def test_output_channels_and_errors():
    p = InterpolationProcess()
    assert make_head(None, p).setup(p, 4, 3).output_channels(p, 3) == 6  # the default: DualHead
    p0 = InterpolationProcess(gamma=0)
    assert make_head("eps", p0).setup(p0, 4, 3).output_channels(p0, 3) == 3
    with pytest.raises(ValueError, match="gamma"):
        EpsHead().setup(p, 4, 3)
    with pytest.raises(ValueError, match="sigma_eps"):
        SigmaEpsHead().setup(p0, 4, 3)
    with pytest.raises(ValueError, match="schedule"):
        InterpolationProcess(schedule="cosine")
    with pytest.raises(ValueError, match="2C"):
        denoiser_for(p, lambda z, t: torch.zeros(1, 3, 4, 4))(torch.zeros(1, 3, 4, 4), torch.ones(1))


def test_beta_star_table():
    """β* = betas_for_alpha_bar(cos²(τπ/2)) clipped at 0.999: equals sin except on the last step."""
    T = 1000
    betas = betas_for_alpha_bar(T, lambda s: torch.cos(s * math.pi / 2) ** 2, 0.999)
    assert betas[-1].item() == 0.999 and (betas[:-1] < 0.999).all()
    p, q = InterpolationProcess(schedule="beta_star"), InterpolationProcess()
    k = torch.arange(T, dtype=D) / T
    assert torch.allclose(p.alpha_sigma(k)[0], q.alpha_sigma(k)[0], atol=1e-12, rtol=0)
    aT = p.alpha_sigma(torch.ones(1, dtype=D))[0].item() ** 2
    assert abs(aT - 0.001 * math.cos(math.pi / 2 * 0.999) ** 2) < 1e-15
    # linear table reproduces DDPM's ᾱ on the integer grid
    from diffproc.processes.ddpm import DDPMProcess
    lin, ddpm = InterpolationProcess(schedule="linear"), DDPMProcess()
    kk = torch.arange(T + 1)
    assert torch.allclose(lin.alpha_sigma(kk.double() / T)[0], ddpm.alpha_sigma(kk)[0], atol=1e-12, rtol=0)


# --- ODE solvers (§9.5.3, §9.5.5) -----------------------------------------------------------------------
def ode_errors(solver: str, steps=(16, 32, 64), mu=MU, s=S) -> list[float]:
    p = InterpolationProcess()
    z = torch.linspace(-3, 3, 13, dtype=D).view(13, 1, 1, 1)
    errs = []
    for n in steps:
        res = sample_loop(p, denoiser_for(p, oracle(p, mu, s)), z.shape, n, solver, z_init=z.clone(), dtype=D)
        assert res.nfe == NFE_PER_STEP[solver] * n
        errs.append(float((res.sample - (mu + s * z)).abs().max()))
    return errs


# spec §9.5.3 table (max error over z ∈ linspace(−3, 3, 13), S = 16/32/64) and order bands
SPEC = {"euler": ((3.64e-2, 1.91e-2, 9.79e-3), (0.85, 1.15)),
        "heun": ((5.16e-3, 1.34e-3, 3.40e-4), (1.8, 2.2)),
        "midpoint": ((1.91e-3, 4.56e-4, 1.11e-4), (1.8, 2.2)),
        "rk4": ((3.48e-6, 2.03e-7, 1.23e-8), (3.7, 4.3))}


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_ode_convergence_order(solver):
    errs = ode_errors(solver)
    table, (lo, hi) = SPEC[solver]
    for e, ref in zip(errs, table):
        assert abs(e / ref - 1) < 0.02, (errs, table)
    for e1, e2 in zip(errs, errs[1:]):
        assert lo <= math.log2(e1 / e2) <= hi, errs


def test_nfe_accounting_and_grid():
    p = InterpolationProcess()
    counter = CountingDenoiser(oracle(p))
    for solver in ODE_SOLVERS + ("ddim_dual", "ddim", "ancestral"):
        before = counter.calls
        res = sample_loop(p, denoiser_for(p, counter), (2, 1, 4, 4), 5, solver, generator=torch.Generator().manual_seed(0),
                          dtype=D)
        assert res.nfe == counter.calls - before == NFE_PER_STEP[solver] * 5
        assert res.steps == 5 and res.timesteps == [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
        assert torch.isfinite(res.sample).all()
    # DDIM grids divided by T
    assert InterpolationProcess(spacing="uniform").timesteps(10)[:2] == [0.901, 0.801]
    with pytest.raises(ValueError, match="spacing"):  # 0.1's spelling (python -m diffproc.convert rewrites it)
        InterpolationProcess(spacing="ddim_uniform")


def test_ode_solvers_for_any_gaussian_process():
    """The ODE path needs only alpha_sigma_dot on a GaussianProcess (no SIE code): a VP process with
    α = exp(−t), σ = sqrt(1 − α²) integrated by RK4 lands on the oracle endpoint."""
    from diffproc.processes.gaussian import GaussianProcess

    class ExpVP(GaussianProcess):
        solvers = ("rk4", "heun")
        default_solver = "rk4"

        def alpha_sigma(self, t):
            a = torch.exp(-4 * t.double())
            return a, (1 - a * a).sqrt()

        def alpha_sigma_dot(self, t):
            a, s = self.alpha_sigma(t)
            return -4 * a, 4 * a * a / s

        def sample_time(self, batch, generator=None, device=None):
            return torch.rand(batch, generator=generator).to(device)

        def timesteps(self, num_steps=None):
            n = num_steps or 10
            return [1.0 - 0.999 * i / n for i in range(n + 1)]  # 1 → 0.001 (σ > 0)

    p = ExpVP(clip_x0=False)
    z = torch.linspace(-2, 2, 9, dtype=D).view(9, 1, 1, 1)
    a1, s1 = p.alpha_sigma(torch.tensor([1.0], dtype=D))
    xT = a1 * MU + (a1**2 * S**2 + s1**2).sqrt() * z  # start on the exact marginal at t = 1
    res = sample_loop(p, denoiser_for(p, lambda x, t: oracle_eps(p, x, t)), z.shape, 200, "rk4", z_init=xT, dtype=D)
    a0, s0 = p.alpha_sigma(torch.tensor([0.001], dtype=D))
    exact = a0 * MU + (a0**2 * S**2 + s0**2).sqrt() * z  # PF-ODE is the monotone marginal transport
    assert res.nfe == 800
    assert (res.sample - exact).abs().max() < 1e-6


def oracle_eps(p, x, t):
    a, s = p.coefficients(t, x)
    return s * (x - a * MU) / (a * a * S * S + s * s)


def test_ddim_dual_equals_ddim_eta0():
    """Both heads derived from one ε-oracle: ddim_dual == DDIM η=0 on cos/sin to 1e-12 (§9.5.4)."""
    dual, single = InterpolationProcess(), InterpolationProcess(gamma=0)
    eps_fn, head = oracle(single, heads="eps"), EpsHead(min_alpha=1e-4)

    def dual_fn(x, t):
        a, s = single.coefficients(t, x)
        e = eps_fn(x, t)
        return torch.cat([(x - s * e) / a.clamp_min(head.min_alpha), e], 1)

    z = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=D)
    for n in (10, 16):
        a = sample_loop(dual, denoiser_for(dual, dual_fn), z.shape, n, "ddim_dual", z_init=z.clone(), dtype=D)
        b = sample_loop(single, denoiser_for(single, eps_fn, head), z.shape, n, "ddim", z_init=z.clone(), dtype=D)
        assert (a.sample - b.sample).abs().max() < 1e-12
        assert a.nfe == b.nfe == n
    # with the exact oracle, DDIM on the cos/sin schedule converges to μ + s·z at first order
    # (measured max errors 0.0706 / 0.0357 at S = 32 / 64)
    zz = torch.linspace(-3, 3, 13, dtype=D).view(13, 1, 1, 1)
    e = [float((sample_loop(dual, denoiser_for(dual, oracle(dual)), zz.shape, n, "ddim_dual", z_init=zz.clone(), dtype=D).sample
                - (MU + S * zz)).abs().max()) for n in (32, 64)]
    assert 0.9 < math.log2(e[0] / e[1]) < 1.1 and e[1] < 0.04


def test_ddim_dual_single_heads_and_clipping():
    """Core ancestral/DDIM run on the 2C split; clip_x0 clips x̂0 in steps."""
    p = InterpolationProcess(clip_x0=True)
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=D)
    big = lambda x, t: torch.cat([torch.full_like(x, 5.0), torch.zeros_like(x)], 1)  # noqa: E731
    out = sample_loop(p, denoiser_for(p, big), z.shape, 4, "ddim_dual", z_init=z.clone(), dtype=D).sample
    assert torch.allclose(out, torch.ones_like(out))  # x̂0 = 5 clipped to 1, final σ = 0


# --- method and CLI ---------------------------------------------------------------------------------
def test_sie_module_sample_and_loss():
    from diffproc.methods.base import DiffusionModule

    torch.manual_seed(0)
    m = DiffusionModule(process=InterpolationProcess(), image_size=8, channels=1,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1},
                        sampling=SamplingSpec(solver="rk4", num_steps=2), ema_decay=0.0)
    assert m.unet.config.out_channels == 2
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    loss = m.compute_loss(x, m.unet, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    res = m.sample(2, progress=False, generator=torch.Generator().manual_seed(0))
    assert res.images.shape == (2, 1, 8, 8) and res.nfe == 8 and res.solver == "rk4"
    assert res.images.abs().max() <= 1


def test_loss_terms_are_logged_at_every_logger_step(tmp_path):
    """The loss's parts (eq. 12: x̂0, ε̂ and γ·v terms) are logged only on the steps the logger writes, and those
    rows hold the same step's values: they add up to that step's ``train/loss``."""
    import csv

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from diffproc.methods.base import DiffusionModule
    from diffproc.nets.precond import DualHead

    torch.manual_seed(0)
    m = DiffusionModule(process=InterpolationProcess(gamma=1.0), precond=DualHead(), image_size=8,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1}, ema_decay=0.0)
    trainer = L.Trainer(max_steps=9, log_every_n_steps=3, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(m, DataLoader(TensorDataset(torch.rand(40, 3, 8, 8) * 2 - 1), batch_size=4))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [int(r["step"]) for r in rows] == [2, 5, 8]
    for r in rows:
        parts = float(r["train/loss_x0"]) + float(r["train/loss_eps"]) + float(r["train/loss_v"])
        assert parts == pytest.approx(float(r["train/loss"]), rel=1e-5)


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """A 3-step ``cli.py fit`` of configs/sie_shapes.yaml (8 px, tiny UNet, Heun sample grid)."""
    tmp = tmp_path_factory.mktemp("sie_fit")
    r = _run(["fit", "--config", str(ROOT / "configs/sie_shapes.yaml"), "--trainer.max_steps", "3",
              "--trainer.val_check_interval", "3", "--trainer.logger.init_args.save_dir", str(tmp),
              "--data.init_args.num_train", "32", "--data.init_args.image_size", "8",
              "--data.init_args.batch_size", "8", "--trainer.limit_val_batches", "1",
              "--sample_grid.num_images", "2", "--model.init_args.sampling.num_steps", "2",
              "--model.init_args.sampling.solver", "heun", "--trainer.enable_progress_bar", "false",
              "--model.init_args.unet", '{"block_out_channels": [8, 16], "layers_per_block": 1}'], ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list(tmp.glob("*/version_*"))
    assert len(runs) == 1
    return runs[0]


def test_cli_fit_few_steps(fitted_run):
    assert (fitted_run / "checkpoints" / "last.ckpt").is_file()
    assert (fitted_run / "config.yaml").is_file()
    assert list(fitted_run.glob("events.out.tfevents*"))
    ck = torch.load(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 3
    assert ck["state_dict"]["unet.conv_out.weight"].shape[0] == 6  # 2C output heads [x̂0 | ε̂]


@pytest.mark.slow
def test_nfe_sweep_script(fitted_run, tmp_path):
    """benchmarks/nfe_sweep.py on the fitted checkpoint: one row per (solver, NFE), exact NFE."""
    import json

    out = tmp_path / "sweep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/nfe_sweep.py"), "--config",
                        str(fitted_run / "config.yaml"), "--ckpt", str(fitted_run / "checkpoints/last.ckpt"),
                        "--nfe", "2", "4", "--solvers", "euler", "heun", "rk4", "ddim_dual",
                        "--num-samples", "8", "--batch-size", "8", "--reference-num", "32", "--device", "cpu",
                        "--json", str(out), "--", "--data.init_args.num_test", "32"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    got = {(x["solver"], x["target_nfe"]): x["nfe"] for x in rows}
    assert got == {("euler", 2): 2, ("heun", 2): 2, ("ddim_dual", 2): 2, ("euler", 4): 4, ("heun", 4): 4,
                   ("rk4", 4): 4, ("ddim_dual", 4): 4}
    assert all(math.isfinite(x["value"]) and x["metric"] == "shapes_fid" for x in rows)
    assert "target NFE" in r.stdout


CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in
                 list(ROOT.glob("configs/sie_*.yaml")) + list(ROOT.glob("configs/sie_ablation/*.yaml")))


@pytest.mark.slow
def test_configs_parse_and_build(capsys):
    """Every SIE/ablation config parses (``fit --print_config``) and its model builds (tiny UNet)."""
    import importlib

    import yaml

    from diffproc.cli import DiffprocCLI

    assert len(CONFIGS) == 19  # 5 datasets (shapes, CIFAR-10, CelebA, MNIST, Fashion-MNIST) + 14 ablation rows
    for config in CONFIGS:
        with pytest.raises(SystemExit) as exit_:
            DiffprocCLI(args=["fit", "--config", str(ROOT / config), "--print_config"])
        assert exit_.value.code in (0, None), config
        printed = capsys.readouterr().out
        assert "class_path: diffproc.methods." in printed, config
        model = yaml.safe_load((ROOT / config).read_text())["model"]
        module, cls = model["class_path"].rsplit(".", 1)
        args = dict(model["init_args"], unet={"block_out_channels": [8], "layers_per_block": 1},
                    image_size=8, channels=3, ema_decay=0.0)
        m = getattr(importlib.import_module(module), cls)(**args)
        process = model["init_args"]["process"]
        dual = (process["class_path"].endswith(".InterpolationProcess")
                and model["init_args"].get("precond", {"class_path": ".DualHead"})["class_path"].endswith(".DualHead"))
        assert m.unet.config.out_channels == (6 if dual else 3), config
        assert m.sampling.solver in m.process.solvers
