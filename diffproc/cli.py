"""``DiffprocCLI``: LightningCLI with diffproc's defaults.

* ``fit | validate | test | predict`` with ``--config configs/<method>_<dataset>.yaml``;
* ``model`` and ``data`` are chosen by class path (``diffproc.methods.base.DiffusionModule`` with its
  ``process`` by class path, ``diffproc.methods.gddm.GDDM``, ...);
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
import zipfile
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from diffproc.callbacks.checkpoint import Checkpoint
from diffproc.callbacks.gddm_diagnostics import GDDMDiagnostics
from diffproc.callbacks.metrics import FIDCallback, TestMetricsCallback
from diffproc.callbacks.nonfinite import NonFiniteGuard
from diffproc.callbacks.posthoc_ema import PostHocEMA
from diffproc.callbacks.sample_grid import SampleGrid
from diffproc.callbacks.stop_deadline import cancel_stop_deadline, install_stop_deadline
from diffproc.callbacks.throughput import ImageThroughputMonitor
from diffproc.data.base import CorruptImageError, DatasetNotFoundError, ImageDataModule
from diffproc.errors import ConfigError
from diffproc.methods.base import DiffusionModule

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
    # atomic, fsynced checkpoint writes; weights_only=True loads (diffproc/callbacks/atomic_io.py)
    "plugins": [{"class_path": "diffproc.callbacks.atomic_io.AtomicCheckpointIO"}],
}

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


class ShortUsageParser(LightningArgumentParser):
    """On a parsing error, one usage line instead of argparse's listing of all ~250 options (``--help`` still
    prints them): the ``error:`` line is then what the user sees."""

    def print_usage(self, file: Any = None) -> None:
        (file or sys.stderr).write(f"usage: {self.prog.replace(' [options]', '')} [--config FILE.yaml] "
                                   f"[--<section>.<key> VALUE ...]\n")

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        for path in _config_files(sys.argv[1:] if args is None else args):
            check_yaml(path)
        return super().parse_args(args, *rest, **kwargs)


def _config_files(args: Any) -> list[str]:
    """The files given to ``-c`` / ``--config`` on a command line (list form only)."""
    if not isinstance(args, (list, tuple)):
        return []
    out = []
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            out.append(str(args[i + 1]))
        elif isinstance(a, str) and a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def check_yaml(path: str) -> None:
    """A config file that exists but is not valid YAML: an error naming the file and the line (jsonargparse's
    own message names neither)."""
    if not os.path.isfile(path):
        return  # jsonargparse says it does not exist
    try:
        with open(path) as f:
            yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None


class DiffprocCLI(LightningCLI):
    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            DiffusionModule,
            ImageDataModule,
            parser_class=ShortUsageParser,
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
        config and command line stay authoritative (``--model.init_args.sampling.num_steps 10`` must win
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

    # --- every value a constructor refuses, and every unusable checkpoint: one `error:` block ---------
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except USER_ERRORS:
            raise
        except (ValueError, TypeError, MisconfigurationException) as err:
            # a constructor (model, process, data, trainer, callback) refused a value: the user's to fix
            raise ConfigError(f"invalid configuration: {err}") from err
        if not self.trainer.loggers:  # --trainer.logger false: the LR monitor has nowhere to log (Lightning raises)
            self.trainer.callbacks[:] = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        if self.subcommand is not None:
            ckpt = self.config[self.subcommand].get("ckpt_path")
            if ckpt and ckpt not in _SPECIAL_CKPT and "://" not in str(ckpt):
                check_checkpoint(str(ckpt), self.model)

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


def _describe(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _differing_hparams(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: <checkpoint> -> <this config>`` for every hyper-parameter that differs (nested dicts flattened)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if key.startswith("_instantiator"):
            continue
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_hparams(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{key}: {_describe(a)} in the checkpoint, {_describe(b)} here")
    return out


def check_checkpoint(path: str, model: DiffusionModule) -> None:
    """Open ``path`` (memory-mapped: no copy of the weights) and refuse it, with :class:`ConfigError`, when it
    cannot restore ``model``: truncated, not a PyTorch / Lightning checkpoint, written by another method, or
    by a config whose network differs (the differing keys and hyper-parameters are named)."""
    size = os.path.getsize(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - every way a file is not a checkpoint ends here
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
            what = "is truncated or damaged (a zip archive without its central directory)"
        elif magic == b"PK\x03\x04":
            what = f"is a damaged or foreign PyTorch file ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        else:
            what = "is not a PyTorch checkpoint (no zip archive)"
        raise ConfigError(f"checkpoint {path} ({size} bytes) {what}. Pass a last.ckpt / step=N.ckpt written by "
                          f"`cli.py fit`; an interrupted copy can be fetched again.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict'); a diffusers export "
                          f"folder goes to --model.init_args.init_from instead")
    saved = ckpt.get("hyper_parameters") or {}
    process = saved["process"].get("class_path") if isinstance(saved.get("process"), dict) else None
    if saved and process is None:
        raise ConfigError(f"checkpoint {path} has no process in its hyperparameters: a diffproc 0.1 checkpoint? Convert "
                          f"it with python -m diffproc.convert {path} NEW.ckpt (and its config the same way)")
    here = f"{type(model).__module__}.{type(model).__qualname__}"
    if saved.get("_class_path") and saved["_class_path"] != here:
        raise ConfigError(f"checkpoint {path} was written by {saved['_class_path']}, this config builds {here}: "
                          f"use the config the run was trained with (runs/<name>/version_N/config.yaml)")
    here_process = model.process.config["class_path"]
    if process is not None and process != here_process:
        raise ConfigError(f"checkpoint {path} was written with the process {process}, this config builds "
                          f"{here_process}: use the config the run was trained with (runs/<name>/version_N/config.yaml)")
    state, mine = ckpt["state_dict"], model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
              for k, v in mine.items() if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        diff = _differing_hparams(saved, dict(model.hparams))
        parts = ([f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"] if unexpected else []) + (
            [f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})"] if shapes else [])
        raise ConfigError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}. "
                          + (f"Its config differs: {'; '.join(diff[:6])}. " if diff else "")
                          + "Use the config the run was trained with (runs/<name>/version_N/config.yaml)")


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
    except FloatingPointError as err:  # NaN/inf loss or weights (methods/base.py, callbacks/nonfinite.py)
        if rank_zero_only.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # jsonargparse wraps errors raised while instantiating classes
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, USER_ERRORS):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        if rank_zero_only.rank == 0:
            print(f"error: {user_error_message(cause)}", file=sys.stderr)
        sys.exit(2)
