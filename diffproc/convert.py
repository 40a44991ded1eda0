"""One-off converter of diffproc 0.1 checkpoints and configs to 0.2.

    python -m diffproc.convert OLD.ckpt NEW.ckpt        # a checkpoint (weights, EMA, optimiser, loader state kept)
    python -m diffproc.convert OLD.yaml NEW.yaml        # a config (e.g. a run's saved config.yaml)
    python -m diffproc.convert OLD_EXPORT/ NEW_EXPORT/  # a folder exported to diffusers (weights copied as they are)

What changed in 0.2 (and what this rewrites):

* the process is injected: the method classes ``diffproc.methods.ddpm.DDPM``, ``diffproc.methods.blur.BlurDiffusion``,
  ``diffproc.methods.sie.SIE`` and ``diffproc.methods.epdm.EPDM`` are gone; their models are a
  ``diffproc.methods.base.DiffusionModule`` whose ``process`` is the former method's process, configured by class
  path with the process arguments moved under ``process.init_args``. ``diffproc.methods.gddm.GDDM`` keeps its own
  options and takes a ``GradientDomainProcess``; the four process defaults 0.1's GDDM set differently from the
  process (``prediction: x0``, ``loss_weighting: edm``, ``clip_image: true`` with ``dc_mode: aux``,
  ``network_view: image``) are written out, so a converted GDDM is the model it was;
* deprecated names and values are gone: ``sampler`` / ``sampling_steps`` -> ``solver`` / ``num_steps`` (module,
  ``sample_grid``, ``metrics``, ``fid``), blur's ``beta_schedule`` -> ``schedule``, SIE's ``spacing: ddim_uniform``
  / ``ddim_quad`` -> ``uniform`` / ``quad``, the strokes DataModule's ``sdedit_steps`` / ``sdedit_sampler`` ->
  ``sdedit_num_steps`` / ``sdedit_solver``, GDDM's ``diagnostics_every_n_val`` / ``diagnostics_num`` /
  ``diagnostics_steps`` / ``sparsity_delta`` -> the ``gddm_diagnostics`` section (dropped from a checkpoint);
* ``diffproc.callbacks.fault`` was split: ``diffproc.callbacks.fault.X`` -> ``atomic_io``, ``nonfinite``,
  ``throughput`` or ``stop_deadline``, whichever holds ``X`` now;
* the network's parameterisation left the processes for the preconditioning layer (``model.init_args.precond``,
  :mod:`diffproc.nets.precond`): a process's ``prediction`` becomes the head ``EpsHead`` / ``X0Head`` / ``VHead`` /
  ``SigmaEpsHead``; SIE's ``heads`` (and ``eps_min_cos``) ``DualHead`` or a single head; GDDM's image view
  (``network_view: image`` with ``prediction``, ``sigma_data``, ``loss_weighting: edm|snr``, ``time_sampling: modes``
  and the module's ``sigma_data_mode`` / ``sigma_data_images``) the head ``ModeEDM``, whose σ_data buffers
  ``sigma_data_spectrum`` / ``sigma_data_count`` / ``sigma_data_colour_basis`` become ``precond.spectrum`` /
  ``precond.count`` / ``precond.colour_basis``; GDDM's ``loss_weighting`` is the process's ``objective`` (``uniform``,
  ``edm``, ``snr`` -> ``head``; ``image`` -> ``image``) and its ``noise`` is ``noise_kind``.
* ``diffproc.pipelines`` moved to ``diffproc.interop.pipelines``: diffusers names the module of
  ``DiffprocScheduler`` in an exported folder's ``model_index.json`` and imports it to load the folder, so a folder
  exported before the move names the former module (and its model card the former import) until it is converted.
* one sampling spec (``diffproc.samplers.SamplingSpec``; also applied to configs and checkpoints of the 0.2 layout
  that had the options separately): the module's ``solver`` / ``num_steps`` / ``time_grid`` / ``seed`` ->
  ``sampling.<same>``; the process's ``eta`` (DDIM's stochasticity) -> the module's ``sampling.ddim_eta``; the
  ``solver`` / ``num_steps`` / ``seed`` of ``sample_grid``, ``metrics``, ``fid``, ``gddm_diagnostics`` ->
  ``<section>.sampling.<same>``; the strokes DataModule's SDEdit options ``strength`` / ``sdedit_num_steps`` /
  ``sdedit_solver`` / ``sdedit_seed`` -> the module's ``sampling.strength`` / ``num_steps`` / ``solver`` / ``seed``
  (they drove the predict run the config is for; ``sdedit_seed`` also seeded the k-means: ``kmeans_seed``), and its
  ``t0`` is refused (say it as ``strength = t0 / t_max``).

A checkpoint's tensors are not changed (GDDM's σ_data buffers only renamed): its hyperparameters (and the data
module's) are rewritten, so it loads and resumes bit for bit under 0.2. YAML comments are not kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

MODULE = "diffproc.methods.base.DiffusionModule"
GDDM = "diffproc.methods.gddm.GDDM"

#: 0.1 method class -> (0.2 module class, its process class, the 0.1 method's own arguments that go to the process)
_DDPM_ARGS = ("num_timesteps", "schedule", "beta_start", "beta_end", "prediction", "variance", "eta", "spacing",
              "clip_x0")
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "diffproc.methods.ddpm.DDPM": (MODULE, "diffproc.processes.ddpm.DDPMProcess", _DDPM_ARGS),
    "diffproc.methods.blur.BlurDiffusion": (MODULE, "diffproc.processes.blur.BlurProcess", _DDPM_ARGS + (
        "f_type", "sig", "sig_min", "sig_max", "basis", "kernel", "invert_spectrum", "data_range",
        "official_layout_quirk")),
    "diffproc.methods.sie.SIE": (MODULE, "diffproc.processes.interpolation.InterpolationProcess", (
        "num_timesteps", "schedule", "heads", "gamma", "gradient_wrt", "loss_norm", "time_sampling", "spacing",
        "clip_x0", "eps_min_cos", "max_beta", "beta_start", "beta_end")),
    "diffproc.methods.epdm.EPDM": (MODULE, "diffproc.processes.edge.EdgePreservingProcess", (
        "num_timesteps", "beta_start", "beta_end", "lambda_min", "lambda_max", "t_phi", "transition", "sigmoid_k",
        "train_transition", "edge_norm", "edge_padding", "lambda_for_s", "final", "loss_reduction", "clip_x0", "eta")),
    GDDM: (GDDM, "diffproc.processes.gradient.GradientDomainProcess", _DDPM_ARGS + (
        "domain", "noise", "dc_mode", "gradient_noise_scale", "laplacian_noise_scale", "laplacian_stencil",
        "hybrid_mu", "dataset_mean", "project_every_step", "loss_weighting", "clip_image", "network_view",
        "sigma_data", "time_sampling", "noise_cap")),
}
#: defaults of 0.1's GDDM that differ from its process's (written out when a 0.1 GDDM config leaves them unset)
GDDM_01_DEFAULTS = {"prediction": "x0", "loss_weighting": "edm", "clip_image": True, "network_view": "image"}
#: 0.1 GDDM options that moved to the GDDMDiagnostics callback (``gddm_diagnostics`` section)
GDDM_DIAGNOSTICS = {"diagnostics_every_n_val": "every_n_val", "diagnostics_num": "num",
                    "diagnostics_steps": "num_steps", "sparsity_delta": "sparsity_delta"}
#: former option names (module, sample grid, metrics callbacks, strokes DataModule, blur diffusion)
RENAMED = {"sampler": "solver", "sampling_steps": "num_steps", "sdedit_steps": "sdedit_num_steps",
           "sdedit_sampler": "sdedit_solver", "beta_schedule": "schedule"}
#: former values of SIE's ``spacing``
SPACING = {"ddim_uniform": "uniform", "ddim_quad": "quad"}
#: where the classes of the split ``diffproc.callbacks.fault`` live now
FAULT = {"AtomicCheckpointIO": "atomic_io", "NonFiniteGuard": "nonfinite", "ImageThroughputMonitor": "throughput",
         "install_stop_deadline": "stop_deadline", "cancel_stop_deadline": "stop_deadline"}
#: the preconditioning heads (``model.init_args.precond``) by the 0.1 name of the network's parameterisation
PRECOND = "diffproc.nets.precond."
HEAD_OF = {"eps": "EpsHead", "x0": "X0Head", "v": "VHead", "sigma_eps": "SigmaEpsHead", "dual": "DualHead"}
GRADIENT = "diffproc.processes.gradient.GradientDomainProcess"
SIE = "diffproc.processes.interpolation.InterpolationProcess"
#: GDDM σ_data buffers -> the ModeEDM head's
STATE_KEYS = {"sigma_data_spectrum": "precond.spectrum", "sigma_data_count": "precond.count",
              "sigma_data_colour_basis": "precond.colour_basis"}
#: modules that moved, as an exported diffusers folder names them (``model_index.json``, model card)
MOVED_MODULES = {"diffproc.pipelines": "diffproc.interop.pipelines"}
#: top-level config sections whose options were renamed, or moved into their ``sampling`` override
CALLBACK_SECTIONS = ("sample_grid", "metrics", "fid", "gddm_diagnostics")
#: the fields of ``diffproc.samplers.SamplingSpec`` (the converter imports no torch-heavy module)
SPEC_FIELDS = ("solver", "num_steps", "time_grid", "ddim_eta", "seed", "strength")
#: options that were the module's, a callback's or the process's own and are now the sampling spec's
SPEC_MOVES = ("solver", "num_steps", "time_grid", "seed")
#: the strokes DataModule's SDEdit options -> fields of the module's sampling spec
STROKES_SPEC = {"strength": "strength", "sdedit_num_steps": "num_steps", "sdedit_solver": "solver",
                "sdedit_seed": "seed"}


def rename(args: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``args`` with the former option names replaced (a value given under both names must agree)."""
    out = dict(args)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        if out.get(new) is not None and out[new] != value:
            raise ValueError(f"{where}{old}={value!r} and {new}={out[new]!r} disagree ({old} is the former name of "
                             f"{new}); fix the file by hand")
        out[new] = value
    return out


