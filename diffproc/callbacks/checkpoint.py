"""Checkpointing defaults."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffproc.callbacks import lightning_api


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when fit ends between two periodic saves
    (e.g. ``max_steps`` not a multiple of ``every_n_train_steps``), so a finished run's last checkpoint
    is always its final state.

    On an interruption it writes ``last.ckpt`` when that state is consistent: after a SIGTERM (Lightning
    stops at a batch boundary, or diffproc's samplers stop between two network evaluations) in any phase
    of ``fit``, and after Ctrl+C once training itself has finished (e.g. during the end-of-fit sample
    grid). A Ctrl+C in the middle of a training step writes nothing: the previous checkpoint stays.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or not self.save_last:
            return
        # a plain SIGTERMException comes from a safe point (batch boundary, between two evaluations); a
        # StopDeadlineExceeded (its subclass, diffproc.callbacks.fault) may come from anywhere
        consistent = type(exception) is SIGTERMException or (
            isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.fit_loop.done)
        if consistent and trainer.global_step != lightning_api.last_global_step_saved(self):
            lightning_api.save_last_checkpoint(self, trainer)
            rank_zero_info(f"interrupted ({type(exception).__name__}): saved the state at step "
                           f"{trainer.global_step} to {self.last_model_path}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._requeue_requested = False
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
        super().teardown(trainer, pl_module, stage)
        previous = getattr(self, "_previous_requeue_handler", None)
        if previous is not None:
            signal.signal(*previous)
            self._previous_requeue_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path and trainer.global_step > 0:
            mark_resume_in_tensorboard(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
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
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit"
                and trainer.global_step != lightning_api.last_global_step_saved(self)):
            lightning_api.save_last_checkpoint(self, trainer)


def mark_resume_in_tensorboard(trainer: L.Trainer, step: int) -> None:
    """Write TensorBoard's restart marker (``SessionLog.START`` at ``step``, what ``SummaryWriter(purge_step=)``
    writes) into every TensorBoard log of a resumed run: TensorBoard then drops the events the interrupted
    run logged at or after the checkpoint's step, and the resumed run's events continue one curve without
    duplicated steps. Rank 0 only (the only rank that logs)."""
    if trainer.global_rank != 0:
        return
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            lightning_api.tensorboard_add_event(writer, Event(step=int(step),
                                                              session_log=SessionLog(status=SessionLog.START)))
            writer.flush()
