"""Checkpointing defaults."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


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
        if consistent and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"interrupted ({type(exception).__name__}): saved the state at step "
                           f"{trainer.global_step} to {self.last_model_path}")

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
        if not self.save_last or trainer.fast_dev_run or trainer.global_step == self._last_global_step_saved:
            return
        stop = trainer.received_sigterm
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop or 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if stop:
                rank_zero_info(f"SIGTERM: saved the state at step {trainer.global_step} to {self.last_model_path}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit"
                and trainer.global_step != self._last_global_step_saved):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
            writer._get_file_writer().add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
            writer.flush()
