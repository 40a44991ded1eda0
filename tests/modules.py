"""Building modules in tests: a process given to a :class:`DiffusionModule` (or :class:`GDDM` for the gradient-domain
process), with one keyword list split between the two by the process's constructor signature (the fields of
:class:`~diffproc.samplers.SamplingSpec` go to the module's ``sampling``)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from diffproc.methods.base import DiffusionModule
from diffproc.methods.gddm import GDDM
from diffproc.processes.base import DiffusionProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.samplers import SamplingSpec

SPEC_FIELDS = ("solver", "num_steps", "time_grid", "ddim_eta", "seed", "strength")

#: the measured GDDM setting of configs/gddm_shapes.yaml (0.1's GDDM defaults; the process defaults are the seed's)
GDDM_MEASURED = {"prediction": "x0", "loss_weighting": "edm", "clip_image": True, "network_view": "image"}


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
    """A GDDM with the measured setting unless ``kw`` says otherwise (``clip_image`` only with ``dc_mode="aux"``)."""
    args = {**GDDM_MEASURED, **kw}
    if "clip_image" not in kw:
        args["clip_image"] = args.get("dc_mode", "aux") == "aux"
    return build(GradientDomainProcess, GDDM, **args)
