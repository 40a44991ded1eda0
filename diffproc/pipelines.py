"""diffusers pipelines for diffproc models: the folders ``python -m diffproc.export`` writes load with diffusers' API.

* DDPM/DDIM export to diffusers' own ``DDPMPipeline`` / ``DDIMPipeline`` (a ``DDPMScheduler`` config equal to
  the process); loading those needs no diffproc.
* Every other process (GDDM/LDDM, EPDM, blur diffusion, SIE) exports to :class:`DiffprocPipeline`: the UNet
  (plus GDDM's Poisson network when it has one) and a :class:`DiffprocScheduler` whose config names the method
  and its constructor arguments. The pipeline rebuilds that method's process and runs diffproc's own reverse
  steps (:func:`diffproc.samplers.sample_loop`) and decoding, so it samples exactly what ``cli.py predict`` does::

      from diffproc.pipelines import DiffprocPipeline
      pipe = DiffprocPipeline.from_pretrained("export/sie")          # diffusers' from_pretrained, offline
      images = pipe(batch_size=16, seed=0).images                       # = cli.py predict's PNGs 0..15
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from diffproc.methods.base import ConfigError, DiffusionModule
from diffproc.processes.base import PerSampleGenerator, seeded_generator
from diffproc.samplers import sample_loop

#: backbone the method is built with inside the scheduler (only its process and decoding are used there)
_PLACEHOLDER_UNET = {"block_out_channels": [4], "layers_per_block": 1, "attention_resolutions": []}
#: components of a module that are exported as pipeline components, besides the (EMA) UNet
EXTRA_COMPONENTS = ("poisson_net",)
#: largest non-network state (e.g. GDDM's dataset mean) kept in the scheduler config, in elements
MAX_MODULE_STATE = 65536


def method_class(path: str) -> type[DiffusionModule]:
    """The ``DiffusionModule`` subclass named by ``path`` (``package.module.Class``). A module outside ``diffproc``
    is imported only when the caller has imported it already (a folder's config never makes us run new code)."""
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"method {path!r} is not a class path (package.module.Class)")
    if module_name in sys.modules:
        module = sys.modules[module_name]
    elif module_name == "diffproc" or module_name.startswith("diffproc."):
        module = importlib.import_module(module_name)
    else:
        raise ConfigError(f"method {path!r}: import {module_name} before loading this pipeline (only diffproc's own "
                          "methods are imported on demand)")
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionModule)):
        raise ConfigError(f"method {path!r} is not a diffproc DiffusionModule subclass")
    return cls


def state_to_config(state: dict[str, Tensor]) -> dict[str, dict]:
    """Small tensors as JSON-able ``{name: {dtype, shape, data}}`` (see :data:`MAX_MODULE_STATE`)."""
    total = sum(v.numel() for v in state.values())
    if total > MAX_MODULE_STATE:
        raise ConfigError(f"the module's state outside its networks has {total} elements ({sorted(state)}); "
                          f"at most {MAX_MODULE_STATE} fit in a scheduler config")
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                "data": v.detach().cpu().flatten().tolist()} for k, v in state.items()}


def state_from_config(cfg: Optional[dict]) -> dict[str, Tensor]:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
            for k, v in (cfg or {}).items()}


