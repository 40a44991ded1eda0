"""Samples do not depend on the batch size or the number of ranks (per-sample noise from (seed, i)),
and the processes layer stays below the samplers (import walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import REPO, TINY, run_cli
from diffproc.methods.base import DiffusionModule
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.rng import PerSampleGenerator, randn, sample_seed
from diffproc.samplers import SamplingSpec


def test_per_sample_generator_rows_do_not_depend_on_the_batch():
    whole = randn((5, 3, 4, 4), PerSampleGenerator(7, range(5)))
    parts = torch.cat([randn((2, 3, 4, 4), PerSampleGenerator(7, [0, 1])),
                       randn((3, 3, 4, 4), PerSampleGenerator(7, [2, 3, 4]))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])
    assert sample_seed(0, 1) != sample_seed(1, 0) and sample_seed(3, 4) == sample_seed(3, 4)
    with pytest.raises(ValueError, match="first dimension"):
        randn((4, 3), PerSampleGenerator(7, range(5)))


@pytest.mark.parametrize("solver", ["ancestral", "ddim"])
def test_module_sample_is_batch_independent(solver):
    """Every step's noise (ancestral) and the prior come from (seed, index): splitting 9 samples into
    batches of 1 + 7 + 1 gives the same images as one batch of 9."""
    torch.manual_seed(0)
    m = DiffusionModule(process=DDPMProcess(num_timesteps=50), image_size=8, channels=3, ema_decay=0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1},
                        sampling=SamplingSpec(solver=solver, num_steps=6, ddim_eta=0.5))
    whole = m.sample(9, SamplingSpec(seed=11), progress=False).images
    parts = torch.cat([m.sample(len(ix), SamplingSpec(seed=11), indices=ix, progress=False).images
                       for ix in ([0], list(range(1, 8)), [8])])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    other = m.sample(9, SamplingSpec(seed=12), progress=False).images
    assert (other - whole).abs().max() > 0.1


def _pngs(folder: Path, n: int) -> np.ndarray:
    from PIL import Image
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png"), dtype=np.int16) for i in range(n)])


def test_predict_same_images_for_batch_sizes_and_ranks(tmp_path):
    """``cli.py predict`` writes the same PNGs for predict_batch_size 1, 7 and 64 and for 1 vs 2 DDP
    ranks (CPU gloo)."""
    base = ["--config", "configs/quickstart.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.sampling.solver", "ancestral"]
    run_cli("fit", *base, "--trainer.max_steps", "2", timeout=600)
    ckpt = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    n, got = 9, {}
    for name, extra in (("b1", ["--model.init_args.predict_batch_size", "1"]),
                        ("b7", ["--model.init_args.predict_batch_size", "7"]),
                        ("b64", ["--model.init_args.predict_batch_size", "64"]),
                        ("ddp2_b7", ["--model.init_args.predict_batch_size", "7", "--trainer.accelerator", "cpu",
                                     "--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        out = tmp_path / name
        run_cli("predict", *base, "--ckpt_path", str(ckpt), "--model.init_args.predict_num_samples", str(n),
                "--model.init_args.predict_dir", str(out), *extra, timeout=600)
        got[name] = _pngs(out, n)
    ref = got["b64"]
    assert len({tuple(img.ravel()[:32]) for img in ref}) == n, "samples must differ from each other"
    for name, imgs in got.items():
        # same noise, same network: at most a rounding flip of one 8-bit level from batch-size-dependent
        # float summation order in the convolutions
        diff = np.abs(imgs - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, int(diff.max()), float((diff > 0).mean()))


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_processes_import_no_samplers_lightning_or_nn():
    """The dependency runs one way (samplers -> processes): no module under diffproc/processes imports
    diffproc.samplers, lightning or torch.nn, at top level or inside a function."""
    files = sorted((REPO / "diffproc" / "processes").glob("*.py"))
    assert len(files) >= 8
    forbidden = ("diffproc.samplers", "diffproc.nets", "diffproc.methods", "diffproc.callbacks", "diffproc.interop",
                 "lightning", "pytorch_lightning", "torch.nn")
    bad = {f.name: sorted(n for n in _imports(f.read_text()) if any(n == b or n.startswith(b + ".") for b in forbidden))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad
    # the walk sees imports hidden inside functions too
    assert "diffproc.samplers.sample_loop" in _imports("def f():\n    from diffproc.samplers import sample_loop\n")


#: rooms and what they never import (docs/core.md, "Layers"): Run -> Callbacks -> Methods -> (Nets, Samplers) ->
#: Processes -> Ops; Interop -> (Methods, Nets, Samplers, Processes); nothing imports upward
UPWARD = {
    "nets": ("diffproc.methods", "diffproc.samplers", "diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "samplers.py": ("diffproc.methods", "diffproc.nets", "diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "methods": ("diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "callbacks": ("diffproc.interop", "diffproc.cli"),
}


def test_rooms_import_only_downward():
    """nets, samplers, methods and callbacks import no room above them, and nothing in diffproc imports interop."""
    pkg = REPO / "diffproc"
    bad = {}
    for f in sorted(pkg.rglob("*.py")):
        room = f.relative_to(pkg).parts[0]
        forbidden = UPWARD.get(room, ()) + (() if room == "interop" else ("diffproc.interop",))
        names = [n for n in _imports(f.read_text()) if any(n == b or n.startswith(b + ".") for b in forbidden)]
        if names:
            bad[str(f.relative_to(REPO))] = sorted(names)
    assert not bad, bad


def test_no_import_inside_a_function():
    """Every import of the package stands at module level (an optional dependency in a module-level try)."""
    bad = []
    for f in sorted((REPO / "diffproc").rglob("*.py")):
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{f.relative_to(REPO)}:{n.lineno}" for n in ast.walk(fn)
                        if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not bad, bad


def test_former_spellings_are_gone():
    """One name per concept (solver, num_steps, schedule, spacing values): 0.2 has no former spellings (0.1 files
    convert with ``python -m diffproc.convert``)."""
    from diffproc.callbacks.sample_grid import SampleGrid
    from diffproc.processes.interpolation import InterpolationProcess

    tiny = dict(image_size=8, channels=3, ema_decay=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    with pytest.raises(TypeError, match="sampler"):
        DiffusionModule(process=DDPMProcess(), sampler="ddim", **tiny)
    with pytest.raises(TypeError, match="sampling_steps"):
        SampleGrid(sampling_steps=4)
    with pytest.raises(TypeError, match="beta_schedule"):
        BlurProcess(beta_schedule="cosine")
    with pytest.raises(ValueError, match="spacing"):
        InterpolationProcess(spacing="ddim_quad")
    p = run_cli("fit", "--config", "configs/quickstart.yaml", "--model.init_args.sampler", "ancestral",
                "--print_config", check=False)
    assert p.returncode != 0 and "sampler" in p.stderr


def test_sample_grid_is_sized_to_the_cpu_budget(monkeypatch):
    """On the CPU a grid that would exceed ``cpu_budget_seconds`` draws fewer images, then fewer steps; a
    full-chain-only solver (blur's ``official``) gives way to a strided one for the preview."""
    from diffproc.callbacks.sample_grid import SampleGrid

    tiny = dict(image_size=8, channels=3, ema_decay=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    m = DiffusionModule(process=DDPMProcess(num_timesteps=100), sampling=SamplingSpec(solver="ddim", num_steps=50),
                        **tiny)
    monkeypatch.setattr(type(m), "seconds_per_evaluation", lambda self, n: 0.01 * n)  # 10 ms per image and NFE
    spec = m.sampling
    assert SampleGrid(num_images=16, cpu_budget_seconds=100).size(m) == (16, spec)  # 8 s: as configured
    assert SampleGrid(num_images=64, cpu_budget_seconds=10).size(m) == (20, spec)  # 64 x 50 x 10 ms = 32 s
    num, small = SampleGrid(num_images=64, cpu_budget_seconds=1).size(m)  # 4 images x 25 steps = 1 s
    assert (num, small.num_steps, small.solver) == (4, 25, "ddim")
    assert SampleGrid(num_images=64, cpu_budget_seconds=0).size(m) == (64, spec)  # 0 = no budget
    b = DiffusionModule(process=BlurProcess(num_timesteps=100), **tiny)  # solver "official": 99 steps, full chain only
    monkeypatch.setattr(type(b), "seconds_per_evaluation", lambda self, n: 0.01 * n)
    num, small = SampleGrid(num_images=16, cpu_budget_seconds=1).size(b)
    assert (num, small.solver) == (4, "ancestral") and small.num_steps == 25 and b.planned_nfe(small) == 25


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
    from diffproc.processes.interpolation import InterpolationProcess
    from diffproc.samplers import sample_loop

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
