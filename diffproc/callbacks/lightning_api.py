"""Every use of Lightning's and TensorBoard's private API, in one place.

diffproc needs a few things Lightning does not expose publicly: the logger connector's step filter, the
evaluation loop's batch counter, the cluster environment, ``ModelCheckpoint``'s own "save last.ckpt now",
TensorBoard's event writer and LightningCLI's checkpoint-hyper-parameter hook. Each is reached through one
function here, and :data:`PRIVATE` lists them with who needs them, so that
``tests/test_callbacks.py`` names the first one an upgrade removes, and what to adapt.

Tested with the Lightning range stated in ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities import cloud_io
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.tensorboard import SummaryWriter

#: (object it lives on, private attribute path, the diffproc code that needs it)
PRIVATE: tuple[tuple[str, str, str], ...] = (
    ("Trainer", "_logger_connector.should_update_logs", "throughput.ImageThroughputMonitor (log on Lightning's cadence)"),
    ("Trainer", "_logger_connector.log_metrics", "throughput.ImageThroughputMonitor (log at a chosen step)"),
    ("Trainer", "_evaluation_loop.batch_progress.total.ready", "throughput.ImageThroughputMonitor (validation batches)"),
    ("Trainer", "_accelerator_connector.cluster_environment", "checkpoint.Checkpoint (SLURM requeue)"),
    ("ModelCheckpoint", "_save_last_checkpoint", "checkpoint.Checkpoint (last.ckpt at a safe point)"),
    ("ModelCheckpoint", "_monitor_candidates", "checkpoint.Checkpoint (the metrics a save records)"),
    ("ModelCheckpoint", "_last_global_step_saved", "checkpoint.Checkpoint (skip a save already made)"),
    ("ModelCheckpoint", "_last_checkpoint_saved", "checkpoint.Checkpoint (a deferred save counts as made)"),
    ("ModelCheckpoint", "_save_checkpoint", "checkpoint.Checkpoint (overridden: deferred writes)"),
    ("ModelCheckpoint", "_remove_checkpoint", "checkpoint.Checkpoint (overridden: deferred removals)"),
    ("Trainer", "_checkpoint_connector.dump_checkpoint", "checkpoint.Checkpoint (the state a deferred write holds)"),
    ("SummaryWriter", "_get_file_writer", "checkpoint.mark_resume_in_tensorboard (restart marker)"),
    ("cloud_io", "_is_local_file_protocol", "atomic_io.AtomicCheckpointIO (local files are written atomically)"),
    ("LightningCLI", "_parse_ckpt_path", "diffproc.cli.DiffprocCLI (config stays authoritative on a resume)"),
)


def should_update_logs(trainer: L.Trainer) -> bool:
    """Whether this training step is one Lightning logs at (``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def log_metrics(trainer: L.Trainer, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log ``metrics`` to every logger at ``step`` (default: the trainer's), as Lightning's own callbacks do."""
    trainer._logger_connector.log_metrics(metrics, step=step)


def evaluation_batches_ready(trainer: L.Trainer) -> int:
    """Validation batches run so far by this process (the counter Lightning's throughput monitor uses)."""
    return int(trainer._evaluation_loop.batch_progress.total.ready)


def cluster_environment(trainer: L.Trainer) -> Any:
    """The cluster environment the trainer runs in (``SLURMEnvironment``, ``LightningEnvironment``, ...)."""
    return trainer._accelerator_connector.cluster_environment


def save_last_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """``ModelCheckpoint``'s own "write last.ckpt now" (its path, its ``save_last`` link rules)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_global_step_saved(callback: ModelCheckpoint) -> int:
    """The global step of the last checkpoint ``callback`` wrote."""
    return int(callback._last_global_step_saved)


def mark_saved(callback: ModelCheckpoint, step: int, filepath: str) -> None:
    """Record in ``callback`` that the checkpoint of ``step`` at ``filepath`` is saved (as its own write does)."""
    callback._last_global_step_saved = step
    callback._last_checkpoint_saved = filepath


def write_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
    """``ModelCheckpoint``'s own write of a checkpoint file (what ``checkpoint.Checkpoint`` overrides to defer)."""
    ModelCheckpoint._save_checkpoint(callback, trainer, filepath)


def remove_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
    """``ModelCheckpoint``'s own removal of a superseded checkpoint file."""
    ModelCheckpoint._remove_checkpoint(callback, trainer, filepath)


def dump_checkpoint(trainer: L.Trainer, weights_only: bool = False) -> dict[str, Any]:
    """The checkpoint dict ``trainer.save_checkpoint`` would write now (every ``on_save_checkpoint`` hook run)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def tensorboard_add_event(writer: Any, event: Any) -> None:
    """Append a raw TensorBoard ``Event`` (e.g. a ``SessionLog.START`` restart marker) to ``writer``'s file."""
    writer._get_file_writer().add_event(event)


def is_local_path(path: Any) -> bool:
    """Whether ``path`` is on the local file system (not ``s3://``, ``gs://``, ...), as Lightning decides it."""
    return bool(cloud_io._is_local_file_protocol(path))


def missing() -> list[str]:
    """Every entry of :data:`PRIVATE` the installed Lightning / TensorBoard lacks, as an actionable line."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    owners = {"Trainer": trainer, "ModelCheckpoint": ModelCheckpoint(), "SummaryWriter": SummaryWriter,
              "LightningCLI": LightningCLI, "cloud_io": cloud_io}
    out = []
    for owner, path, user in PRIVATE:
        obj: Any = owners[owner]
        for part in path.split("."):
            if part not in dir(obj):  # not hasattr: a property may raise outside its scope
                out.append(f"{owner}.{path} is gone (no '{part}') in lightning {L.__version__}: needed by {user}; "
                           f"adapt diffproc/callbacks/lightning_api.py and the range in pyproject.toml")
                break
            try:
                obj = getattr(obj, part)
            except RuntimeError:  # Trainer._evaluation_loop: a property defined only while a loop runs
                obj = trainer.validate_loop  # what it returns during validation
    return out
