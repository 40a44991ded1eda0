"""Post-hoc EMA during training (EDM2): power-function EMA profiles of the UNet and their snapshots.

``--posthoc_ema.every_n_steps N`` keeps one :class:`~diffproc.posthoc_ema.PowerEMA` per ``sigma_rels`` entry
(EDM2's two profiles, 0.05 and 0.10, by default) and writes every profile's weights every N optimiser steps and at
the end of fit to ``<run dir>/posthoc_ema/phema-<step>-<sigma_rel>.pt`` (or ``dirpath``). ``python -m
diffproc.posthoc_ema`` then reconstructs the EMA of any sigma_rel from them (the math is in
:mod:`diffproc.posthoc_ema`). The profiles are part of the checkpoint (callback state), so a resumed run continues
them exactly. Off by default (``every_n_steps: 0``): the profiles cost one copy of the UNet each.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffproc.posthoc_ema import PowerEMA, save_snapshot


class PostHocEMA(L.Callback):
    """Power-function EMA profiles of ``pl_module.unet`` and their snapshots (see the module docstring).

    Args:
        every_n_steps: snapshot interval in optimiser steps (0 = off: no profiles are kept).
        sigma_rels: relative widths of the tracked profiles (each in (0, 0.288)).
        dirpath: snapshot folder (default ``<log dir>/posthoc_ema``).
        at_train_end: also snapshot when fit ends off the interval.
    """

    def __init__(self, every_n_steps: int = 0, sigma_rels: Sequence[float] = (0.05, 0.10),
                 dirpath: Optional[str] = None, at_train_end: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"posthoc_ema.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.dirpath = dirpath
        self.at_train_end = at_train_end
        self.profiles: Optional[list[PowerEMA]] = None
        self.step = 0  # last optimiser step folded into the profiles
        self._saved_step = -1
        self._pending: Optional[dict] = None
        self._dir: Optional[str] = None
        if self.every_n_steps:
            for s in self.sigma_rels:  # fail at start-up, not at the first step
                PowerEMA(s, [])

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.enabled:
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank calls it
            self._dir = self.dirpath or os.path.join(log_dir or trainer.default_root_dir, "posthoc_ema")

    def _ensure_profiles(self, pl_module: L.LightningModule) -> list[PowerEMA]:
        if self.profiles is None:
            params = [p for p in pl_module.unet.parameters()]
            self.profiles = [PowerEMA(s, params) for s in self.sigma_rels]
            if self._pending is not None:
                saved = self._pending["profiles"]
                if len(saved) != len(self.profiles) or any(len(e) != len(params) for e in saved):
                    raise ValueError("the checkpoint's post-hoc EMA profiles do not fit this model / sigma_rels")
                for prof, ema in zip(self.profiles, saved):
                    for dst, src in zip(prof.ema, ema):
                        dst.copy_(src)
                self.step = int(self._pending["step"])
                self._pending = None
        return self.profiles

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.profiles is None:
            if self._pending is None and trainer.global_step > 0:
                rank_zero_warn(f"post-hoc EMA starts at step {trainer.global_step} of a resumed run without profiles: "
                               "they treat the earlier steps as the current weights")
                self.step = trainer.global_step
            self._ensure_profiles(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.enabled:
            return
        profiles = self._ensure_profiles(pl_module)  # restores a resumed run's profiles and step
        step = trainer.global_step
        if step <= self.step:  # gradient accumulation: no optimiser step this batch
            return
        params = [p for p in pl_module.unet.parameters()]
        for prof in profiles:
            prof.update(params, step)
        self.step = step
        if step % self.every_n_steps == 0:
            self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.at_train_end and self.step > 0 and self._saved_step != self.step:
            self.snapshot(trainer, pl_module)

    def snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 writes every profile's weights at the current step."""
        self._saved_step = self.step
        if not trainer.is_global_zero:
            return
        names = [n for n, _ in pl_module.unet.named_parameters()]
        for prof in self._ensure_profiles(pl_module):
            save_snapshot(self._dir, dict(zip(names, prof.ema)), self.step, prof.sigma_rel, prof.gamma)
        if self.step == self.every_n_steps:
            rank_zero_info(f"post-hoc EMA snapshots (sigma_rel {self.sigma_rels}) -> {self._dir}")

    def state_dict(self) -> dict:
        if self.profiles is None:
            return {} if self._pending is None else dict(self._pending)
        return {"step": self.step, "sigma_rels": self.sigma_rels, "profiles": [list(p.ema) for p in self.profiles]}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint tracked post-hoc EMA profiles {state_dict['sigma_rels']}, this run "
                             f"asks for {self.sigma_rels}: keep posthoc_ema.sigma_rels when resuming")
        self._pending, self.profiles = dict(state_dict), None
