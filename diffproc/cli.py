"""``DiffprocCLI``: LightningCLI with diffproc's defaults.

* ``fit | validate | test | predict`` with ``--config configs/<method>_<dataset>.yaml``;
* ``model`` and ``data`` are chosen by class path (``diffproc.methods.ddpm.DDPM``, ...);
* ``data.image_size`` and ``data.channels`` are linked into the model (said once);
* TensorBoard logger under ``runs/<name>/version_N`` with the resolved ``config.yaml`` saved there;
* ``ModelCheckpoint(save_last=True)`` (also saved when fit ends) (``--checkpoint.*``), sample grids (``--sample_grid.*``);
* GDDM / LDDM diagnostics (``--gddm_diagnostics.*``; a no-op for the other methods);
* post-hoc EMA profiles and snapshots (``--posthoc_ema.every_n_steps N``; off by default);
* ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the run name and keeps logging there.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffproc.callbacks.checkpoint import Checkpoint
from diffproc.callbacks.fault import (ImageThroughputMonitor, NonFiniteGuard, cancel_stop_deadline,
                                     install_stop_deadline)
from diffproc.callbacks.gddm_diagnostics import GDDMDiagnostics
from diffproc.callbacks.metrics import FIDCallback, TestMetricsCallback
from diffproc.callbacks.posthoc_ema import PostHocEMA
from diffproc.callbacks.sample_grid import SampleGrid
from diffproc.data.base import CorruptImageError, DatasetNotFoundError, ImageDataModule
from diffproc.methods.base import ConfigError, DiffusionModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "diffproc", "default_hp_metric": False},
    },
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
    # diffusion training is counted in steps: validate every N steps, across epoch boundaries
    "val_check_interval": 1000,
    "check_val_every_n_epoch": None,
    # atomic, fsynced checkpoint writes; weights_only=True loads (diffproc/callbacks/fault.py)
    "plugins": [{"class_path": "diffproc.callbacks.fault.AtomicCheckpointIO"}],
}

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


class DiffprocCLI(LightningCLI):
    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            DiffusionModule,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 1000,
                             # a resumed run (even with other checkpoint options) keeps writing last.ckpt
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(SampleGrid, "sample_grid")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ImageThroughputMonitor, "throughput")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite_guard")
        parser.add_lightning_class_args(TestMetricsCallback, "metrics")  # cli.py test: FID & co (docs/metrics.md)
        parser.add_lightning_class_args(FIDCallback, "fid")  # off unless --fid.every_n_train_steps/epochs
        parser.add_lightning_class_args(GDDMDiagnostics, "gddm_diagnostics")  # acts on GDDM models only
        parser.add_lightning_class_args(PostHocEMA, "posthoc_ema")  # EDM2 post-hoc EMA snapshots; off by default
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.channels", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would overwrite the config with the checkpoint's hyperparameters; here the
        config and command line stay authoritative (``--model.init_args.num_steps 10`` must win
        for an NFE sweep) and ``ckpt_path`` restores weights and training state only."""

    # --- checkpoint path: one clear error, and "last" = newest run of this name -----------------
    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if not ckpt:
            return
        if ckpt == "last" and self.subcommand == "fit":
            found, version = self._find_last(cfg)
            if found is None:
                rank_zero_warn(f"--ckpt_path last: no last.ckpt under {self._run_root(cfg)}; starting a new run.")
                cfg["ckpt_path"] = None
            else:
                rank_zero_info(f"Resuming from {found}")
                cfg["ckpt_path"] = found
                self._set_logger_version(cfg, version)
            return
        if ckpt not in _SPECIAL_CKPT and "://" not in str(ckpt) and not os.path.isfile(ckpt):
            raise ConfigError(
                f"checkpoint not found: {ckpt}. Pass an existing .ckpt file (runs are saved as "
                f"{self._run_root(cfg)}/version_N/checkpoints/last.ckpt), or use `--ckpt_path last` with "
                "`fit` to resume the newest run of this config.")

    @staticmethod
    def _logger_cfg(cfg) -> Any:
        logger = cfg["trainer"].get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else None
        return logger if logger not in (None, True, False) else None

    def _run_root(self, cfg) -> str:
        logger = self._logger_cfg(cfg)
        if logger is not None and "init_args" in logger:
            args = logger["init_args"]
            return os.path.join(str(args.get("save_dir") or "."), str(args.get("name") or ""))
        return os.path.join(str(cfg["trainer"].get("default_root_dir") or "."), "lightning_logs")

    def _find_last(self, cfg) -> tuple[str | None, str | None]:
        dirpath = cfg.get("checkpoint", {}).get("dirpath") if cfg.get("checkpoint") else None
        pattern = (os.path.join(dirpath, "last*.ckpt") if dirpath
                   else os.path.join(self._run_root(cfg), "*", "checkpoints", "last*.ckpt"))
        files = [f for f in glob.glob(pattern) if os.path.isfile(f)]
        if not files:
            return None, None
        newest = max(files, key=os.path.getmtime)
        version = os.path.basename(os.path.dirname(os.path.dirname(newest))) if not dirpath else None
        return newest, version

    def _set_logger_version(self, cfg, version: str | None) -> None:
        logger = self._logger_cfg(cfg)
        if version and logger is not None and "init_args" in logger:
            logger["init_args"]["version"] = version


#: errors that are the user's to fix (config, missing or corrupt data): ``error: <message>``, exit code 2
USER_ERRORS = (ConfigError, DatasetNotFoundError, CorruptImageError)


def user_error_message(err: BaseException) -> str:
    """The message of a user error without what wrappers added: a DataLoader worker re-raises
    ``Caught X in DataLoader worker process N. Original Traceback ...``; keep the original message."""
    msg = str(err.args[0]) if err.args else str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in msg and marker in msg:
        msg = msg.rsplit(marker, 1)[1]
    return msg.strip()


def main(args: Any = None) -> None:
    """Console entry point; configuration mistakes and missing/corrupt data end with one ``error:``
    block and exit code 2, not a traceback; a SIGTERM ends every phase with exit code 143."""
    install_stop_deadline()  # SIGTERM ends every phase, not only Lightning's loops
    try:
        _main(args)
    finally:
        cancel_stop_deadline()


def _main(args: Any) -> None:
    try:
        DiffprocCLI(args=args)
    except SIGTERMException:  # Lightning's SystemExit subclass carries no exit code: 143 = 128 + SIGTERM
        print("error: stopped by SIGTERM (the last consistent state of a fit is in last.ckpt)", file=sys.stderr)
        sys.exit(143)
    except FloatingPointError as err:  # NaN/inf loss or weights (methods/base.py, callbacks/fault.py)
        from lightning.pytorch.utilities.rank_zero import rank_zero_only
        if rank_zero_only.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # jsonargparse wraps errors raised while instantiating classes
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, USER_ERRORS):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        from lightning.pytorch.utilities.rank_zero import rank_zero_only
        if rank_zero_only.rank == 0:
            print(f"error: {user_error_message(cause)}", file=sys.stderr)
        sys.exit(2)
