"""DDPM (Ho, Jain, Abbeel 2020) and DDIM (Song, Meng, Ermon 2021) on the Gaussian core.

Time convention: discrete ``t ∈ {0, …, T}``; ``t = 0`` is clean data, ``t = T`` the last noisy step
(paper indexing: ``ᾱ_t = Π_{s≤t}(1 − β_s)``, ``ᾱ_0 = 1``). The backbone receives ``t`` as a float.
Spec: methods_blur_sie_baselines.md §2 (DDPM) and §3 (DDIM).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffproc.processes.gaussian import Basis, GaussianProcess, Variance

Schedule = Literal["linear", "cosine"]
Spacing = Literal["uniform", "quad"]


def make_betas(kind: Schedule, num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> Tensor:
    """β_1..β_T in float64: ``linear`` (DDPM §4) or ``cosine`` (Nichol & Dhariwal 2021, Eq. 17,
    β clipped at 0.999)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_bar = f / f[0]
        return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; choose 'linear' or 'cosine'")


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: Spacing = "uniform") -> list[int]:
    """DDIM sub-sequence as 1-based times, descending, ending with 0 (clean).

    ``uniform``: 0-based τ = ``i·T//S`` (= ``range(0, T, T//S)`` when S divides T; never starts at T).
    ``quad``: τ = ``int(linspace(0, sqrt(0.8 T), S)²)`` (DDIM's CIFAR-10 choice; may repeat a time
    for large S, as the official code does).
    """
    T, S = num_timesteps, num_steps
    if S >= T:
        return list(range(T, -1, -1))
    if S < 1:
        raise ValueError(f"num_steps must be >= 1, got {S}")
    if spacing == "uniform":
        taus = (np.arange(S) * T) // S
    elif spacing == "quad":
        taus = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(int)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose 'uniform' or 'quad'")
    return [int(x) + 1 for x in taus[::-1]] + [0]


class DDPMProcess(GaussianProcess):
    """Variance-preserving discrete diffusion: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` (DDPM Eq. 4).

    Args:
        num_timesteps: T (1000 in DDPM/DDIM).
        schedule: ``linear`` β from ``beta_start`` to ``beta_end`` (1e-4..0.02) or ``cosine``.
        spacing: sub-sequence for fewer sampling steps: ``uniform`` or ``quad`` (DDIM's; the same
            values every process uses, plus ``linspace`` for continuous-time processes).
        variance, clip_x0, loss_reduction, basis: see :class:`GaussianProcess`.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: Schedule = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 variance: Variance = "fixedsmall", spacing: Spacing = "uniform",
                 clip_x0: bool = True, loss_reduction: Literal["mean", "sum"] = "mean",
                 basis: Basis | None = None, default_solver: str = "ancestral") -> None:
        super().__init__(basis=basis, variance=variance,
                         clip_x0=clip_x0, loss_reduction=loss_reduction)
        if default_solver not in self.solvers:
            raise ValueError(f"default_solver must be one of {self.solvers}, got {default_solver!r}")
        self.default_solver = default_solver
        self.num_timesteps = int(num_timesteps)
        self.spacing = spacing
        self.betas = make_betas(schedule, self.num_timesteps, beta_start, beta_end)
        ab = torch.cumprod(1.0 - self.betas, 0)
        #: ᾱ_t for t = 0..T (index 0 = clean, ᾱ_0 = 1), float64
        self.alphas_bar = torch.cat([torch.ones(1, dtype=torch.float64), ab])
        self._tables: dict[str, Tensor] = {}

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = str(t.device)
        if key not in self._tables:  # per-device copy: no host sync in the training hot path
            self._tables[key] = self.alphas_bar.to(t.device)
        ab = self._tables[key][t.long()]
        return ab.sqrt(), (1.0 - ab).sqrt()

    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """t ~ U{1, …, T} (DDPM Algorithm 1)."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(1, self.num_timesteps + 1, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def timesteps(self, num_steps: int | None = None) -> list[int]:
        return ddim_timesteps(self.num_timesteps, num_steps or self.num_timesteps, self.spacing)
