"""SLURM end to end (marked ``slurm``): needs the cluster of ``docker/slurm/local-cluster.sh``.

Submits the quickstart (tiny) with ``sbatch docker/slurm/train.sbatch`` as a 2-task CPU DDP job,
sends SIGUSR1 with ``scancel --signal=USR1 --batch`` while it trains, and checks that diffproc saved
``last.ckpt`` at the next batch boundary (not Lightning's ``hpc_ckpt`` from inside the signal handler),
requeued the job (same id, ``Restarts=1``) and that the second run resumed from the saved step and finished at ``max_steps`` in the same run directory — with the same weights, EMA,
optimiser state and loss curve as the same job run without interruption (issue 16).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clitools import REPO, assert_same_training_state, scalars

pytestmark = pytest.mark.slurm

MAX_STEPS = 60


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def _job(job_id: str) -> dict[str, str]:
    out = _sh("scontrol", "show", "job", "-o", job_id)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


TRAIN_ARGS = [
    "--trainer.accelerator", "cpu", "--data.init_args.image_size", "16", "--data.init_args.num_train", "64",
    "--data.init_args.batch_size", "8", "--trainer.limit_val_batches", "1", "--sample_grid.num_images", "4",
    "--model.init_args.num_steps", "3", "--trainer.enable_model_summary", "false",
    "--trainer.max_steps", str(MAX_STEPS), "--checkpoint.every_n_train_steps", "5",
    "--sample_grid.every_n_steps", "0", "--trainer.val_check_interval", "1000"]


def _submit(name: str, tmp_path: Path, env: dict) -> tuple[str, Path]:
    """``sbatch docker/slurm/train.sbatch`` as a 2-task CPU DDP job; returns (job id, its output file)."""
    out_file = tmp_path / f"slurm-{name}-%j.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--gres=none",
         "--cpus-per-task=1", f"--output={out_file}", "--time=20:00", "docker/slurm/train.sbatch", *TRAIN_ARGS],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=60).stdout.strip().split(";")[0]
    return job_id, Path(str(out_file).replace("%j", job_id))


def _wait_completed(job_id: str, log: Path, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while (state := _job(job_id)["JobState"]) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() < deadline, f"job still {state} after {timeout} s"
        time.sleep(1)
    assert state == "COMPLETED", f"{state}\n{log.read_text()[-4000:] if log.exists() else ''}"


@pytest.fixture(scope="module")
def cluster():
    # CI sets DIFFPROC_REQUIRE_SLURM=1 after starting the cluster: then a missing cluster is a failure
    missing = pytest.fail if os.environ.get("DIFFPROC_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sbatch") is None:
        missing("no SLURM client: run `docker/slurm/local-cluster.sh` (as root) first")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"idle|mixed|allocated", state):
        missing(f"SLURM has no usable node (sinfo: {state.strip()!r}); run docker/slurm/local-cluster.sh")


def test_sbatch_sigusr1_requeue_resume(cluster, tmp_path):
    run_dir = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO),
               RUN_DIR=str(run_dir), PYTHON=sys.executable, CONFIG="configs/quickstart.yaml")
    job_id, log = _submit("dpq", tmp_path, env)
    job_dir = run_dir / "dpq" / f"job_{job_id}"
    last = job_dir / "checkpoints" / "last.ckpt"
    try:
        # 1) wait until it trains (a checkpoint exists), then signal the batch step like SLURM would
        deadline = time.time() + 300
        while not last.is_file():
            assert time.time() < deadline, f"no checkpoint after 300 s; job {_job(job_id).get('JobState')}\n" \
                                           f"{log.read_text()[-3000:] if log.exists() else ''}"
            assert _job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
            time.sleep(0.5)
        _sh("scancel", "--signal=USR1", "--batch", job_id)

        # 2) last.ckpt at the next batch boundary, then requeue: same job id, Restarts=1, then it completes
        deadline, released = time.time() + 420, False
        while True:
            info = _job(job_id)
            if info["JobState"] == "COMPLETED" or info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            if info["JobState"] == "PENDING" and info.get("Restarts") == "1" and not released:
                # SLURM makes a requeued batch job eligible only ~2 minutes later; don't wait for that here
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                               timeout=30)
                released = True
            assert time.time() < deadline, f"job still {info['JobState']} after 420 s\n{log.read_text()[-3000:]}"
            time.sleep(1)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED", f"{info['JobState']}\n{text[-4000:]}"
        assert info["Restarts"] == "1", text[-4000:]
    finally:
        if _job(job_id)["JobState"] in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job_id], timeout=30)

    assert not list(job_dir.glob("hpc_ckpt_*.ckpt")), sorted(p.name for p in job_dir.iterdir())
    saved_at = re.findall(r"SLURM requeue signal: saved the state at step (\d+) to (\S+);", text)
    assert len(saved_at) == 1 and saved_at[0][1] == str(last), text[-4000:]
    saved = int(saved_at[0][0])
    assert 5 <= saved < MAX_STEPS
    # the second run resumed from that checkpoint, in the same run directory, and finished
    starts = re.findall(r"restart (\d+) on .*resume from (\S+)", text)
    assert [s[0] for s in starts] == ["0", "1"], text[-4000:]
    assert starts[0][1] == "nothing" and starts[1][1] == str(last), starts
    assert f"Restored all states from the checkpoint at {starts[1][1]}" in text
    assert _step(last) == MAX_STEPS
    assert [p.name for p in (run_dir / "dpq").iterdir()] == [f"job_{job_id}"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = sorted(job_dir.glob("events.out.tfevents.*"), key=os.path.getmtime)
    assert len(events) == 2
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("lr-AdamW")]
    assert steps and min(steps) >= saved, (saved, steps[:5])

    # 3) the same job without a signal: the requeued run ends with the very same tensors (weights, EMA,
    #    optimiser, schedule) and TensorBoard shows the same curve (issue 16)
    straight_id, straight_log = _submit("dps", tmp_path, env)
    try:
        _wait_completed(straight_id, straight_log)
    finally:
        if _job(straight_id)["JobState"] in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", straight_id], timeout=30)
    straight_dir = run_dir / "dps" / f"job_{straight_id}"
    assert_same_training_state(last, straight_dir / "checkpoints" / "last.ckpt")
    got, ref = scalars(job_dir), scalars(straight_dir)
    for tag in ("train/loss", "lr-AdamW"):
        assert got[tag] == ref[tag], tag
