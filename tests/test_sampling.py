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
from diffproc.processes.base import PerSampleGenerator, randn, sample_seed
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
    forbidden = ("diffproc.samplers", "diffproc.methods", "diffproc.callbacks", "lightning", "pytorch_lightning",
                 "torch.nn")
    bad = {f.name: sorted(n for n in _imports(f.read_text()) if any(n == b or n.startswith(b + ".") for b in forbidden))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad
    # the walk sees imports hidden inside functions too
    assert "diffproc.samplers.sample_loop" in _imports("def f():\n    from diffproc.samplers import sample_loop\n")


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
