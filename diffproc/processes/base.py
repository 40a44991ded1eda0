"""The process API every forward process implements (DESIGN.md, "The three layers").

A process is pure tensor math. It never sees an ``nn.Module``: the network reaches it only as a
:class:`Denoiser`, ``denoiser(z_t, t) -> (û0, ε̂)`` where ``t`` is a ``(B,)`` tensor in the process's own time
convention: the estimates of the clean state and of the noise, in the process's basis coefficients. How a network's
output becomes that pair (eps, x0, v, σε heads, SIE's two heads, GDDM's per-mode EDM preconditioning) is the
preconditioning layer's business (:mod:`diffproc.nets.precond`), not the process's. That is what lets tests drive a
process with an analytic denoiser.

Randomness (per-sample seeds and generators, the noise draws) is in :mod:`diffproc.processes.rng`. Room
``processes``: imports ``ops`` and torch only, never ``samplers``, ``nets``, ``methods`` or Lightning.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

#: a raw network as the preconditioning layer calls it: ``net_fn(input, t) -> output``
NetFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser(Protocol):
    """What a process sees of the network: ``denoiser(z_t, t) -> (û0, ε̂)``, the clean-state and noise estimates in
    the process's basis coefficients (work dtype), and ``error(z_t, t, z0, noise)``, the per-element training error of
    its head (:class:`diffproc.nets.precond.Denoiser`; an analytic test denoiser needs only ``__call__`` unless it is
    trained)."""

    def __call__(self, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def error(self, z_t: Tensor, t: Tensor, z0: Tensor, noise: Tensor) -> Tensor: ...

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

    #: names of the preconditioning heads this process takes (:mod:`diffproc.nets.precond`; None: any), and the one
    #: used when a module names none
    heads: tuple[str, ...] | None = None
    default_head: str = "eps"

    def check_head(self, name: str) -> None:
        """Refuse, with ``ValueError``, a head this process cannot use (default: one outside :attr:`heads`)."""
        if self.heads is not None and name not in self.heads:
            raise ValueError(f"{type(self).__name__} takes the heads {list(self.heads)}, not {name!r}: set "
                             "model.init_args.precond to one of them (diffproc.nets.precond)")

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
    def loss(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The paper's training objective (a scalar)."""

    def loss_terms(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss": objective, <term>: value, ...}``: the objective and its parts (logged as
        ``train/loss_<term>``); default: the objective alone."""
        return {"loss": self.loss(denoiser, z0, t, noise, generator)}

    # --- sampling -----------------------------------------------------------------------------
    @abstractmethod
    def timesteps(self, num_steps: int | None = None) -> list:
        """Descending time grid ``[t_N, ..., t_0]`` visited by the sampler (``num_steps`` steps)."""

    @abstractmethod
    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """A draw from the terminal distribution at ``timesteps()[0]``."""

    @abstractmethod
    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """One step of the reverse process from time ``t`` to ``t_next`` (< t); ``ddim_eta``: the ``ddim`` solver's
        stochasticity (ignored by the other solvers)."""



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


def continuous_time(t):
    """A time of a continuous-time process as the core's reverse step takes it: a Python number as a float (float64
    there, and read on the host: no accelerator sync), a tensor as it is."""
    return float(t) if isinstance(t, (int, float)) else t


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
