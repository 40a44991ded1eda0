"""Atomic, durable checkpoint writes: :class:`AtomicCheckpointIO`, a ``CheckpointIO`` plugin (the CLI installs it
by default) that writes every checkpoint (``last.ckpt``, step checkpoints, SLURM ``hpc_ckpt_N.ckpt``) to a
temporary file in the *same directory*, fsyncs it and ``os.replace``-s it over the target. A kill (``kill -9``,
pre-emption, node failure) during a save leaves the previous file intact. Lightning's own ``_atomic_save`` stages
the file in ``$TMPDIR`` and ``shutil.move``-s it, which degrades to a non-atomic copy when ``$TMPDIR`` is on
another filesystem (node-local ``/tmp`` vs. a shared cluster filesystem) and never fsyncs. Loading defaults to
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffproc.callbacks import lightning_api

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
                    "--trainer.plugins+=diffproc.callbacks.atomic_io.AtomicCheckpointIO "
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
