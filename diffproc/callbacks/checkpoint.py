"""Checkpointing defaults."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when fit ends between two periodic saves
    (e.g. ``max_steps`` not a multiple of ``every_n_train_steps``), so a finished run's last checkpoint
    is always its final state."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.save_last and not trainer.fast_dev_run and trainer.state.fn == "fit"
                and trainer.global_step != self._last_global_step_saved):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
