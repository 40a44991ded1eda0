"""Checkpointing defaults."""

from __future__ import annotations

import os
import signal
import subprocess
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.fabric.utilities.apply_func import apply_to_collection
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from diffproc.callbacks import lightning_api


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when fit ends between two periodic saves
    (e.g. ``max_steps`` not a multiple of ``every_n_train_steps``), so a finished run's last checkpoint
    is always its final state.

    On an interruption it writes ``last.ckpt`` when that state is consistent: after a SIGTERM (Lightning
    stops at a batch boundary, or diffproc's samplers stop between two network evaluations) in any phase
    of ``fit``, and after Ctrl+C once training itself has finished (e.g. during the end-of-fit sample
    grid). A Ctrl+C in the middle of a training step writes nothing: the previous checkpoint stays.

    A checkpoint taken at the end of a training step (``every_n_train_steps``, ``max_steps``, SIGTERM) holds
    the state of that moment, but its file is written at the next safe point (the next training step's
    start, the end of training, an exception), after the validation that follows the step and after the
    loggers are flushed. Lightning does not rerun that validation when it resumes from such a checkpoint,
    so a process killed (``kill -9``, node failure) between the two would otherwise lose the validation
    point from the log for good; now every event logged up to a checkpoint's step is on disk before the
    checkpoint is.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.write_pending(trainer, barrier=False)  # another rank may not be here: no collective
        if trainer.state.fn != "fit" or trainer.sanity_checking or not self.save_last:
            return
        # a plain SIGTERMException comes from a safe point (batch boundary, between two evaluations); a
        # StopDeadlineExceeded (its subclass, diffproc.callbacks.stop_deadline) may come from anywhere
        consistent = type(exception) is SIGTERMException or (
            isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.fit_loop.done)
        if consistent and trainer.global_step != lightning_api.last_global_step_saved(self):
            lightning_api.save_last_checkpoint(self, trainer)
            rank_zero_info(f"interrupted ({type(exception).__name__}): saved the state at step "
                           f"{trainer.global_step} to {self.last_model_path}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._requeue_requested = False
        self._deferring = False
        self._pending: list[tuple[str, dict]] = []  # (path, state taken at the end of a training step)
        self._pending_removals: list[str] = []
        env = lightning_api.cluster_environment(trainer)
        if stage == "fit" and isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal:
            # SLURM's requeue signal (SIGUSR1 of `--signal=SIGUSR1@90` or `scancel --signal=USR1`) only sets a
            # flag; the next batch boundary saves last.ckpt and requeues (on_train_batch_end). Lightning's own
            # handler would save hpc_ckpt_N.ckpt inside the signal handler, in the middle of a step (not a
            # state a resume continues exactly); it is not installed when a handler is already set.
            def on_requeue_signal(signum, frame) -> None:
                self._requeue_requested = True

            self._previous_requeue_handler = (env.requeue_signal, signal.getsignal(env.requeue_signal))
            signal.signal(env.requeue_signal, on_requeue_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.write_pending(trainer, barrier=False)
        super().teardown(trainer, pl_module, stage)
        previous = getattr(self, "_previous_requeue_handler", None)
        if previous is not None:
            signal.signal(*previous)
            self._previous_requeue_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path and trainer.global_step > 0:
            mark_resume_in_tensorboard(trainer, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        self.write_pending(trainer)
        super().on_train_batch_start(trainer, pl_module, *args, **kwargs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        self._deferring = True
        try:
            self._save_at_batch_end(trainer, pl_module, *args, **kwargs)
        finally:
            self._deferring = False

    def _save_at_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # The step that reaches max_steps, and the step during which a SIGTERM arrived, are saved here, where
        # the loops' state is the one of the periodic checkpoints (a resume continues it exactly). At
        # on_train_end, or where Lightning raises SIGTERMException after an epoch's last batch, the fit loop
        # has already counted the epoch as finished and a resume would skip data (issue 16). Under DDP the
        # ranks decide together (one signalled rank is enough).
        if (not self.save_last or trainer.fast_dev_run
                or trainer.global_step == lightning_api.last_global_step_saved(self)):
            return
        requeue, stop = getattr(self, "_requeue_requested", False), trainer.received_sigterm
        if trainer.world_size > 1:  # one small all-reduce per step (Lightning broadcasts its own flag too)
            flags = torch.tensor([float(requeue), float(stop)], device=pl_module.device)
            requeue, stop = (v > 0 for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist())
        if requeue or stop or 0 < trainer.max_steps <= trainer.global_step:
            lightning_api.save_last_checkpoint(self, trainer)
            if requeue:
                self._requeue(trainer)
            elif stop:
                rank_zero_info(f"SIGTERM: saved the state at step {trainer.global_step} to {self.last_model_path}")

    def _requeue(self, trainer: L.Trainer) -> None:
        """After the requeue signal: ``scontrol requeue`` this job (rank 0) and stop every rank. The requeued
        job resumes from the last.ckpt just written (docker/slurm/train.sbatch)."""
        self.write_pending(trainer)  # before scontrol: the requeue ends this job at once
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
            rank_zero_info(f"SLURM requeue signal: saved the state at step {trainer.global_step} to "
                           f"{self.last_model_path}; requeueing job {job}")
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                rank_zero_info(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
        raise SIGTERMException()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_pending(trainer)
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit"
                and trainer.global_step != lightning_api.last_global_step_saved(self)):
            lightning_api.save_last_checkpoint(self, trainer)


    # --- deferred writes ----------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """``ModelCheckpoint``'s write, deferred when called from the end of a training step: the state is
        taken now (tensors copied to CPU), the file written by :meth:`write_pending`."""
        if not getattr(self, "_deferring", False):
            self.write_pending(trainer)
            return lightning_api.write_checkpoint(self, trainer, filepath)
        state = lightning_api.dump_checkpoint(trainer, self.save_weights_only)
        state = apply_to_collection(state, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._pending = [(p, s) for p, s in self._pending if p != filepath] + [(filepath, state)]
        lightning_api.mark_saved(self, trainer.global_step, filepath)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if getattr(self, "_pending", None):  # a file is removed only once the one replacing it is written
            self._pending_removals.append(filepath)
        else:
            lightning_api.remove_checkpoint(self, trainer, filepath)

    def write_pending(self, trainer: L.Trainer, barrier: bool = True) -> None:
        """Flush the loggers, then write the checkpoints taken at the end of the last training step."""
        pending, removals = getattr(self, "_pending", None), getattr(self, "_pending_removals", [])
        if not pending:
            return
        self._pending, self._pending_removals = [], []
        for logger in trainer.loggers:
            logger.save()  # every event logged up to the checkpoint's step reaches the disk first
        for filepath, state in pending:
            trainer.strategy.save_checkpoint(state, filepath)
        if barrier:
            trainer.strategy.barrier("Checkpoint.write_pending")
        for filepath in removals:
            lightning_api.remove_checkpoint(self, trainer, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def mark_resume_in_tensorboard(trainer: L.Trainer, step: int) -> None:
    """Write TensorBoard's restart marker (``SessionLog.START`` at ``step``, what ``SummaryWriter(purge_step=)``
    writes) into every TensorBoard log of a resumed run: TensorBoard then drops the events the interrupted
    run logged at or after the checkpoint's step, and the resumed run's events continue one curve without
    duplicated steps. Rank 0 only (the only rank that logs)."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            lightning_api.tensorboard_add_event(writer, Event(step=int(step),
                                                              session_log=SessionLog(status=SessionLog.START)))
            writer.flush()
