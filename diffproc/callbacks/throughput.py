""":class:`ImageThroughputMonitor`: Lightning's ``ThroughputMonitor`` counting images per batch
(``train/samples_per_sec`` = images/s over all ranks, ``train/device/samples_per_sec`` per rank), plus GPU memory
(``gpu/memory_allocated_gb``, ``gpu/max_memory_allocated_gb``, ``gpu/memory_reserved_gb``) when training on CUDA.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from diffproc.callbacks import lightning_api
from diffproc.methods.base import images_of

def num_images(batch: Any) -> int:
    """Images in a batch (tensor, ``(images, labels)`` or dict with ``image``)."""
    return int(images_of(batch).shape[0])


class ImageThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` with images as samples, and GPU memory when on CUDA.

    Throughput is logged every ``trainer.log_every_n_steps`` by rank 0: ``train/samples_per_sec``
    (images/s of all ranks together), ``train/device/samples_per_sec``, ``train/batches_per_sec``,
    averaged over the last ``window_size`` batches (rounded up to whole log intervals). Only the logging steps
    are timed, so on CUDA there is no host-device sync on the steps between them.

    Args:
        window_size: batches in the moving window of the rate.
        log_gpu_memory: also log ``gpu/*_gb`` (allocated, peak allocated since the last log, reserved).
    """

    def __init__(self, window_size: int = 50, log_gpu_memory: bool = True) -> None:
        super().__init__(batch_size_fn=num_images, window_size=window_size)
        self.log_gpu_memory = log_gpu_memory

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(pl_module, "flops_per_batch"):
            self._module_has_flops = False  # images/s only; no FLOP warning
        if RunningStage.TRAINING in self._throughputs:  # timed on logging steps only: window in those steps
            every = max(1, trainer.log_every_n_steps)
            self._throughputs[RunningStage.TRAINING] = Throughput(
                available_flops=self.available_flops, world_size=trainer.world_size,
                **{**self.kwargs, "window_size": -(-self.kwargs["window_size"] // every) + 1})

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        """Lightning's monitor takes the time after every training step, which on CUDA means a host-device sync
        per step; here a step that does not log only counts its images, and the rate is timed from one logging
        step to the next (averaged over the last ``window_size`` batches, rounded up to whole log intervals)."""
        stage = trainer.state.stage
        if stage == RunningStage.TRAINING and not lightning_api.should_update_logs(trainer):
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
            return
        super()._update(trainer, pl_module, batch, iter_num)

    #: per-process running totals of Lightning's monitor: they restart at 0 after every resume (the step
    #: axis already counts batches), so they are not logged — one continuous curve per run (issue 16)
    CUMULATIVE = ("time", "batches", "samples")

    def _compute(self, trainer: L.Trainer, iter_num: Optional[int] = None) -> None:
        stage = trainer.state.stage
        in_fit_validation = stage == RunningStage.VALIDATING and trainer.state.fn == TrainerFn.FITTING
        if stage is None or not (in_fit_validation or lightning_api.should_update_logs(trainer)):
            return
        metrics = self._throughputs[stage].compute()
        metrics = {f"{stage.value}/{k}": v for k, v in metrics.items() if k not in self.CUMULATIVE}
        device = trainer.strategy.root_device
        if self.log_gpu_memory and device.type == "cuda" and not in_fit_validation:
            gb = 1024.0 ** 3
            metrics.update({
                "gpu/memory_allocated_gb": torch.cuda.memory_allocated(device) / gb,
                "gpu/max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / gb,
                "gpu/memory_reserved_gb": torch.cuda.memory_reserved(device) / gb,
            })
            torch.cuda.reset_peak_memory_stats(device)
        lightning_api.log_metrics(trainer, metrics, step=iter_num)

    # validation inside fit: one point per validation run, at the training step (not at a per-process
    # count of validation batches, which starts again after every resume)
    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, lightning_api.evaluation_batches_ready(trainer))

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._compute(trainer, trainer.global_step)
        super().on_validation_end(trainer, *args)
