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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # the step that reaches max_steps is saved here, where the loops' state is the one of a batch
        # boundary; at on_train_end the fit loop has already counted the interrupted epoch as finished,
        # and a resume from there would start the next epoch's data order (issue 16)
        if (self.save_last and not trainer.fast_dev_run and 0 < trainer.max_steps <= trainer.global_step
                and trainer.global_step != self._last_global_step_saved):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit"
                and trainer.global_step != self._last_global_step_saved):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
