"""SIGTERM / SIGINT end a run within seconds in every phase (training, validation, end-of-fit grid,
test-time sampling, reference statistics), after writing whatever checkpoint is consistent.

Each test starts ``cli.py`` as a user would, waits until the phase has visibly started (its progress
output), sends the signal and measures how long the process takes to exit.
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

from clitools import REPO

pytestmark = pytest.mark.slow

#: the process must be gone this long after the signal (checkpoint write + teardown included)
EXIT_WITHIN_S = 20.0


def _start(args: list[str], log: Path, grace: str = "3") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               DIFFPROC_SIGTERM_GRACE=grace)
    return subprocess.Popen([sys.executable, "cli.py", *args], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _signal_when(proc: subprocess.Popen, log: Path, marker: str, sig: int, timeout: float = 240.0,
                 settle: float = 1.0) -> tuple[int, float, str]:
    """Wait for ``marker`` in the output, send ``sig``; return (exit code, seconds to exit, output)."""
    start = time.monotonic()
    while marker not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"phase marker {marker!r} never appeared (rc={proc.poll()}):\n"
                                 + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    time.sleep(settle)
    assert proc.poll() is None, "the phase ended before the signal: make it longer"
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 120 s after {signal.Signals(sig).name}")
    return rc, time.monotonic() - sent, log.read_text(errors="replace")


def _fit_args(tmp: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "configs/quickstart.yaml", "--data.init_args.num_train", "64",
            "--data.init_args.num_val", "8", "--data.init_args.batch_size", "8", "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.save_dir", str(tmp), "--trainer.log_every_n_steps", "1", *extra]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_sigterm_during_training_saves_a_consistent_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    proc = _start(_fit_args(tmp_path, "--trainer.max_steps", "100000", "--trainer.enable_progress_bar", "true",
                            "--sample_grid.every_n_steps", "0", "--trainer.val_check_interval", "100000"), log)
    rc, secs, out = _signal_when(proc, log, "Epoch 1", signal.SIGTERM)
    assert rc == 143 and secs < EXIT_WITHIN_S, (rc, secs, out[-2000:])
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    ckpt = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] >= 8 and "optimizer_states" in state  # a full, resumable checkpoint


def test_sigterm_during_validation(tmp_path):
    log = tmp_path / "log.txt"
    # a long validation: 400 batches of the validation split at every 2nd step
    proc = _start(_fit_args(tmp_path, "--trainer.max_steps", "100000", "--trainer.enable_progress_bar", "true",
                            "--sample_grid.every_n_steps", "0", "--trainer.val_check_interval", "2",
                            "--data.init_args.num_val", "3200", "--trainer.limit_val_batches", "400",
                            "--trainer.num_sanity_val_steps", "0"), log)
    rc, secs, out = _signal_when(proc, log, "Validation DataLoader 0:", signal.SIGTERM)
    assert rc == 143 and secs < EXIT_WITHIN_S, (rc, secs, out[-2000:])
    assert _step(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt") == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_end_of_fit_grid_keeps_the_final_state(tmp_path, sig):
    log = tmp_path / "log.txt"
    proc = _start(_fit_args(tmp_path, "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
                            "--sample_grid.num_images", "64", "--model.init_args.sampling.num_steps", "1000",
                            "--sample_grid.cpu_budget_seconds", "0"), log)
    rc, secs, out = _signal_when(proc, log, "sample grid (step 3)", sig, settle=2.0)
    assert rc != 0 and secs < EXIT_WITHIN_S, (rc, secs, out[-2000:])
    if sig == signal.SIGTERM:
        assert rc == 143
    # the grid runs before the end-of-fit checkpoint: the interruption writes the final state instead
    assert _step(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt") == 3


def _checkpoint(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "cli.py", *_fit_args(tmp_path, "--trainer.max_steps", "1",
                                                          "--sample_grid.every_n_steps", "0",
                                                          "--trainer.enable_progress_bar", "false")],
                   cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), check=True,
                   capture_output=True)
    return tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


def test_sigterm_during_test_time_sampling(tmp_path):
    ckpt = _checkpoint(tmp_path)
    log = tmp_path / "log.txt"
    proc = _start(["test", "--config", "configs/quickstart.yaml", "--ckpt_path", str(ckpt),
                   "--data.init_args.num_train", "256", "--data.init_args.num_test", "8",
                   "--trainer.logger.init_args.save_dir", str(tmp_path), "--metrics.num_samples", "2000",
                   "--metrics.batch_size", "250", "--model.init_args.sampling.num_steps", "1000",
                   "--metrics.cache_dir", str(tmp_path / "cache")], log)
    rc, secs, out = _signal_when(proc, log, "test metrics: sampling", signal.SIGTERM, settle=2.0)
    assert rc == 143 and secs < EXIT_WITHIN_S, (rc, secs, out[-2000:])
    assert not list(tmp_path.glob("quickstart/*/metrics.json")), "no metrics from an interrupted run"


def test_sigterm_during_reference_statistics(tmp_path):
    """A phase without its own stop check (features of the real images): the SIGTERM deadline
    (DIFFPROC_SIGTERM_GRACE, 3 s here) ends it."""
    ckpt = _checkpoint(tmp_path)
    log = tmp_path / "log.txt"
    proc = _start(["test", "--config", "configs/quickstart.yaml", "--ckpt_path", str(ckpt),
                   "--data.init_args.num_train", "200000", "--data.init_args.num_test", "8",
                   "--trainer.logger.init_args.save_dir", str(tmp_path), "--metrics.num_samples", "8",
                   "--metrics.cache_dir", str(tmp_path / "cache")], log)
    rc, secs, out = _signal_when(proc, log, "reference stats (shapes)", signal.SIGTERM, settle=2.0)
    assert rc == 143 and secs < EXIT_WITHIN_S, (rc, secs, out[-2000:])
    assert not list((tmp_path / "cache").rglob("*.npz")), "no reference statistics from an interrupted run"
