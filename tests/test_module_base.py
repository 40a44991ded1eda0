"""Room ``methods/base.py``: ``DiffusionModule``, what every method shares: the denoiser bound to the backbone, the
training step, the EMA of the weights, the optimiser, ``sample()`` and ``predict``. Samples do not depend on the batch
size or the number of ranks (per-sample noise from (seed, i)). Elsewhere: the speed options (test_throughput.py), the
heads by class path (test_precond.py), resume and checkpoints end to end (e2e/test_resume.py, test_scale.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clitools import TINY, run_cli
from diffproc.methods.base import DiffusionModule
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.rng import seed_global_rng, train_batch_seed
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


def test_ema_update_is_the_documented_lerp():
    """The EMA weights after a fit are the documented recursion over the raw weights θ_j after each optimiser step j
    (0-based: the module's global_step while the step runs): every ``ema_every_n_steps``-th step, E ← θ_j before
    ``ema_start_step`` (a copy), then E ← d E + (1 − d) θ_j with the warm-up decay d = min(ema_decay, (1+n)/(10+n)),
    n = j − ema_start_step. Here 6 steps, start 1, every 2: a copy at j = 0, then d = 2/11 at j = 2 and 4/13 at
    j = 4, and steps 1, 3, 5 leave E alone; float64 recursion vs the module's float32 EMA, within 1e-6."""
    torch.manual_seed(0)
    m = DiffusionModule(process=DDPMProcess(num_timesteps=20), image_size=8, channels=3, lr=1e-2, warmup_steps=0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1}, ema_decay=0.9, ema_warmup=True,
                        ema_start_step=1, ema_every_n_steps=2)
    raw = []  # θ_j after optimiser step j

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            raw.append([p.detach().double().clone() for p in pl_module.unet.parameters()])

    start = [p.detach().double().clone() for p in m.ema_unet.parameters()]  # a copy of the initial weights
    L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, callbacks=[Record()],
              limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False).fit(
        m, DataLoader(torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, batch_size=4))
    assert len(raw) == 6

    def recursion(warmup: bool) -> list:
        ema = start
        for j, theta in enumerate(raw):
            if j % 2 == 0:
                d = 0.0 if j < 1 else min(0.9, (1 + j - 1) / (10 + j - 1)) if warmup else 0.9
                ema = [d * e + (1 - d) * w for e, w in zip(ema, theta)]
        return ema

    got, want = [p.detach().double() for p in m.ema_unet.parameters()], recursion(warmup=True)
    assert max(float((g - e).abs().max()) for g, e in zip(got, want)) <= 1e-6
    # the test tells apart: the recursion without the warm-up, and the raw weights
    assert max(float((g - e).abs().max()) for g, e in zip(got, recursion(warmup=False))) > 1e-3
    assert max(float((g - w).abs().max()) for g, w in zip(got, raw[-1])) > 1e-3


def test_per_batch_reseed_draws_what_torch_manual_seed_draws():
    """``seed_global_rng`` (the per-batch reseed) gives the global CPU stream ``torch.manual_seed`` gives, so
    runs and checkpoints from before it was introduced resume on the same random numbers."""
    seed = train_batch_seed(7, 1, 12345)
    torch.manual_seed(seed)
    expected = (torch.randn(5), torch.rand(3), torch.randint(0, 1000, (4,)))
    torch.manual_seed(0)
    seed_global_rng(seed, torch.device("cpu"))
    got = (torch.randn(5), torch.rand(3), torch.randint(0, 1000, (4,)))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