def convert_model(class_path: str, init_args: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A 0.1 model (class path, init args) as ``(0.2 class path, 0.2 init args, gddm_diagnostics options)``.
    A 0.2 model (it has a ``process``) or another class comes back unchanged."""
    if class_path not in METHODS or "process" in init_args:
        return class_path, dict(init_args), {}
    module_cls, process_cls, process_keys = METHODS[class_path]
    args = rename(init_args, "model: ")
    diagnostics = {new: args.pop(old) for old, new in GDDM_DIAGNOSTICS.items() if args.get(old) is not None}
    for old in GDDM_DIAGNOSTICS:
        args.pop(old, None)
    process = {k: args.pop(k) for k in process_keys if k in args}
    if class_path == GDDM:
        process.update({k: v for k, v in GDDM_01_DEFAULTS.items() if k not in process})
        process["clip_image"] = bool(process["clip_image"]) and process.get("dc_mode", "aux") == "aux"
    if process.get("spacing") in SPACING:
        process["spacing"] = SPACING[process["spacing"]]
    return module_cls, {"process": {"class_path": process_cls, "init_args": process}, **args}, diagnostics


def _head(name: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": PRECOND + name, "init_args": init_args}


def move_to_precond(args: dict[str, Any]) -> dict[str, Any]:
    """Model init args whose process still declares the network's parameterisation (``prediction``, SIE's ``heads``,
    GDDM's image view) with that moved to ``precond`` (module doc); args without it come back unchanged."""
    process = args.get("process")
    if not isinstance(process, dict) or "precond" in args:
        return args
    path, pargs = str(process.get("class_path", "")), dict(process.get("init_args") or {})
    args = dict(args)
    prediction = pargs.pop("prediction", None)
    head = None
    if path == SIE:
        heads, min_cos = pargs.pop("heads", None), pargs.pop("eps_min_cos", None)
        if heads not in (None, "dual"):
            head = _head(HEAD_OF[heads], **({"min_alpha": 1e-4 if min_cos is None else min_cos} if heads == "eps" else {}))
    elif path == GRADIENT:
        if "noise" in pargs:
            pargs["noise_kind"] = pargs.pop("noise")
        view, weighting = pargs.pop("network_view", "domain"), pargs.pop("loss_weighting", "uniform")
        sigma_data, modes = pargs.pop("sigma_data", 0.5), pargs.get("time_sampling") == "modes"
        sd_mode, sd_images = args.pop("sigma_data_mode", "uniform"), args.pop("sigma_data_images", 2048)
        if view == "image":
            if weighting not in ("edm", "snr", "image"):
                raise ValueError(f"network_view: image with loss_weighting: {weighting} is no longer a setting: the image "
                                 "view (ModeEDM) trains with its own edm/snr weighting or the process's objective: image")
            head = _head("ModeEDM", parameterisation=prediction or "eps",
                         weighting=weighting if weighting != "image" else "edm", sigma_data=sigma_data,
                         sigma_data_mode=sd_mode, sigma_data_images=sd_images,
                         time_sampling="modes" if modes else "process")
        elif weighting in ("edm", "snr") or modes:
            raise ValueError(f"loss_weighting: {weighting} / time_sampling: {pargs.get('time_sampling')} in the domain "
                             "view is no longer a setting: use the image view (precond: ModeEDM)")
        if modes:
            pargs.pop("time_sampling")
        pargs["objective"] = "image" if weighting == "image" else "head"
    if head is None and prediction not in (None, "eps", "sigma_eps"):
        head = _head(HEAD_OF[prediction])
    args["process"] = {**process, "init_args": pargs}
    if head is not None:
        args["precond"] = head
    return args


def _merge_spec(spec: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``spec[key] = value`` unless a different value is there already."""
    if value is None:
        return
    if spec.get(key) is not None and spec[key] != value:
        raise ValueError(f"{where}sampling.{key}={spec[key]!r} and the former option ({value!r}) disagree; fix the "
                         "file by hand")
    spec[key] = value


def move_to_spec(args: dict[str, Any], where: str = "", full: bool = False) -> dict[str, Any]:
    """``args`` (a module's or a callback's options) with ``solver`` / ``num_steps`` / ``time_grid`` / ``seed`` moved
    into ``sampling`` and, for a module, its process's ``eta`` as ``sampling.ddim_eta``. ``full``: write every field
    of the spec (what a module's hyperparameters hold); otherwise only the ones that are set."""
    out = dict(args)
    had = "sampling" in out or any(k in out for k in SPEC_MOVES)
    spec = dict(out.pop("sampling", None) or {})
    for key in SPEC_MOVES:
        if key in out:
            _merge_spec(spec, key, out.pop(key), where)
    process = out.get("process")
    if isinstance(process, dict) and isinstance(process.get("init_args"), dict) and "eta" in process["init_args"]:
        init = dict(process["init_args"])
        _merge_spec(spec, "ddim_eta", init.pop("eta"), where)
        out["process"] = {**process, "init_args": init}
        had = True
    if full:
        spec = {k: spec.get(k) for k in SPEC_FIELDS}
    if had or full:
        out["sampling"] = spec
    return out


def move_strokes_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The strokes DataModule's SDEdit options (a ``data`` section) -> the model's sampling spec."""
    data = cfg.get("data")
    args = data.get("init_args") if isinstance(data, dict) else None
    if not isinstance(args, dict) or not any(k in args for k in (*STROKES_SPEC, "t0")):
        return cfg
    args = dict(args)
    if args.pop("t0", None) is not None:
        raise ValueError("data: t0 (an explicit SDEdit hijack time) is gone: the hijack point is the sampling spec's "
                         "strength = t0 / t_max (t_max: T for DDPM/EPDM); set model.init_args.sampling.strength")
    moved = {STROKES_SPEC[k]: args.pop(k) for k in list(args) if k in STROKES_SPEC}
    if moved.get("seed") is not None and "kmeans_seed" not in args:
        args["kmeans_seed"] = moved["seed"]
    cfg = {**cfg, "data": {**data, "init_args": args}}
    model = cfg.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        spec = dict(model["init_args"].get("sampling") or {})
        spec.update({k: v for k, v in moved.items() if v is not None})  # the predict run's own options win
        cfg["model"] = {**model, "init_args": {**model["init_args"], "sampling": spec}}
    elif any(v is not None for v in moved.values()):
        cfg["model"] = {"init_args": {"sampling": {k: v for k, v in moved.items() if v is not None}}}
    return cfg


def fix_class_paths(obj: Any) -> Any:
    """Every ``diffproc.callbacks.fault.X`` string in a nested config -> the module that holds ``X`` now."""
    if isinstance(obj, dict):
        return {k: fix_class_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fix_class_paths(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("diffproc.callbacks.fault."):
        name = obj.rsplit(".", 1)[1]
        if name not in FAULT:
            raise ValueError(f"{obj}: diffproc.callbacks.fault has no {name} any more (it was split into "
                             f"{sorted(set(FAULT.values()))})")
        return f"diffproc.callbacks.{FAULT[name]}.{name}"
    return obj


def convert_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A 0.1 config (a ``cli.py`` config file or a run's saved ``config.yaml``) in 0.2 form."""
    cfg = fix_class_paths(dict(cfg))
    model = cfg.get("model")
    if isinstance(model, dict) and "class_path" in model:
        path, args, diagnostics = convert_model(model["class_path"], model.get("init_args") or {})
        cfg["model"] = {**model, "class_path": path, "init_args": move_to_precond(move_to_spec(args, "model: "))}
        if diagnostics:
            cfg["gddm_diagnostics"] = {**(cfg.get("gddm_diagnostics") or {}), **diagnostics}
    for section in CALLBACK_SECTIONS:
        if isinstance(cfg.get(section), dict):
            cfg[section] = move_to_spec(rename(cfg[section], f"{section}: "), f"{section}: ")
    data = cfg.get("data")
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        cfg["data"] = {**data, "init_args": rename(data["init_args"], "data: ")}
    return move_strokes_options(cfg)


def convert_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A 0.1 checkpoint with 0.2 hyperparameters; every tensor (weights, EMA, optimiser, loops, callbacks) kept."""
    out = dict(ckpt)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if hp:
        meta = {k: v for k, v in hp.items() if k.startswith("_")}
        args = {k: v for k, v in hp.items() if not k.startswith("_")}
        path, args, _ = convert_model(str(meta.get("_class_path", "")), args)
        if "process" in args:
            args = move_to_spec(args, "hyper_parameters: ", full=True)
        args = move_to_precond(args)
        out["hyper_parameters"] = {**({"_class_path": path} if "_class_path" in meta else {}), **args,
                                   **{k: v for k, v in meta.items() if k != "_class_path"}}
    if any(k in STATE_KEYS for k in ckpt.get("state_dict", {})):
        out["state_dict"] = {STATE_KEYS.get(k, k): v for k, v in ckpt["state_dict"].items()}
    data_hp = ckpt.get("datamodule_hyper_parameters")
    if isinstance(data_hp, dict):
        data_hp = rename(data_hp, "data: ")
        out["datamodule_hyper_parameters"] = {k: v for k, v in data_hp.items() if k not in (*STROKES_SPEC, "t0")}
    return out


def convert_export(old: Path, new: Path) -> Path:
    """An exported diffusers folder copied to ``new`` with the moved modules (:data:`MOVED_MODULES`) renamed in its
    ``model_index.json`` and model card; every weight file is copied unchanged."""
    index = old / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{old} is a folder without model_index.json: not a folder exported to diffusers")
    if new.exists():
        raise ValueError(f"{new} exists; choose a new folder")
    shutil.copytree(old, new)
    components = json.loads(index.read_text())
    for name, value in components.items():
        if isinstance(value, list) and value and value[0] in MOVED_MODULES:
            components[name] = [MOVED_MODULES[value[0]], *value[1:]]
    (new / "model_index.json").write_text(json.dumps(components, indent=2, sort_keys=True) + "\n")
    card = new / "README.md"
    if card.is_file():
        text = card.read_text()
        for former, module in MOVED_MODULES.items():
            text = text.replace(f"from {former} import", f"from {module} import")
        card.write_text(text)
    return new


def convert_file(old: str | Path, new: str | Path) -> Path:
    """Convert ``old`` (``.ckpt``, a ``.yaml``/``.yml`` config, or an exported diffusers folder) into ``new``."""
    old, new = Path(old), Path(new)
    if old.resolve() == new.resolve():
        raise ValueError("write the converted file next to the old one, not over it")
    if old.is_dir():
        return convert_export(old, new)
    if old.suffix in (".yaml", ".yml"):
        cfg = yaml.safe_load(old.read_text()) or {}
        new.write_text(yaml.safe_dump(convert_config(cfg), sort_keys=False))
    else:
        ckpt = torch.load(old, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{old} is not a Lightning checkpoint (no state_dict)")
        torch.save(convert_checkpoint(ckpt), new)
    return new


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffproc.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="a 0.1 checkpoint (.ckpt) or config (.yaml), or a folder exported before "
                                "diffproc.pipelines moved to diffproc.interop.pipelines")
    ap.add_argument("new", help="where to write the 0.2 one")
    args = ap.parse_args(argv)
    try:
        out = convert_file(args.old, args.new)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"converted {args.old} -> {out}")


if __name__ == "__main__":
    main()
