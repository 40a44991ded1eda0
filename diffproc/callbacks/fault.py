"""Surviving long runs: atomic checkpoints, a non-finite guard, throughput and GPU-memory logging.

* :class:`AtomicCheckpointIO` — a ``CheckpointIO`` plugin (the CLI installs it by default) that writes
  every checkpoint (``last.ckpt``, step checkpoints, SLURM ``hpc_ckpt_N.ckpt``) to a temporary file in
  the *same directory*, fsyncs it and ``os.replace``-s it over the target. A kill (``kill -9``,
  pre-emption, node failure) during a save leaves the previous file intact. Lightning's own
  ``_atomic_save`` stages the file in ``$TMPDIR`` and ``shutil.move``-s it, which degrades to a
  non-atomic copy when ``$TMPDIR`` is on another filesystem (node-local ``/tmp`` vs. a shared
  cluster filesystem) and never fsyncs. Loading defaults to ``torch.load(weights_only=True)``.
* :class:`NonFiniteGuard` — refuses to save a checkpoint whose weights (raw or EMA) contain NaN/inf,
  so the last good checkpoint is never overwritten by a diverged model. The loss itself is checked
  in ``DiffusionModule.training_step``; both raise ``FloatingPointError``, which ``cli.py`` prints as
  one ``error:`` line.
* :class:`ImageThroughputMonitor` — Lightning's ``ThroughputMonitor`` counting images per batch
  (``train/samples_per_sec`` = images/s over all ranks, ``train/device/samples_per_sec`` per rank),
  plus GPU memory (``gpu/memory_allocated_gb``, ``gpu/max_memory_allocated_gb``,
  ``gpu/memory_reserved_gb``) when training on CUDA.
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from diffproc.callbacks import lightning_api
from diffproc.methods.base import images_of

_TMP_PREFIX = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable; loads use ``weights_only=True``.

    Args:
        weights_only: default of :meth:`load_checkpoint` when the caller does not say
            (``True``: only tensors and primitive containers are unpickled, which is all a diffproc
            checkpoint holds; set ``False`` only for a trusted checkpoint that stores other objects).
    """

    def __init__(self, weights_only: bool = True) -> None:
        super().__init__()
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = str(path)
        if not lightning_api.is_local_path(path):  # object stores: Lightning's own (transactional) upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        weights_only = self.weights_only if weights_only is None else weights_only
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # the unpickler's message is long; say what to do first
            if weights_only and type(err).__name__ == "UnpicklingError":
                raise RuntimeError(
                    f"{path} holds objects other than tensors and plain containers, so it cannot be loaded "
                    "with weights_only=True. If you trust this file, pass "
                    "--trainer.plugins+=diffproc.callbacks.fault.AtomicCheckpointIO "
                    "--trainer.plugins.weights_only=false (or load it yourself with torch.load).") from err
            raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Stale temp files of earlier killed saves of the same target are removed first.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    for stale in glob.glob(os.path.join(directory, f"{_TMP_PREFIX}{glob.escape(base)}.*")):
        try:
            os.remove(stale)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{base}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


def num_images(batch: Any) -> int:
    """Images in a batch (tensor, ``(images, labels)`` or dict with ``image``)."""
    return int(images_of(batch).shape[0])


class ImageThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` with images as samples, and GPU memory when on CUDA.

    Throughput is logged every ``trainer.log_every_n_steps`` by rank 0: ``train/samples_per_sec``
    (images/s of all ranks together), ``train/device/samples_per_sec``, ``train/batches_per_sec``,
    averaged over the last ``window_size`` batches.

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


class StopDeadlineExceeded(SIGTERMException):
    """Raised in the main thread when a SIGTERM was not honoured at a safe point within the grace period
    (a phase without a stop check, e.g. reference statistics): ends the run; no checkpoint is written
    from an arbitrary point of a training step."""


def install_stop_deadline(grace_seconds: Optional[float] = None) -> None:
    """Make SIGTERM end the program in every phase. Lightning only reacts to SIGTERM at batch boundaries
    of its loops, and diffproc's samplers between network evaluations; any other long phase would run
    on. This adds a SIGTERM handler (Lightning composes it with its own) that arms a SIGALRM after
    ``grace_seconds`` (default ``$DIFFPROC_SIGTERM_GRACE`` or 10 s): if the program is still running
    then, :class:`StopDeadlineExceeded` is raised wherever the main thread is. POSIX only."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return
    grace = float(os.environ.get("DIFFPROC_SIGTERM_GRACE", 10.0) if grace_seconds is None else grace_seconds)

    def on_alarm(signum, frame) -> None:
        raise StopDeadlineExceeded()

    def on_term(signum, frame) -> None:
        if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # the first SIGTERM arms the deadline once
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(grace, 0.01))
        if callable(previous):
            previous(signum, frame)
        if signal.getsignal(signal.SIGTERM) is on_term:  # called directly: no Trainer runs to notice it
            raise SIGTERMException()

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, on_term)


def cancel_stop_deadline() -> None:
    """Disarm the SIGTERM deadline once the program is stopping anyway (an alarm during interpreter
    shutdown would kill the process with SIGALRM instead of its exit code)."""
    if hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
