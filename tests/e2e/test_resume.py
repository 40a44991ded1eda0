"""Exact resume (issue 16), end to end through ``cli.py fit`` as subprocesses (marked ``slow``).

An interrupted run — stopped at a step limit, killed with ``kill -9`` (in a training step, or in the
validation right after a checkpoint), stopped by SIGTERM (mid-epoch, at an epoch's last step), on one process
or on 2 DDP ranks (gloo); the signals are sent by a callback at a given step, so every machine tests the same
moment — resumed with ``--ckpt_path last`` must end with the very tensors of an
uninterrupted run: raw weights, EMA weights, AdamW moments and step counts, the LR schedule, compared
bitwise (CPU, one thread). Its TensorBoard log must be one curve: the same (step, value) pairs as the
uninterrupted run's, no step twice. A checkpoint written during validation holds the raw weights as
``unet`` and the EMA weights as ``ema_unet``.

The runs are tiny (8×8 shapes, 40 images = 80 with their mirror images, batch 8: 10 batches per epoch), so
every scenario crosses epoch boundaries, including a stop exactly at the end of an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clitools import REPO, assert_same_training_state, load, run_cli, scalars

pytestmark = pytest.mark.slow

STEPS = 24  # 2.4 epochs

BASE = [
    "fit", "--config", "configs/ddpm_shapes.yaml",
    "--data.init_args.image_size", "8", "--data.init_args.num_train", "40", "--data.init_args.num_val", "8",
    "--data.init_args.num_test", "8", "--data.init_args.batch_size", "8",
    "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--checkpoint.every_n_train_steps", "4", "--checkpoint.save_top_k", "-1",
    "--sample_grid.every_n_steps", "0", "--sample_grid.num_images", "2", "--model.init_args.sampling.num_steps", "2",
    "--model.init_args.warmup_steps", "5",  # the warm-up ends inside the run; constant lr after it
]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def fit_args(root: Path, steps: int, *extra: str) -> list[str]:
    return [*BASE, "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", "run",
            "--trainer.max_steps", str(steps), *extra]


def run_dir(root: Path) -> Path:
    return root / "run" / "version_0"


def checkpoint_at(root: Path, step: int) -> Path:
    found = list((run_dir(root) / "checkpoints").glob(f"*-step={step}.ckpt"))
    assert len(found) == 1, sorted(p.name for p in (run_dir(root) / "checkpoints").iterdir())
    return found[0]


def assert_one_continuous_log(resumed: Path, straight: Path) -> None:
    got, ref = scalars(run_dir(resumed)), scalars(run_dir(straight))
    assert len(list(run_dir(resumed).glob("events.out.tfevents.*"))) >= 2  # really two processes, one directory
    assert sorted(got) == sorted(ref)
    for tag in ("train/loss", "val/loss", "lr-AdamW"):
        assert got[tag] == ref[tag], tag  # the same steps and the same values, bit for bit
    for tag, points in got.items():
        steps = [s for s, _ in points]
        if tag != "epoch":  # Lightning logs `epoch` with the train and the val metrics of a step (straight run too)
            assert len(steps) == len(set(steps)), (tag, steps)
        assert steps == sorted(steps), (tag, steps)
        assert steps == [s for s, _ in ref[tag]], tag


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    run_cli(*fit_args(root, STEPS))
    return root


@pytest.mark.parametrize("stop", [7, 10], ids=["mid-epoch", "end-of-epoch"])
def test_stop_and_resume_equals_straight_run(straight, tmp_path, stop):
    run_cli(*fit_args(tmp_path, stop))
    run_cli(*fit_args(tmp_path, STEPS), "--ckpt_path", "last")
    assert_same_training_state(run_dir(tmp_path) / "checkpoints" / "last.ckpt",
                               run_dir(straight) / "checkpoints" / "last.ckpt")
    assert_one_continuous_log(tmp_path, straight)


SIGNALLER = '''
import os
import lightning as L


class SignalAt(L.Callback):
    """Send signal ``sig`` to this process at the end of training step ``step``, or of the validation after it."""

    def __init__(self, sig: int, step: int, during: str = "train"):
        self.sig, self.step, self.during = sig, step, during

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.during == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_validation_end(self, trainer, pl_module):
        if self.during == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
'''


def _fit_interrupted(root: Path, sig: int, step: int, during: str) -> subprocess.CompletedProcess:
    """The full run, sent ``sig`` by a callback at a given step (the same moment whatever the machine's speed)."""
    (root / "signaller.py").write_text(SIGNALLER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{root}", PYTHONWARNINGS="ignore")
    signaller = {"class_path": "signaller.SignalAt", "init_args": {"sig": int(sig), "step": step, "during": during}}
    return subprocess.run([sys.executable, "cli.py", *fit_args(root, STEPS),
                           f"--trainer.callbacks+={json.dumps(signaller)}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig, step, during, resumes_from", [
    (signal.SIGKILL, 6, "train", 4),  # mid-epoch, two steps after a checkpoint
    # during the validation that follows the step-8 checkpoint: that checkpoint is not on disk yet (Lightning
    # does not rerun the validation when resuming from it, so its point would be missing from the log)
    (signal.SIGKILL, 8, "validation", 4),
    (signal.SIGTERM, 7, "train", 7),
    (signal.SIGTERM, 10, "train", 10),  # the last step of an epoch: saved there, not as a finished epoch
], ids=["kill-9-mid-epoch", "kill-9-in-validation", "sigterm-mid-epoch", "sigterm-end-of-epoch"])
def test_interrupted_run_resumes_exactly(straight, tmp_path, sig, step, during, resumes_from):
    done = _fit_interrupted(tmp_path, sig, step, during)
    assert done.returncode == (-9 if sig == signal.SIGKILL else 143), done.stderr[-3000:]
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == resumes_from
    if resumes_from % 4 == 0:  # the checkpoint a resume starts from is the uninterrupted run's state at that step
        assert_same_training_state(last, checkpoint_at(straight, resumes_from))
    run_cli(*fit_args(tmp_path, STEPS), "--ckpt_path", "last")
    assert_same_training_state(last, run_dir(straight) / "checkpoints" / "last.ckpt")
    assert_one_continuous_log(tmp_path, straight)


def test_ddp_two_ranks_resume_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = 14  # 80 items over 2 ranks: 5 batches per rank and epoch; stop after 1.4 epochs
    run_cli(*fit_args(straight, steps), *DDP, timeout=600)
    run_cli(*fit_args(resumed, 7), *DDP, timeout=600)
    run_cli(*fit_args(resumed, steps), *DDP, "--ckpt_path", "last", timeout=600)
    assert_same_training_state(run_dir(resumed) / "checkpoints" / "last.ckpt",
                               run_dir(straight) / "checkpoints" / "last.ckpt")
    assert_one_continuous_log(resumed, straight)


def test_checkpoint_written_during_validation_keeps_raw_and_ema(tmp_path):
    """EMA is a separate module (``ema_unet``), never swapped into ``unet``: a checkpoint written in the
    middle of validation restores the raw weights for training and the EMA weights for sampling."""
    import lightning as L

    from diffproc.data.shapes import ShapesDataModule
    from diffproc.methods.base import DiffusionModule
    from diffproc.processes.ddpm import DDPMProcess

    class SaveDuringValidation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.sanity_checking or trainer.global_step != 6:
                return
            self.raw = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}
            self.ema = {k: v.clone() for k, v in pl_module.ema_unet.state_dict().items()}
            trainer.save_checkpoint(tmp_path / "during_val.ckpt")

    L.seed_everything(0)
    model = DiffusionModule(process=DDPMProcess(), image_size=8,
                            unet={"block_out_channels": [16, 16], "layers_per_block": 1, "norm_num_groups": 8},
                            ema_decay=0.9, ema_warmup=False, lr=1e-2)
    data = ShapesDataModule(image_size=8, num_train=40, num_val=8, num_test=8, batch_size=8)
    saver = SaveDuringValidation()
    trainer = L.Trainer(max_steps=8, val_check_interval=6, limit_val_batches=1, accelerator="cpu",
                        callbacks=[saver], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, check_val_every_n_epoch=None)
    trainer.fit(model, data)
    ckpt = load(tmp_path / "during_val.ckpt")
    assert ckpt["global_step"] == 6
    restored = DiffusionModule.load_from_checkpoint(tmp_path / "during_val.ckpt", map_location="cpu", weights_only=True)
    for name, value in saver.raw.items():
        assert torch.equal(restored.unet.state_dict()[name], value), name
    for name, value in saver.ema.items():
        assert torch.equal(restored.ema_unet.state_dict()[name], value), name
    # they really are two different sets of weights, and sampling uses the EMA one
    assert any(not torch.equal(saver.raw[k], saver.ema[k]) for k in saver.raw)
    assert restored.sampling_net is restored.ema_unet
