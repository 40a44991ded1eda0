"""Building modules in tests: a process given to a :class:`DiffusionModule` (or :class:`GDDM` for the gradient-domain
process), with one keyword list split between the two by the process's constructor signature (the fields of
:class:`~diffproc.samplers.SamplingSpec` go to the module's ``sampling``); and :class:`PerModeVP`, a generic diagonal
Gaussian process with per-coordinate schedules (the Gaussian core's and the samplers' tests)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from diffproc.methods.base import DiffusionModule
from diffproc.methods.gddm import GDDM
from diffproc.nets.precond import ModeEDM
from diffproc.processes.base import DiffusionProcess
from diffproc.processes.gaussian import Basis, GaussianProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.vp_sde import VPSDEProcess
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


class PerModeVP(GaussianProcess):
    """A continuous-time VP process with per-coordinate schedules ``α_k = exp(−c_k B(t))`` on a 2x2 grid of
    modes (the shape of blur's per-DCT-mode grids, but smooth in t), in ``basis`` (default: pixels)."""

    def __init__(self, basis: Optional[Basis] = None) -> None:
        super().__init__(basis=basis, clip_x0=False)
        self.vp = VPSDEProcess()
        self.rate = torch.tensor([[0.5, 1.0], [2.0, 4.0]], dtype=torch.float64)

    def alpha_sigma(self, t):
        b = self.vp.integrated_beta(t.to(torch.float64)).view(-1, 1, 1) * self.rate
        return torch.exp(-b), torch.sqrt(-torch.expm1(-2.0 * b))

    def sample_time(self, batch, generator=None, device=None):
        return self.vp.sample_time(batch, generator, device)

    def timesteps(self, num_steps=None):
        return self.vp.timesteps(num_steps)
