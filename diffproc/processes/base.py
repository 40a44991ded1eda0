"""The process API every forward process implements (DESIGN.md, "The three layers").

A process is pure tensor math. It never sees an ``nn.Module``: the network reaches it only as
``model_fn(z_t, t) -> Tensor`` where ``t`` is a ``(B,)`` float tensor in the process's own time
convention. That is what lets tests drive a process with an analytic denoiser.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]

#: probability-flow ODE solvers (run by ``diffproc.samplers.sample_loop`` through the ODE protocol)
ODE_SOLVERS: tuple[str, ...] = ("euler", "heun", "midpoint", "rk4")
#: exponential-integrator multistep solvers of diagonal Gaussian processes (DPM-Solver++ family; a step needs
#: the previous step's prediction, so ``diffproc.samplers.sample_loop`` runs them with a small state, not
#: through ``reverse_step``): see :func:`diffproc.processes.gaussian.dpmpp_step`
MULTISTEP_SOLVERS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")


class DiffusionProcess(ABC):
    """Forward process q(z_t | z_0) plus its training loss and reverse steps.

    A process remembers the arguments it was constructed with (:attr:`config`): a checkpoint or an exported
    pipeline rebuilds it from them (:func:`build_process`), so its signature is the only config surface of
    its math. Image geometry is not part of that surface: the owning module passes its ``image_size`` /
    ``channels`` to :meth:`set_geometry`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "DiffusionProcess":
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:  # wrong arguments: __init__ raises the error
            return obj
        bound.apply_defaults()
        obj._init_args = {k: v for k, v in list(bound.arguments.items())[1:]}
        return obj

    @property
    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: the constructor call that rebuilds this process (plain
        Python values, tensors as lists)."""
        args = {k: v.tolist() if isinstance(v, torch.Tensor) else v
                for k, v in getattr(self, "_init_args", {}).items()}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def set_geometry(self, image_size: int, channels: int) -> "DiffusionProcess":
        """The image geometry of the data (set by the module that owns the process). Processes whose math
        depends on it (blur diffusion's basis and spectrum) build that here; the default needs nothing.
        Returns ``self``."""
        return self

    #: names accepted by :meth:`reverse_step` (``solver`` argument)
    solvers: tuple[str, ...] = ()
    #: solver used when the caller does not name one
    default_solver: str = ""
    #: solvers that only run the full chain (no strided grids), e.g. blur diffusion's ``official``
    full_chain_solvers: tuple[str, ...] = ()

    def unknown_solver_message(self, solver: str) -> str:
        """The message of the error raised when ``solver`` is not in :attr:`solvers` (a process may say why)."""
        return f"{type(self).__name__} has no solver {solver!r}; choose one of {list(self.solvers)}"

    # --- domain -------------------------------------------------------------------------------
    def domain_channels(self, channels: int) -> int:
        """Channels of the network input for images with ``channels`` channels."""
        return channels

    def input_channels(self, channels: int) -> int:
        """Channels of the network input (the domain's unless the process shows the network another view)."""
        return self.domain_channels(channels)

    def output_channels(self, channels: int) -> int:
        """Channels of the network output (e.g. 2C for two-headed predictions)."""
        return self.domain_channels(channels)

    def to_domain(self, x0: Tensor) -> Tensor:
        """Map images in [-1, 1] to the domain the process diffuses in (identity by default)."""
        return x0

    def from_domain(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`to_domain`; returns images in [-1, 1] (not clipped)."""
        return z

    def model_time(self, t: Tensor) -> Tensor:
        """Time as the backbone sees it (float, integer-like scale for diffusers embeddings)."""
        return t.float()

    # --- training -----------------------------------------------------------------------------
    @abstractmethod
    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Training times, shape ``(batch,)``."""

    @abstractmethod
    def forward(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Closed-form sample of q(z_t | z_0) for the given standard-normal ``noise``."""

    @abstractmethod
    def loss(self, model_fn: ModelFn, z0: Tensor, t: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The paper's training objective (a scalar)."""

    def loss_terms(self, model_fn: ModelFn, z0: Tensor, t: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss": objective, <term>: value, ...}``: the objective and its parts (logged as
        ``train/loss_<term>``); default: the objective alone."""
        return {"loss": self.loss(model_fn, z0, t, noise, generator)}

    # --- sampling -----------------------------------------------------------------------------
    @abstractmethod
    def timesteps(self, num_steps: int | None = None) -> list:
        """Descending time grid ``[t_N, ..., t_0]`` visited by the sampler (``num_steps`` steps)."""

    @abstractmethod
    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """A draw from the terminal distribution at ``timesteps()[0]``."""

    @abstractmethod
    def reverse_step(self, model_fn: ModelFn, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """One step of the reverse process from time ``t`` to ``t_next`` (< t); ``ddim_eta``: the ``ddim`` solver's
        stochasticity (ignored by the other solvers)."""



def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run with base seed ``seed`` (a 64-bit mix of the pair, so
    nearby (seed, index) pairs never share a stream)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


class PerSampleGenerator:
    """Per-sample randomness (EDM's per-seed generators): row ``j`` of every draw comes from its own
    ``torch.Generator`` seeded by :func:`sample_seed` ``(seed, indices[j])``. A sample therefore gets the
    same noise (prior and every step's noise) whatever the batch it is drawn in and whatever the number
    of ranks. Pass it wherever a process takes ``generator``; the noise helpers below dispatch on it.
    """

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, i))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self, fn, shape: tuple[int, ...], **kw) -> Tensor:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"PerSampleGenerator for {len(self.generators)} samples asked for a draw of shape "
                             f"{tuple(shape)}; the first dimension must be the batch")
        return torch.stack([fn(tuple(shape[1:]), generator=g, device=self.device, **kw) for g in self.generators])

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.randn, shape, dtype=dtype)

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.rand, shape, dtype=dtype)


def seeded_generator(num: int, seed: int | None = None, indices=None, generator=None,
                     device: torch.device | str = "cpu"):
    """The randomness of one sampling call of ``num`` samples: with ``seed``, a
    :class:`PerSampleGenerator` for ``indices`` (default ``0..num-1``); otherwise ``generator`` as given."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either seed (per-sample noise) or generator, not both")
    idx = list(range(num)) if indices is None else [int(i) for i in indices]
    if len(idx) != num:
        raise ValueError(f"{len(idx)} indices for {num} samples")
    return PerSampleGenerator(seed, idx, device)


def randn(shape, generator=None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard-normal draw of ``shape`` on ``device`` from a ``torch.Generator`` (drawn on its device,
    then moved), a :class:`PerSampleGenerator` (one stream per sample) or the global RNG (``None``)."""
    shape = tuple(shape)
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape, generator=None, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) draw; same generator rules as :func:`randn`."""
    shape = tuple(shape)
    if isinstance(generator, PerSampleGenerator):
        return generator.rand(shape, dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """``torch.randn_like`` that honours a generator (see :func:`randn`)."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator, x.device, x.dtype)


def bcast(c: Tensor, ref: Tensor) -> Tensor:
    """Broadcast a schedule coefficient against a state ``ref`` and cast it to ``ref``'s dtype/device:
    ``(B,)`` -> ``(B,1,1,1)``; ``(B,H,W)`` -> ``(B,1,H,W)``; a ``(B,C,H,W)`` or ``(B,1,H,W)`` grid is kept."""
    c = c.to(device=ref.device)
    if c.ndim == 1:
        c = c.view(-1, *([1] * (ref.ndim - 1)))
    elif c.ndim < ref.ndim:
        c = c.unsqueeze(1)
    return c.to(ref.dtype)


def batch_times(t, batch: int, device) -> Tensor:
    """Broadcast a scalar time (python number or 0-d tensor) to a ``(batch,)`` tensor."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t


def build_process(config: dict[str, Any]) -> DiffusionProcess:
    """The process of a ``{"class_path": ..., "init_args": ...}`` config (:attr:`DiffusionProcess.config`). Only
    ``diffproc``'s own modules are imported on demand; a process class elsewhere must be imported first."""
    path = str(config.get("class_path", ""))
    module_name, _, name = path.rpartition(".")
    if module_name.split(".")[0] == "diffproc":
        importlib.import_module(module_name)
    module = sys.modules.get(module_name)
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, DiffusionProcess)):
        raise ValueError(f"process {path!r} is not an importable DiffusionProcess class (a class outside diffproc "
                         "must be imported before it is rebuilt from a config)")
    return cls(**dict(config.get("init_args") or {}))
