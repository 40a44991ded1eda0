"""The process API every forward process implements (DESIGN.md, "The three layers").

A process is pure tensor math. It never sees an ``nn.Module``: the network reaches it only as
``model_fn(z_t, t) -> Tensor`` where ``t`` is a ``(B,)`` float tensor in the process's own time
convention. That is what lets tests drive a process with an analytic denoiser.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]

#: probability-flow ODE solvers (run by ``diffproc.samplers.sample_loop`` through the ODE protocol)
ODE_SOLVERS: tuple[str, ...] = ("euler", "heun", "midpoint", "rk4")


class DiffusionProcess(ABC):
    """Forward process q(z_t | z_0) plus its training loss and reverse steps."""

    #: names accepted by :meth:`reverse_step` (``solver`` argument)
    solvers: tuple[str, ...] = ()
    #: solver used when the caller does not name one
    default_solver: str = ""

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
                     generator: torch.Generator | None = None) -> Tensor:
        """One step of the reverse process from time ``t`` to ``t_next`` (< t)."""


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``torch.randn_like`` that honours a generator (drawn on the generator's device, then moved)."""
    if generator is None:
        return torch.randn_like(x)
    gen_device = generator.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def batch_times(t, batch: int, device) -> Tensor:
    """Broadcast a scalar time (python number or 0-d tensor) to a ``(batch,)`` tensor."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t
