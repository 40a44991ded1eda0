"""Scale-out and fault tolerance (issue 10): CPU DDP (gloo), kill -9 + resume, NaN stop. (Atomic saves and the NaN
guard on checkpoints, as units: tests/test_callbacks.py.)

Everything runs ``cli.py`` as a user would (subprocesses, tiny shapes runs, one thread per process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clitools import REPO, TINY, run_cli


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for ev in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _base(tmp_path: Path) -> list[str]:
    return ["--config", "configs/quickstart.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path)]


DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def test_ddp_two_ranks_fit_and_predict(tmp_path):
    """2 gloo ranks: data sharded, one checkpoint, sample grid + throughput logged, no hang; predict
    with uneven batches per rank writes every index once, and ranks draw different samples."""
    p = run_cli("fit", *_base(tmp_path), *DDP, "--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "3",
                "--sample_grid.every_n_steps", "3", "--trainer.log_every_n_steps", "1",
                "--throughput.window_size", "2", timeout=600)
    out = p.stdout + p.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "Starting with 2 processes" in out
    runs = sorted((tmp_path / "quickstart").iterdir())
    assert [r.name for r in runs] == ["version_0"], "rank 1 must not create its own run directory"
    ckpts = sorted(p.name for p in (runs[0] / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"], ckpts
    ck = _ckpt(runs[0] / "checkpoints" / "last.ckpt")
    # 64 images + their mirror images, batch 8, 2 ranks -> 8 batches per rank and epoch: step 10 is in
    # epoch 1 (one rank: 16 batches per epoch, epoch 0)
    assert ck["global_step"] == 10 and ck["epoch"] == 1
    assert (runs[0] / "samples" / "step_0000003.png").is_file()
    sc = _scalars(runs[0])
    assert "lr-AdamW" in sc and "train/loss" in sc
    dev, tot = dict(sc["train/device/samples_per_sec"]), dict(sc["train/samples_per_sec"])
    assert dev and all(v > 0 for v in dev.values())
    for step, v in tot.items():  # images/s of both ranks = 2 x rank 0's rate
        assert v == pytest.approx(2 * dev[step], rel=1e-5)

    # predict: 5 samples in batches of 2 -> rank 0 gets indices 0,2,4 (2 batches), rank 1 gets 1,3 (1 batch)
    run_cli("predict", *_base(tmp_path), *DDP, "--ckpt_path", str(runs[0] / "checkpoints" / "last.ckpt"),
            "--model.init_args.predict_num_samples", "5", "--model.init_args.predict_batch_size", "2", timeout=600)
    pred = [d for d in (tmp_path / "quickstart").glob("version_*/predictions")]
    assert len(pred) == 1
    pngs = sorted(p.name for p in pred[0].glob("0*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert (pred[0] / "grid_rank0.png").is_file() and (pred[0] / "grid_rank1.png").is_file()
    from PIL import Image
    import numpy as np
    a, b = (np.asarray(Image.open(pred[0] / f"00000{i}.png")) for i in (0, 1))
    assert not np.array_equal(a, b), "ranks must draw different samples"


def _popen_fit(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "cli.py", "fit", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill9_then_resume(tmp_path):
    """kill -9 a running fit (checkpoint every step, polled and loaded while it is being rewritten),
    then ``--ckpt_path last`` continues the global step, optimizer, LR schedule and EMA."""
    args = [*_base(tmp_path), "--checkpoint.every_n_train_steps", "1", "--sample_grid.every_n_steps", "0",
            "--model.init_args.lr", "1e-3", "--model.init_args.warmup_steps", "100", "--trainer.log_every_n_steps", "1",
            "--trainer.max_steps", "10000"]
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    proc = _popen_fit(args)
    loads = 0
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if last.is_file():
                step = _ckpt(last)["global_step"]  # atomic replace: every read is a complete file
                loads += 1
                if step >= 4:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"fit ended early:\n{proc.stderr.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _ckpt(last)
    k = killed["global_step"]
    assert k >= 4 and loads >= 1

    target = k + 3
    p = run_cli("fit", *args[:-1], str(target), "--ckpt_path", "last")
    assert "Restored all states from the checkpoint" in p.stdout + p.stderr
    assert not (tmp_path / "quickstart" / "version_1").exists()
    assert not list(last.parent.glob(".tmp-*"))  # a temp file of the killed save is cleaned up
    final = _ckpt(last)
    assert final["global_step"] == target
    # optimizer and LR schedule continue (reset would give target - k)
    opt = final["optimizer_states"][0]
    assert int(next(iter(opt["state"].values()))["step"]) == target
    sched = final["lr_schedulers"][0]
    assert sched["last_epoch"] == target and sched["_last_lr"][0] == pytest.approx(1e-3 * (target + 1) / 100)
    # the resumed run (newest event file) logged only steps from the saved one on
    events = sorted(last.parent.parent.glob("events.out.tfevents.*"), key=os.path.getmtime)
    assert len(events) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("lr-AdamW")]
    assert steps and min(steps) >= k and max(steps) == target - 1
    # EMA continued: one more EMA update from the killed EMA cannot be the fresh copy of the raw weights
    st0, st1 = killed["state_dict"], final["state_dict"]
    key = next(k_ for k_ in st1 if k_.startswith("unet.") and k_.endswith("weight"))
    assert not torch.equal(st1["ema_" + key], st1[key])
    assert not torch.equal(st1["ema_" + key], st0["ema_" + key])


def test_nan_stops_with_one_message_and_keeps_good_checkpoint(tmp_path):
    ckdir = tmp_path / "ck"
    common = [*_base(tmp_path), "--checkpoint.dirpath", str(ckdir), "--sample_grid.every_n_steps", "0"]
    run_cli("fit", *common, "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2")
    good = _ckpt(ckdir / "last.ckpt")
    assert good["global_step"] == 2
    blowup = ["--model.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0"]

    # the loss check: a new run whose update explodes stops at the next step with one error line
    p = run_cli("fit", *common, *blowup, "--trainer.max_steps", "50", "--trainer.log_every_n_steps", "1",
                "--checkpoint.every_n_train_steps", "1000", check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.count("error: loss is NaN/inf at global step 1") == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert _ckpt(ckdir / "last.ckpt")["global_step"] == 2  # never overwritten

    # (the weight check, NonFiniteGuard, for a checkpoint due while the weights are NaN: tests/test_callbacks.py)
    kept = _ckpt(ckdir / "last.ckpt")
    assert kept["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_overhead_benchmark_runs_both_setups_and_profiles():
    """``benchmarks/overhead.py`` (issue 29): both setups give one paired ratio per run, the profile lists the
    module's per-step reseed and logging; tiny sizes, so the numbers themselves mean nothing here."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    tiny = ["--image-size", "8", "--batch-size", "4", "--widths", "8", "16", "--steps", "4", "--warmup", "1"]
    for extra in (["--setup", "core", "--repeats", "2"], ["--setup", "cli", "--repeats", "2"],
                  ["--setup", "cli", "--profile"]):
        out = subprocess.run([sys.executable, "benchmarks/overhead.py", *tiny, *extra], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        if "--profile" in extra:
            assert "DiffusionModule.on_train_batch_start" in out.stdout and "DiffusionModule.log" in out.stdout
            assert "ThroughputMonitor" in out.stdout  # the cli setup's callbacks are there
        else:
            ratios = [float(line.split("ratio ")[1].split()[0]) for line in out.stdout.splitlines()
                      if line.startswith("repeat")]
            assert len(ratios) == 2 and all(0.2 < r < 5 for r in ratios), out.stdout

