"""SLURM end to end (marked ``slurm``): needs the cluster of ``docker/slurm/local-cluster.sh``.

Submits the quickstart (tiny) with ``sbatch docker/slurm/train.sbatch`` as a 2-task CPU DDP job (one node
with 2 tasks, and two nodes with one task each: the cluster has two slurmd nodes on this host), sends
SIGUSR1 with ``scancel --signal=USR1 --batch`` while it trains, and checks that diffproc saved
``last.ckpt`` at the next batch boundary (not Lightning's ``hpc_ckpt`` from inside the signal handler),
requeued the job (same id, ``Restarts=1``) and that the second run resumed from the saved step and finished at ``max_steps`` in the same run directory — with the same weights, EMA,
optimiser state and loss curve as the same job run without interruption (issue 16); the two-node job ends
bitwise equal to the one-node one, requeued or not (issue 29). A job whose ``--ntasks-per-node`` is not
``trainer.devices`` is refused before it starts (Lightning #19883).
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
    "--model.init_args.sampling.num_steps", "3", "--trainer.enable_model_summary", "false",
    "--trainer.max_steps", str(MAX_STEPS), "--checkpoint.every_n_train_steps", "5",
    "--sample_grid.every_n_steps", "0", "--trainer.val_check_interval", "1000"]


def _submit(name: str, tmp_path: Path, env: dict, nodes: int = 1, ntasks_per_node: int = 2,
            extra: tuple[str, ...] = ()) -> tuple[str, Path]:
    """``sbatch docker/slurm/train.sbatch`` as a CPU DDP job (``nodes`` x ``ntasks_per_node`` tasks, one CPU
    each), ``extra`` appended to the training arguments; returns (job id, its output file)."""
    out_file = tmp_path / f"slurm-{name}-%j.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}",
         "--gres=none", "--cpus-per-task=1", f"--output={out_file}", "--time=20:00", "docker/slurm/train.sbatch",
         *TRAIN_ARGS, *extra],
        cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=60).stdout.strip().split(";")[0]
    return job_id, Path(str(out_file).replace("%j", job_id))


def _env(run_dir: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO),
                RUN_DIR=str(run_dir), PYTHON=sys.executable, CONFIG="configs/quickstart.yaml")


def _wait_completed(job_id: str, log: Path, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    try:
        while (state := _job(job_id)["JobState"]) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL"):
            assert time.time() < deadline, f"job still {state} after {timeout} s"
            time.sleep(1)
    finally:
        if _job(job_id)["JobState"] in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job_id], timeout=30)
    assert state == "COMPLETED", f"{state}\n{log.read_text()[-4000:] if log.exists() else ''}"


def _run(name: str, tmp_path: Path, nodes: int, ntasks_per_node: int, extra: tuple[str, ...] = ()) -> Path:
    """One uninterrupted job to completion; returns its run directory (after checking it has one
    TensorBoard log, under its own job id, and ran on ``nodes`` nodes)."""
    run_dir = tmp_path / "runs"
    job_id, log = _submit(name, tmp_path, _env(run_dir), nodes, ntasks_per_node, extra)
    _wait_completed(job_id, log)
    info, text = _job(job_id), log.read_text()
    assert info["NumNodes"] == str(nodes) and info["NumTasks"] == str(nodes * ntasks_per_node), info
    assert f"{nodes} node(s) x {ntasks_per_node} task(s)" in text, text[-3000:]
    job_dir = run_dir / name / f"job_{job_id}"
    assert [p.name for p in (run_dir / name).iterdir()] == [job_dir.name]
    assert len(list(job_dir.glob("events.out.tfevents.*"))) == 1, sorted(p.name for p in job_dir.iterdir())
    assert _step(job_dir / "checkpoints" / "last.ckpt") == MAX_STEPS
    return job_dir


@pytest.fixture(scope="module")
def cluster():
    # CI sets DIFFPROC_REQUIRE_SLURM=1 after starting the cluster: then a missing cluster is a failure
    missing = pytest.fail if os.environ.get("DIFFPROC_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("sbatch") is None:
        missing("no SLURM client: run `docker/slurm/local-cluster.sh` (as root) first")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"idle|mixed|allocated", state):
        missing(f"SLURM has no usable node (sinfo: {state.strip()!r}); run docker/slurm/local-cluster.sh")


def _requeued(name: str, tmp_path: Path, nodes: int, ntasks_per_node: int, extra: tuple[str, ...] = ()) -> Path:
    """A job signalled with SIGUSR1 (as SLURM does before the time limit) while it trains: checks that diffproc
    saved ``last.ckpt`` at the next batch boundary, requeued it (same id, ``Restarts=1``) and that the second
    run resumed from the saved step and finished at ``max_steps`` in the same run directory; returns it."""
    run_dir = tmp_path / "runs"
    job_id, log = _submit(name, tmp_path, _env(run_dir), nodes, ntasks_per_node, extra)
    job_dir = run_dir / name / f"job_{job_id}"
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
        assert info["NumNodes"] == str(nodes) and info["NumTasks"] == str(nodes * ntasks_per_node), info
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
    assert text.count(f"{nodes} node(s) x {ntasks_per_node} task(s)") == 2, text[-4000:]
    assert f"Restored all states from the checkpoint at {starts[1][1]}" in text
    assert _step(last) == MAX_STEPS
    assert [p.name for p in (run_dir / name).iterdir()] == [f"job_{job_id}"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = sorted(job_dir.glob("events.out.tfevents.*"), key=os.path.getmtime)
    assert len(events) == 2
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("lr-AdamW")]
    assert steps and min(steps) >= saved, (saved, steps[:5])
    return job_dir


def _assert_same_run(job_dir: Path, ref_dir: Path) -> None:
    """The very same tensors at the end (weights, EMA, optimiser, schedule) and the same TensorBoard curves."""
    assert_same_training_state(job_dir / "checkpoints" / "last.ckpt", ref_dir / "checkpoints" / "last.ckpt")
    got, ref = scalars(job_dir), scalars(ref_dir)
    for tag in ("train/loss", "lr-AdamW"):
        assert got[tag] == ref[tag], tag


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory) -> Path:
    """The reference run: one node, 2 tasks, ``--trainer.devices 2``, not interrupted."""
    return _run("dps", tmp_path_factory.mktemp("one_node"), 1, 2, ("--trainer.devices", "2"))


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory) -> Path:
    """The same training on two nodes with one task each (``--trainer.num_nodes 2``), not interrupted."""
    return _run("dp2", tmp_path_factory.mktemp("two_nodes"), 2, 1, ("--trainer.num_nodes", "2"))


def test_two_slurm_nodes(cluster):
    """The cluster has two nodes: a 2-node step runs one task on each, with node IDs 0 and 1."""
    out = subprocess.run(["srun", "-N2", "-n2", "--time=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    lines = sorted(out.split("\n")[:-1])
    assert [line.split()[0] for line in lines] == ["0", "1"], out
    assert len({line.split()[1] for line in lines}) == 2, out


def test_sbatch_sigusr1_requeue_resume(cluster, one_node, tmp_path):
    # the requeued job ends with the very same tensors as the same job without a signal (issue 16)
    _assert_same_run(_requeued("dpq", tmp_path, 1, 2), one_node)


def test_two_nodes_equal_one_node(two_nodes, one_node):
    # one checkpoint series (not one per node) and, bitwise, the one-node run's final state and curves
    assert sorted(p.name for p in (two_nodes / "checkpoints").iterdir()) == \
        sorted(p.name for p in (one_node / "checkpoints").iterdir())
    _assert_same_run(two_nodes, one_node)


def test_two_nodes_sigusr1_requeue_resume(cluster, two_nodes, tmp_path):
    _assert_same_run(_requeued("dq2", tmp_path, 2, 1, ("--trainer.num_nodes", "2")), two_nodes)


@pytest.mark.parametrize("nodes, ntasks_per_node, extra, message", [
    (1, 2, ("--trainer.devices", "1"), "--trainer.devices 1 differs from --ntasks-per-node=2 (one task per device)"),
    (2, 1, ("--trainer.num_nodes", "2", "--trainer.devices=2"),
     "--trainer.devices 2 differs from --ntasks-per-node=1 (one task per device)"),
    (1, 1, ("--trainer.num_nodes", "2"), "--trainer.num_nodes 2 differs from the job's 1 node(s) (--nodes)"),
], ids=["devices-one-node", "devices-two-nodes", "num-nodes"])
def test_sbatch_refuses_tasks_devices_mismatch(cluster, tmp_path, nodes, ntasks_per_node, extra, message):
    """A job whose tasks per node are not Lightning's devices (or nodes not num_nodes) would stall (Lightning
    #19883): train.sbatch refuses it with one line on stderr and exit code 2 before srun starts."""
    run_dir, err_file = tmp_path / "runs", tmp_path / "slurm-%j.err"
    out_file = tmp_path / "slurm-%j.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--job-name=dpx", f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}",
         "--gres=none", "--cpus-per-task=1", f"--output={out_file}", f"--error={err_file}", "--time=5:00",
         "docker/slurm/train.sbatch", *TRAIN_ARGS, *extra],
        cwd=REPO, env=_env(run_dir), check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    deadline = time.time() + 300
    try:
        while (info := _job(job_id))["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            assert time.time() < deadline, f"job still {info['JobState']} after 300 s"
            time.sleep(0.5)
    finally:
        if _job(job_id)["JobState"] in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job_id], timeout=30)
    err = Path(str(err_file).replace("%j", job_id)).read_text()
    out = Path(str(out_file).replace("%j", job_id)).read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, err, out)
    assert err.splitlines() == [f"train.sbatch: refused: {message}"], err
    assert out == "" and not run_dir.exists(), out  # nothing started: no banner, no run directory
