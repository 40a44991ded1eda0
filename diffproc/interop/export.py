"""Export a diffproc checkpoint as a folder that diffusers loads offline.

    python -m diffproc.interop.export runs/quickstart/version_0/checkpoints/last.ckpt export/quickstart [--raw]

The folder holds

* ``unet/``: the EMA UNet (``save_pretrained``, safetensors); with ``--raw`` also ``unet_raw/`` (the raw weights);
* DDPM/DDIM: ``scheduler/`` with a ``DDPMScheduler`` config equal to the process (schedule, T, variance type,
  prediction type, clipping) and ``model_index.json`` for ``DDPMPipeline``; ``DDIMPipeline.from_pretrained`` loads
  the same folder. diffusers calls the UNet with the 0-based timestep ``t - 1`` for diffproc's ``t``: that shift is
  folded into the exported time embedding (:func:`~diffproc.nets.unet.shift_time_input`), so both pipelines
  sample what diffproc samples from the same noise (DDIM grids agree when ``num_inference_steps`` divides T);
* every other process: :class:`~diffproc.interop.pipelines.DiffprocPipeline` (diffproc's process and reverse steps)
  with a :class:`~diffproc.interop.pipelines.DiffprocScheduler` config holding the process's own config (class path
  and arguments), plus GDDM's decoding options and Poisson network when it has one;
* ``README.md``: a model card with the method, its config, the training steps and ``metrics.json`` when found
  (next to the run's checkpoints, or ``--metrics``).

Room ``interop`` (models in and out of diffproc): imports ``methods``, ``nets``, ``samplers`` and ``processes``;
nothing in the package imports it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffproc.errors import ConfigError
from diffproc.interop.pipelines import EXTRA_COMPONENTS, DiffprocPipeline, DiffprocScheduler, state_to_config
from diffproc.methods.base import DiffusionModule
from diffproc.methods.gddm import GDDM
from diffproc.nets.unet import diffusers_timestep_shift, shift_time_input
from diffproc.processes.base import build_process

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# --- checkpoint -> module ---------------------------------------------------------------------------
def method_class(path: str) -> type[DiffusionModule]:
    """The ``DiffusionModule`` (sub)class named by ``path`` (``package.module.Class``). A module outside ``diffproc``
    is imported only when the caller has imported it already (a checkpoint never makes us run new code)."""
    module_name, _, name = str(path).rpartition(".")
    if module_name.split(".")[0] == "diffproc":
        importlib.import_module(module_name)
    cls = getattr(sys.modules.get(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionModule)):
        raise ConfigError(f"method {path!r} is not an importable diffproc DiffusionModule class (a 0.1 checkpoint "
                          "converts with python -m diffproc.convert; a class outside diffproc must be imported first)")
    return cls


def read_checkpoint(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir_of(ckpt_path: str | os.PathLike) -> Path:
    """``runs/<name>/version_N`` for ``runs/<name>/version_N/checkpoints/<file>.ckpt``."""
    return Path(ckpt_path).resolve().parent.parent


def method_path_of(ckpt: dict, ckpt_path: str | os.PathLike, method: Optional[str] = None) -> str:
    """The method's class path: ``method`` if given, else the checkpoint's (``cli.py`` records it), else the
    ``config.yaml`` of the run the checkpoint belongs to."""
    if method:
        return method
    path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if path:
        return str(path)
    config = run_dir_of(ckpt_path) / "config.yaml"
    if config.is_file():
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if isinstance(model, dict) and model.get("class_path"):
            return str(model["class_path"])
    raise ConfigError(f"{ckpt_path}: cannot tell which method it holds (no class path in the checkpoint, no "
                      f"{config}); pass --method, e.g. --method diffproc.methods.base.DiffusionModule")


def load_module(ckpt_path: str | os.PathLike, method: Optional[str] = None) -> tuple[DiffusionModule, dict]:
    """The method of a checkpoint, built from its hyperparameters, with its weights (EMA included) loaded."""
    ckpt = read_checkpoint(ckpt_path)
    cls = method_class(method_path_of(ckpt, ckpt_path, method))
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    if not isinstance(hparams.get("process"), dict):
        raise ConfigError(f"{ckpt_path} has no process config in its hyperparameters: a 0.1 checkpoint? Convert it "
                          "first: python -m diffproc.convert OLD.ckpt NEW.ckpt")
    module = cls(process=build_process(hparams.pop("process")), **hparams)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt_path} does not fit {cls.__name__} built from its own hyperparameters "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval(), ckpt


# --- module -> diffusers ----------------------------------------------------------------------------
def ddpm_scheduler(module: DiffusionModule) -> DDPMScheduler:
    """A ``DDPMScheduler`` equal to a DDPM process (named schedule if diffusers computes the same alpha-bar to
    1e-6, else ``trained_betas``). Pair it with a UNet shifted by :func:`diffusers_timestep_shift`."""
    p = module.process
    hp = p.config["init_args"]
    common = dict(num_train_timesteps=p.num_timesteps, variance_type=VARIANCE_TYPES[p.variance],
                  clip_sample=bool(p.clip_x0), clip_sample_range=1.0, prediction_type=PREDICTION_TYPES[module.precond.name],
                  timestep_spacing="leading", steps_offset=0)
    schedule = BETA_SCHEDULES.get(str(hp.get("schedule", "")))
    if schedule is not None:
        sched = DDPMScheduler(beta_schedule=schedule, beta_start=float(hp.get("beta_start", 1e-4)),
                              beta_end=float(hp.get("beta_end", 0.02)), **common)
        if torch.allclose(sched.alphas_cumprod.double(), p.alphas_bar[1:], rtol=0, atol=1e-6):
            return sched
    return DDPMScheduler(trained_betas=p.betas.tolist(), **common)


def _export_unet(net: torch.nn.Module, shift: int) -> UNet2DModel:
    return shift_time_input(copy.deepcopy(net).float().eval().requires_grad_(False), shift)


def build_pipeline(module: DiffusionModule, method: str):
    """``DDPMPipeline`` for DDPM/DDIM, :class:`DiffprocPipeline` for every other method (EMA UNet)."""
    shift = diffusers_timestep_shift(module.process)
    unet = _export_unet(module.sampling_net, shift)
    if shift:
        return DDPMPipeline(unet=unet, scheduler=ddpm_scheduler(module))
    extra = {name: getattr(module, name, None) for name in EXTRA_COMPONENTS}
    owned = ("unet.", "ema_unet.") + tuple(f"{n}." for n, net in extra.items() if net is not None)
    for name, child in module.named_children():
        if name not in ("unet", "ema_unet", *EXTRA_COMPONENTS) and any(True for _ in child.parameters()):
            raise ConfigError(f"{method} has a network {name!r} that the export does not know how to carry")
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(owned)}
    gddm = None
    if isinstance(module, GDDM):
        gddm = {"reconstruction": module.reconstruction, "poisson_residual": bool(module.hparams.poisson_residual)}
    scheduler = DiffprocScheduler(process=module.process.config, image_size=module.image_size,
                                  channels=module.channels, sampling=module.sampling.to_dict(), gddm=gddm,
                                  module_state=state_to_config(state), precond=module.precond.config)
    nets = {n: _export_unet(net, 0) for n, net in extra.items() if net is not None}
    return DiffprocPipeline(unet=unet, scheduler=scheduler, **nets)


def export_module(module: DiffusionModule, out: str | os.PathLike, method: Optional[str] = None, *,
                  raw: bool = False, info: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Write ``module`` as a diffusers folder (see the module docstring); ``info`` feeds the model card
    (``global_step``, ``epoch``, ``checkpoint``, ``metrics``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose another folder")
        shutil.rmtree(out)
    method = method or f"{type(module).__module__}.{type(module).__qualname__}"
    pipe = build_pipeline(module, method)
    pipe.save_pretrained(out, safe_serialization=True)
    has_raw = raw and module.ema_unet is not None
    if has_raw:
        _export_unet(module.unet, diffusers_timestep_shift(module.process)).save_pretrained(
            out / "unet_raw", safe_serialization=True)
    (out / "README.md").write_text(model_card(module, method, pipe, has_raw, info or {}))
    return out


def export_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, raw: bool = False,
                      method: Optional[str] = None, metrics: Optional[str] = None, overwrite: bool = False) -> Path:
    """``python -m diffproc.interop.export`` as a function."""
    module, ckpt = load_module(ckpt_path, method)
    metrics_path = Path(metrics) if metrics else run_dir_of(ckpt_path) / "metrics.json"
    if metrics and not metrics_path.is_file():
        raise ConfigError(f"--metrics {metrics}: no such file")
    info = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "checkpoint": str(ckpt_path),
            "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
            "metrics_file": str(metrics_path)}
    return export_module(module, out, method_path_of(ckpt, ckpt_path, method), raw=raw, info=info,
                         overwrite=overwrite)


# --- model card -------------------------------------------------------------------------------------
def _usage(pipe, out_name: str) -> str:
    if isinstance(pipe, DDPMPipeline):
        return (
            "```python\n"
            "import torch\n"
            "from diffusers import DDIMPipeline, DDPMPipeline\n\n"
            f"pipe = DDPMPipeline.from_pretrained(\"{out_name}\")   # diffproc's solver: ancestral\n"
            "images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0),\n"
            f"             num_inference_steps={pipe.scheduler.config.num_train_timesteps}).images\n"
            f"pipe = DDIMPipeline.from_pretrained(\"{out_name}\")   # diffproc's solver: ddim\n"
            "images = pipe(batch_size=16, num_inference_steps=50, eta=0.0).images\n"
            "from diffusers import DPMSolverMultistepScheduler   # diffproc's solver: dpmpp_2m\n"
            "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_lu_lambdas=True)\n"
            "images = pipe(batch_size=16, num_inference_steps=20).images\n"
            "```\n\n"
            "`DPMSolverMultistepScheduler` is diffusers' scheduler for diffproc's DPM-Solver++ solvers: "
            "`dpmpp_2m` (`solver_order=2`, the default), `dpmpp_2m_sde` (`algorithm_type=\"sde-dpmsolver++\"`); "
            "`use_lu_lambdas=True` is a log-SNR-uniform grid like diffproc's `time_grid: logsnr`. The grids differ in "
            "detail, so its images are close to diffproc's, not equal; diffproc's `dpmpp_3m` weights its second "
            "difference twice as much as diffusers' `solver_order=3` (docs/core.md). "
            "Both reproduce diffproc's sampler from the same noise when `num_inference_steps` divides T (diffproc's "
            "`uniform` grid is then diffusers' `leading` one). diffusers calls the UNet with the 0-based "
            "timestep t-1 for diffproc's t; that shift is folded into `unet/`'s time embedding, so the UNet follows "
            "diffusers' convention and works with its other schedulers too. Per-sample seeds as `cli.py predict`: "
            "`generator=[torch.Generator().manual_seed(diffproc.processes.rng.sample_seed(seed, i)) for i in range(n)]`.")
    return (
        "```python\n"
        "from diffproc.interop.pipelines import DiffprocPipeline   # needs `pip install diffproc`\n\n"
        f"pipe = DiffprocPipeline.from_pretrained(\"{out_name}\")\n"
        "images = pipe(batch_size=16, seed=0).images       # = cli.py predict's PNGs 0..15 (same seed)\n"
        "```\n\n"
        "The pipeline runs diffproc's own process (reverse steps and decoding), rebuilt from `scheduler/` "
        f"(process `{pipe.scheduler.config.process['class_path']}`). Options: diffproc's sampling spec "
        "(`num_inference_steps` = its `num_steps`, `solver`, `time_grid`, `ddim_eta`, `seed`; unset ones are the model's, "
        "`scheduler/scheduler_config.json` `sampling`), `generator` (one or one per sample), `indices`, `output_type` "
        "(`pil`, `np`, `pt`).")


def model_card(module: DiffusionModule, method: str, pipe, has_raw: bool, info: dict) -> str:
    hp = json.loads(json.dumps({k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}, default=list))
    name = type(module.process).__name__
    weights = (f"EMA (`ema_decay` {hp.get('ema_decay')})" if module.ema_unet is not None else "raw (no EMA)")
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
        f"tags: [diffproc, {name.lower()}, unconditional-image-generation]", "---", "",
        f"# {name}, exported from diffproc", "",
        f"- method: `{method}` (process `{type(module.process).__name__}`)",
        f"- pipeline: `{type(pipe).__name__}`; weights in `unet/`: {weights}"
        + ("; raw weights in `unet_raw/`" if has_raw else ""),
        f"- image size {module.image_size}x{module.image_size}, {module.channels} channels; "
        f"default sampling: solver `{module.sampling.solver}`, num_steps {module.sampling.num_steps or 'full'}, "
        f"time_grid `{module.sampling.time_grid}`, ddim_eta {module.sampling.ddim_eta}, seed {module.sampling.seed}",
        f"- training steps: {info.get('global_step', 'unknown')} (epoch {info.get('epoch', 'unknown')})",
    ]
    if info.get("checkpoint"):
        lines.append(f"- checkpoint: `{info['checkpoint']}`")
    if isinstance(pipe, DDPMPipeline):
        p = module.process
        notes = []
        if module.sampling.ddim_eta:
            notes.append(f"DDIM eta = {module.sampling.ddim_eta} (diffproc's sampling.ddim_eta): pass "
                         f"`eta={module.sampling.ddim_eta}` to DDIMPipeline")
        if p.spacing != "uniform":
            notes.append(f"spacing `{p.spacing}` has no diffusers equivalent: DDIMPipeline uses the uniform grid")
        lines += [f"- note: {n}" for n in notes]
    lines += ["", "## Load (offline)", "", _usage(pipe, "path/to/this/folder"), "", "## Metrics", ""]
    metrics = info.get("metrics")
    if metrics:
        values = metrics.get("metrics", metrics)
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" if isinstance(v, (int, float))
                                                         else f"| {k} | {v} |" for k, v in values.items()]
        if metrics.get("protocol"):
            lines += ["", "Protocol:", "", "```json", json.dumps(metrics["protocol"], indent=2), "```"]
    else:
        lines.append(f"No metrics.json was found ({info.get('metrics_file', 'not searched')}): run `cli.py test` on "
                     "the checkpoint and export again with `--metrics <that test run's dir>/metrics.json`.")
    lines += ["", "## Config (the method's arguments)", "", "```yaml",
              yaml.safe_dump({"class_path": method, "init_args": hp}, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffproc.interop.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a diffproc checkpoint (e.g. runs/<name>/version_N/checkpoints/last.ckpt)")
    ap.add_argument("out", help="output folder (diffusers format)")
    ap.add_argument("--raw", action="store_true", help="also write the raw (non-EMA) UNet to unet_raw/")
    ap.add_argument("--method", help="module class path, when the checkpoint does not name it "
                                     "(e.g. diffproc.methods.gddm.GDDM)")
    ap.add_argument("--metrics", help="metrics.json for the model card (default: <run dir>/metrics.json if present)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, raw=args.raw, method=args.method, metrics=args.metrics,
                                overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()


__all__ = ["export_checkpoint", "export_module", "load_module", "method_class", "ddpm_scheduler", "build_pipeline", "main"]
