"""Building modules in tests: a process given to a :class:`DiffusionModule` (or :class:`GDDM` for the gradient-domain
process), with one keyword list split between the two by the process's constructor signature (the fields of
:class:`~diffproc.samplers.SamplingSpec` go to the module's ``sampling``)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from diffproc.methods.base import DiffusionModule
from diffproc.methods.gddm import GDDM
from diffproc.nets.precond import ModeEDM
from diffproc.processes.base import DiffusionProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.samplers import SamplingSpec

SPEC_FIELDS = ("solver", "num_steps", "time_grid", "ddim_eta", "seed", "strength")

#: the measured GDDM setting of configs/gddm_shapes.yaml: the process's part (its defaults are the seed's) and the
#: image-view head's (``ModeEDM`` with x0 parameterisation and EDM weighting)
GDDM_MEASURED = {"clip_image": True}
MODE_EDM_MEASURED = {"parameterisation": "x0", "weighting": "edm"}


def build(process_cls: type[DiffusionProcess], module_cls: Optional[type[DiffusionModule]] = None,
          **kw: Any) -> DiffusionModule:
    """``module_cls(process=process_cls(<its arguments in kw>), sampling=SamplingSpec(<its fields in kw>),
    <the rest of kw>)``."""
    names = set(inspect.signature(process_cls.__init__).parameters) - {"self"}
    process = process_cls(**{k: kw.pop(k) for k in list(kw) if k in names})
    spec = {k: kw.pop(k) for k in SPEC_FIELDS if k in kw}
    if spec:
        kw["sampling"] = SamplingSpec(**spec)
    if module_cls is None:
        module_cls = GDDM if issubclass(process_cls, GradientDomainProcess) else DiffusionModule
    return module_cls(process=process, **kw)


def gddm(**kw: Any) -> GDDM:
    """A GDDM with the measured setting unless ``kw`` says otherwise (``clip_image`` only with ``dc_mode="aux"``):
    ``ModeEDM``'s arguments in ``kw`` (and ``time_sampling="modes"``) go to that head, unless ``precond`` is given
    (e.g. ``precond="eps"``: the seed's domain view)."""
    args = {**GDDM_MEASURED, **kw}
    if "clip_image" not in kw:
        args["clip_image"] = args.get("dc_mode", "aux") == "aux"
    head_names = set(inspect.signature(ModeEDM.__init__).parameters) - {"self", "time_sampling"}
    head = {**MODE_EDM_MEASURED, **{k: args.pop(k) for k in list(args) if k in head_names}}
    if args.get("time_sampling") == "modes":
        head["time_sampling"] = args.pop("time_sampling")
    if "precond" not in args:
        args["precond"] = ModeEDM(**head)
    return build(GradientDomainProcess, GDDM, **args)