class DiffprocScheduler(SchedulerMixin, ConfigMixin):
    """The method behind a :class:`DiffprocPipeline`: which ``DiffusionModule`` subclass (``method``), its
    constructor arguments (``method_args``, the checkpoint's hyperparameters), the image geometry, the sampling
    defaults (``solver``, ``num_steps``, ``seed``) and the module's small state outside its networks
    (``module_state``, e.g. GDDM's running dataset mean). :meth:`method_module` builds that method once (with a
    placeholder backbone: only its process and :meth:`~DiffusionModule.decode` are used); its process defines the
    time grid (:meth:`set_timesteps`) and the reverse steps (:meth:`step`).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, method: str = "diffproc.methods.ddpm.DDPM", method_args: Optional[dict] = None,
                 image_size: int = 32, channels: int = 3, solver: Optional[str] = None,
                 num_steps: Optional[int] = None, seed: int = 0, module_state: Optional[dict] = None) -> None:
        self._module: Optional[DiffusionModule] = None
        self.timesteps: list = []

    def method_module(self) -> DiffusionModule:
        """The method (built once), in eval mode, with the exported non-network state loaded."""
        if self._module is None:
            cfg = self.config
            args = {k: v for k, v in dict(cfg.method_args or {}).items() if not k.startswith("_")}
            args.update(image_size=cfg.image_size, channels=cfg.channels, unet=_PLACEHOLDER_UNET, ema_decay=0.0,
                        init_from=None)
            module = method_class(cfg.method)(**args)
            state = state_from_config(cfg.module_state)
            if state:
                missing = set(state) - set(module.state_dict())
                if missing:
                    raise ConfigError(f"{cfg.method} has no state {sorted(missing)}: this folder was exported from "
                                      "another version of the method")
                module.load_state_dict(state, strict=False)
            self._module = module.eval().requires_grad_(False)
        return self._module

    @property
    def process(self):
        return self.method_module().process

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None) -> None:
        """The descending grid ``[t_N, ..., t_0]`` of the process for that many steps (config default if None)."""
        self.timesteps = list(self.process.timesteps(num_inference_steps or self.config.num_steps))

    def step(self, model_fn, sample: Tensor, t, t_next, solver: Optional[str] = None,
             generator=None) -> Tensor:
        """One reverse step ``t -> t_next`` of the process (``model_fn(z, t)`` as in diffproc)."""
        return self.process.reverse_step(model_fn, sample, t, t_next, solver=solver or self.config.solver,
                                         generator=generator)


class _GeneratorList(PerSampleGenerator):
    """A list of ``torch.Generator`` (diffusers' per-sample convention) as diffproc's per-sample generator."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:  # the given streams, not reseeded
        self.seed, self.indices = -1, list(range(len(generators)))
        self.device = generators[0].device
        self.generators = list(generators)


class DiffprocPipeline(DiffusionPipeline):
    """Unconditional sampling of any diffproc method: the process's reverse steps over the exported UNet.

    Components: ``unet`` (the EMA weights at export), ``scheduler`` (:class:`DiffprocScheduler`) and, for GDDM with
    a Poisson network, ``poisson_net``. ``__call__`` takes

    * ``seed`` (+ optional ``indices``): sample ``i`` draws all its noise from ``(seed, indices[i])``, as
      ``cli.py predict`` and ``cli.py test`` do (``indices`` default ``0..batch_size-1``);
    * or ``generator``: one ``torch.Generator`` for the batch, or a list with one per sample (diffusers' way);
      with neither, the global RNG;
    * ``num_inference_steps`` / ``solver`` (defaults: the model's ``num_steps`` / ``solver``);
    * ``output_type`` ``pil`` | ``np`` (B, H, W, C) | ``pt`` (B, C, H, W), values in [0, 1].
    """

    model_cpu_offload_seq = "unet"
    _optional_components = list(EXTRA_COMPONENTS)

    def __init__(self, unet: UNet2DModel, scheduler: DiffprocScheduler,
                 poisson_net: Optional[UNet2DModel] = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, poisson_net=poisson_net)

    def method_module(self) -> DiffusionModule:
        """The scheduler's method with this pipeline's extra networks attached, on the pipeline's device."""
        module = self.scheduler.method_module()
        for name in EXTRA_COMPONENTS:
            if getattr(module, name, None) is not None:
                net = getattr(self, name, None)
                if net is None:
                    raise ConfigError(f"{self.scheduler.config.method} needs the component {name!r}, which this "
                                      "pipeline folder does not have")
                setattr(module, name, net)
        return module.to(self.unet.device)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None,
                 num_inference_steps: Optional[int] = None, solver: Optional[str] = None,
                 seed: Optional[int] = None, indices: Optional[Sequence[int]] = None,
                 output_type: str = "pil", return_dict: bool = True, progress: bool = False):
        module = self.method_module()
        cfg = self.scheduler.config
        device = self.unet.device
        if seed is not None:
            generator = seeded_generator(batch_size, seed, indices, generator, device)
        elif isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"{len(generator)} generators for batch_size={batch_size}")
            generator = _GeneratorList(generator)
        process = module.process
        shape = (batch_size, process.domain_channels(cfg.channels), cfg.image_size, cfg.image_size)
        solver = solver or cfg.solver or process.default_solver
        was_training = self.unet.training
        self.unet.eval()
        try:
            res = sample_loop(process, module.model_fn(self.unet), shape, num_inference_steps or cfg.num_steps,
                              solver, generator, device, progress=progress, desc=f"sampling ({solver})",
                              grid=module.time_grid)
        finally:
            self.unet.train(was_training)
        image = ((module.decode(res.sample).clamp(-1, 1) + 1) / 2).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


__all__ = ["DiffprocPipeline", "DiffprocScheduler", "method_class"]
