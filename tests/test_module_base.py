"""Room ``methods/base.py``: ``DiffusionModule``, what every method shares: the denoiser bound to the backbone, the
training step, the EMA of the weights, the optimiser, ``sample()`` and ``predict``. Samples do not depend on the batch
size or the number of ranks (per-sample noise from (seed, i)). Elsewhere: the speed options (test_throughput.py), the
heads by class path (test_precond.py), resume and checkpoints end to end (e2e/test_resume.py, test_scale.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import TINY, run_cli
from diffproc.methods.base import DiffusionModule
from diffproc.processes.ddpm import DDPMProcess
from diffproc.samplers import SamplingSpec


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
