""":class:`NonFiniteGuard`: refuses to save a checkpoint whose weights (raw or EMA) contain NaN/inf, so the last
good checkpoint is never overwritten by a diverged model. The loss itself is checked in
``DiffusionModule.training_step``; both raise ``FloatingPointError``, which ``cli.py`` prints as one ``error:``
line.
"""

from __future__ import annotations

import lightning as L
import torch

def _all_finite(tensors: list[torch.Tensor]) -> bool:
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


class NonFiniteGuard(L.Callback):
    """Stop instead of saving a checkpoint with NaN/inf weights (raw or EMA).

    Runs in ``on_save_checkpoint``, which every rank executes (DDP replicas hold the same weights, so
    all ranks stop together and no rank is left waiting in a collective).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.enabled:
            return
        tensors = list(checkpoint.get("state_dict", {}).values())
        if not _all_finite(tensors):
            raise FloatingPointError(
                f"the weights became NaN/inf by global step {trainer.global_step}: training stopped without "
                "saving them, so the last good checkpoint was kept. Lower model.lr, keep "
                "trainer.gradient_clip_val (e.g. 1.0), or use 32-bit precision, then resume with --ckpt_path last.")
