"""Sample grids during training: TensorBoard image + PNG in the run directory."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchvision.utils import make_grid, save_image

from diffproc.samplers import SamplingSpec


def check_sampling(pl_module: L.LightningModule, spec: Optional[SamplingSpec], prefix: str) -> Optional[SamplingSpec]:
    """A callback's sampling override checked, over the model's default spec, against the model's process when the
    run is set up (not after training, when the callback first samples); ``prefix`` is the callback's CLI group.
    Returns the complete spec (``None`` for a model without one)."""
    check = getattr(pl_module, "check_sampling", None)
    return None if check is None else check(spec, f"--{prefix}.sampling")


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimiser steps (and at the end of fit) rank 0 samples ``num_images``
    with the EMA weights from a fixed seed, logs the grid to TensorBoard (``samples``) and writes
    ``<log_dir>/samples/step_XXXXXXX.png``. ``every_n_steps=0`` disables it. Images smaller than
    ``min_tile`` pixels are upscaled (nearest neighbour) in the grid so they stay legible.
    ``sampling`` (:class:`~diffproc.samplers.SamplingSpec`) overrides the model's spec field by field
    (``--sample_grid.sampling.num_steps 20``; unset fields inherit ``model.init_args.sampling``). Sample ``i`` of the
    grid draws its noise from ``(seed, i)``.

    Every grid is announced (images × steps × NFE, estimated seconds) and shows a progress bar. On the
    CPU a grid is sized to ``cpu_budget_seconds`` (estimated from one timed network evaluation): fewer
    images (down to 4), then fewer steps, with a message saying so — a paper-size UNet would otherwise
    sample a 64-image grid for many minutes at the end of a 1-step smoke test. ``cpu_budget_seconds: 0``
    keeps the full grid; ``every_n_steps: 0`` switches grids off.
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 16, sampling: Optional[SamplingSpec] = None,
                 at_train_end: bool = True, min_tile: int = 64, cpu_budget_seconds: float = 60.0,
                 progress: bool = True) -> None:
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.cpu_budget_seconds = float(cpu_budget_seconds)
        self.progress = progress
        self.sampling = SamplingSpec.of(sampling)
        self.at_train_end = at_train_end
        self.min_tile = min_tile
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.every_n_steps > 0:
            check_sampling(pl_module, self.sampling, "sample_grid")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps > 0 and self.at_train_end and trainer.global_step != self._last_step:
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[str]:
        step = self._last_step = trainer.global_step
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it, or rank 0 hangs
        if not trainer.is_global_zero:
            return None
        num, spec = self.size(pl_module)
        nfe = pl_module.planned_nfe(spec)
        rank_zero_info(f"sample grid at step {step}: {num} images, {nfe} network evaluations each "
                       f"({pl_module.sampling_spec(spec).solver})")
        t0 = time.perf_counter()
        x = pl_module.sample(num, spec, progress=self.progress, desc=f"sample grid (step {step})").images
        seconds = time.perf_counter() - t0
        x = x.float().cpu()
        if x.shape[-1] < self.min_tile:  # small images: nearest-neighbour upscale so the grid is legible
            x = torch.nn.functional.interpolate(x, scale_factor=math.ceil(self.min_tile / x.shape[-1]), mode="nearest")
        grid = make_grid((x + 1) / 2, nrow=max(1, int(math.ceil(math.sqrt(len(x))))), padding=1)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step)
                logger.experiment.add_scalar("samples/seconds_per_image", seconds / len(x), step)
        path = None
        if log_dir:
            os.makedirs(os.path.join(log_dir, "samples"), exist_ok=True)
            path = os.path.join(log_dir, "samples", f"step_{step:07d}.png")
            save_image(grid, path)
        return path

    def size(self, pl_module: L.LightningModule) -> tuple[int, SamplingSpec]:
        """(images, complete sampling spec) of the next grid: as configured, or shrunk to ``cpu_budget_seconds`` on
        the CPU (fewer images, then fewer steps; a solver that only runs the full chain, such as blur
        diffusion's ``official``, gives way to the process's first strided solver for the preview)."""
        num, spec = self.num_images, pl_module.sampling_spec(self.sampling, "--sample_grid.sampling")
        if pl_module.device.type != "cpu" or self.cpu_budget_seconds <= 0:
            return num, spec
        per_image = pl_module.seconds_per_evaluation(min(num, 4)) / min(num, 4)
        nfe = pl_module.planned_nfe(spec)
        estimate = per_image * num * nfe
        if estimate <= self.cpu_budget_seconds:
            return num, spec
        new_num = max(min(4, num), min(num, int(self.cpu_budget_seconds / (per_image * nfe))))
        new = spec
        if per_image * new_num * nfe > self.cpu_budget_seconds:  # 4 images are still too slow: fewer steps
            process = pl_module.process
            if spec.solver in process.full_chain_solvers:
                new = replace(new, solver=next(s for s in process.solvers if s not in process.full_chain_solvers))
            per_step = pl_module.planned_nfe(replace(new, num_steps=1))  # network evaluations of one step
            full = pl_module.planned_nfe(new) // per_step
            new = replace(new, num_steps=min(full, max(1, int(self.cpu_budget_seconds / (per_image * new_num * per_step)))))
        rank_zero_info(
            f"sample grid on the CPU: {num} images x {nfe} evaluations would take ~{estimate:.0f} s "
            f"(> cpu_budget_seconds={self.cpu_budget_seconds:g}); drawing {new_num} images"
            + (f" with {new.num_steps} steps" if new.num_steps != spec.num_steps else "")
            + (f" of {new.solver} ({spec.solver} runs only the full chain)" if new.solver != spec.solver else "")
            + ". Set --sample_grid.cpu_budget_seconds 0 for the full grid, or --sample_grid.every_n_steps 0 "
              "to switch grids off.")
        return new_num, new
