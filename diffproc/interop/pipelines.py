"""diffusers pipelines for diffproc models: the folders that ``python -m diffproc.interop.export`` writes load with
diffusers' API.

* DDPM/DDIM export to diffusers' own ``DDPMPipeline`` / ``DDIMPipeline`` (a ``DDPMScheduler`` config equal to
  the process); loading those needs no diffproc.
* Every other process (GDDM/LDDM, EPDM, blur diffusion, SIE) exports to :class:`DiffprocPipeline`: the UNet
  (plus GDDM's Poisson network when it has one) and a :class:`DiffprocScheduler` whose config holds the process's
  own config (class path and constructor arguments), the image geometry and GDDM's decoding options and state.
  The pipeline rebuilds the process from that config and runs diffproc's own reverse steps
  (:func:`diffproc.samplers.sample_loop`) and decoding, so it samples exactly what ``cli.py predict`` does::

      from diffproc.interop.pipelines import DiffprocPipeline
      pipe = DiffprocPipeline.from_pretrained("export/sie")          # diffusers' from_pretrained, offline
      images = pipe(batch_size=16, seed=0).images                       # = cli.py predict's PNGs 0..15

Room ``interop``: imports ``methods`` (GDDM's decoding), ``samplers`` and ``processes``; nothing in the package
imports it. diffusers records this module's path (``diffproc.interop.pipelines``) in an exported folder's
``model_index.json`` and imports it when the folder is loaded.

The call takes the fields of diffproc's sampling spec (:class:`~diffproc.samplers.SamplingSpec`) under diffusers'
names where diffusers has one (``num_inference_steps`` = ``num_steps``; ``solver``, ``time_grid``, ``ddim_eta``,
``seed``); unset ones inherit the module's default spec, which the scheduler config holds (``sampling``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from diffproc.errors import ConfigError
from diffproc.methods.gddm import known_dc, poisson_reconstruct
from diffproc.nets.precond import Denoiser, Head, make_head
from diffproc.processes.base import DiffusionProcess, build_process
from diffproc.processes.rng import PerSampleGenerator, seeded_generator
from diffproc.samplers import SamplingSpec, sample_loop, sampling_grid

#: components of a module that are exported as pipeline components, besides the (EMA) UNet
EXTRA_COMPONENTS = ("poisson_net",)
#: largest non-network state (e.g. GDDM's dataset mean) kept in the scheduler config, in elements
MAX_MODULE_STATE = 65536


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
    """The process behind a :class:`DiffprocPipeline`: its config (``process``: ``{class_path, init_args}``, as
    :attr:`~diffproc.processes.base.DiffusionProcess.config` writes it), the image geometry, the module's default
    sampling spec (``sampling``: the fields of :class:`~diffproc.samplers.SamplingSpec`), the preconditioning head
    (``precond``: ``{class_path, init_args}``) and, for GDDM, its decoding options (``gddm``: ``reconstruction``,
    ``poisson_residual``) and small state outside its networks (``module_state``: dataset mean, the head's σ_data
    spectrum). :attr:`process` and :attr:`head` are rebuilt once; the process defines the time grid
    (:meth:`set_timesteps`), the reverse steps (:meth:`step`) and, with :meth:`decode`, the images.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, process: Optional[dict] = None, image_size: int = 32, channels: int = 3,
                 sampling: Optional[dict] = None, gddm: Optional[dict] = None,
                 module_state: Optional[dict] = None, precond: Optional[dict] = None) -> None:
        self._process: Optional[DiffusionProcess] = None
        self._head: Optional[Head] = None
        self.timesteps: list = []

    @property
    def process(self) -> DiffusionProcess:
        """The process rebuilt from its config, with the image geometry."""
        if self._process is None:
            cfg = self.config
            if not cfg.process:
                raise ConfigError("this scheduler config has no process: the folder was exported by another "
                                  "version of diffproc; export the checkpoint again")
            self._process = build_process(cfg.process).set_geometry(cfg.image_size, cfg.channels)
        return self._process

    @property
    def head(self) -> Head:
        """The preconditioning head rebuilt from its config, with its state (e.g. the σ_data spectrum)."""
        if self._head is None:
            cfg = self.config
            head = make_head(cfg.get("precond"), self.process).setup(self.process, cfg.image_size, cfg.channels)
            state = {k.removeprefix("precond."): v for k, v in state_from_config(cfg.module_state).items()
                     if k.startswith("precond.")}
            if state:
                head.load_state_dict(state)
            self._head = head
        return self._head

    def decode(self, z: Tensor, poisson_net: Optional[nn.Module] = None) -> Tensor:
        """Final domain state -> images in [-1, 1] (not clipped): the process's ``from_domain``, or GDDM's
        reconstruction (DC mode, Poisson network)."""
        cfg = self.config
        if cfg.gddm is None:
            return self.process.from_domain(z)
        state = state_from_config(cfg.module_state)
        dc_mean = state.get("dc_mean", torch.zeros(cfg.channels, dtype=torch.float64))
        known = self.process.dataset_mean is not None or float(state.get("dc_count", 0.0)) > 0
        dc = known_dc(self.process, z, None, dc_mean, known)
        return poisson_reconstruct(self.process, z, dc, poisson_net, cfg.gddm["reconstruction"],
                                   cfg.gddm["poisson_residual"])

    def spec(self, override: Optional[SamplingSpec] = None) -> SamplingSpec:
        """The complete sampling spec of a call: ``override`` over the config's default (``sampling``), resolved
        against the process (``ValueError`` naming the argument when it cannot run)."""
        return SamplingSpec.of(override).over(self.config.get("sampling")).resolve(self.process, "pipeline call")

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None) -> None:
        """The descending grid ``[t_N, ..., t_0]`` the default solver walks with that many steps (config default
        if None)."""
        spec = self.spec(SamplingSpec(num_steps=num_inference_steps))
        self.timesteps = sampling_grid(self.process, spec.num_steps, spec.solver, spec.time_grid)

    def step(self, denoiser: Denoiser, sample: Tensor, t, t_next, solver: Optional[str] = None,
             generator=None, ddim_eta: Optional[float] = None) -> Tensor:
        """One reverse step ``t -> t_next`` of the process (``denoiser(z, t) -> (û0, ε̂)`` as in diffproc:
        :meth:`DiffprocPipeline.denoiser`)."""
        spec = self.spec(SamplingSpec(solver=solver, ddim_eta=ddim_eta))
        return self.process.reverse_step(denoiser, sample, t, t_next, solver=spec.solver, generator=generator,
                                         ddim_eta=spec.ddim_eta)


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
      with neither, the seed of the module's default spec;
    * the sampling spec's other fields: ``num_inference_steps`` (diffproc's ``num_steps``), ``solver``,
      ``time_grid``, ``ddim_eta``; unset ones are the module's default spec (scheduler config ``sampling``);
    * ``output_type`` ``pil`` | ``np`` (B, H, W, C) | ``pt`` (B, C, H, W), values in [0, 1].
    """

    model_cpu_offload_seq = "unet"
    _optional_components = list(EXTRA_COMPONENTS)

    def __init__(self, unet: UNet2DModel, scheduler: DiffprocScheduler,
                 poisson_net: Optional[UNet2DModel] = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, poisson_net=poisson_net)

    def net_fn(self, z: Tensor, t: Tensor) -> Tensor:
        """The exported UNet with time in the process's network convention."""
        tt = self.scheduler.process.model_time(t.to(z.device)).expand(z.shape[0])
        return self.unet(z, tt).sample.to(z.dtype)

    @property
    def denoiser(self) -> Denoiser:
        """The exported UNet as the process sees it: through the model's preconditioning head."""
        return self.scheduler.head.to(self.unet.device).bind(self.scheduler.process, self.net_fn)

    def decode(self, z: Tensor) -> Tensor:
        """Final domain state -> images in [-1, 1] (the scheduler's decoding with this pipeline's Poisson net)."""
        net = getattr(self, "poisson_net", None)
        gddm = self.scheduler.config.gddm
        if net is None and gddm is not None and "poisson_net" in (gddm["reconstruction"], self.scheduler.process.dc_mode):
            raise ConfigError("this GDDM needs the component 'poisson_net', which this pipeline folder does not have")
        return self.scheduler.decode(z, net)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None,
                 num_inference_steps: Optional[int] = None, solver: Optional[str] = None,
                 seed: Optional[int] = None, indices: Optional[Sequence[int]] = None,
                 output_type: str = "pil", return_dict: bool = True, progress: bool = False,
                 time_grid: Optional[str] = None, ddim_eta: Optional[float] = None):
        cfg = self.scheduler.config
        device = self.unet.device
        spec = self.scheduler.spec(SamplingSpec(solver=solver, num_steps=num_inference_steps, time_grid=time_grid,
                                                ddim_eta=ddim_eta, seed=seed))
        if seed is not None or generator is None:
            generator = seeded_generator(batch_size, spec.seed, indices, generator, device)
        elif isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"{len(generator)} generators for batch_size={batch_size}")
            generator = _GeneratorList(generator)
        process = self.scheduler.process
        shape = (batch_size, process.domain_channels(cfg.channels), cfg.image_size, cfg.image_size)
        nets = [n for n in (self.unet, getattr(self, "poisson_net", None)) if n is not None]
        was_training = [n.training for n in nets]
        for n in nets:
            n.eval()
        try:
            res = sample_loop(process, self.denoiser, shape, spec.num_steps, spec.solver, generator, device,
                              progress=progress, desc=f"sampling ({spec.solver})", grid=spec.time_grid,
                              ddim_eta=spec.ddim_eta)
            image = self.decode(res.sample)
        finally:
            for n, was in zip(nets, was_training):
                n.train(was)
        image = ((image.clamp(-1, 1) + 1) / 2).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


__all__ = ["DiffprocPipeline", "DiffprocScheduler"]
