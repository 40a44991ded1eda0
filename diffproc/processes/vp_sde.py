"""The continuous-time variance-preserving SDE (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", Eq. 11) on the Gaussian core.

Time convention: continuous ``t ∈ [0, 1]``; ``t = 0`` is clean data. The forward SDE, written as in Pierret &
Galerne (ICML 2025, "Diffusion models for Gaussian distributions: exact solutions and Wasserstein errors")::

    dx = −β_t x dt + √(2 β_t) dw,        β_t = (β_min + t (β_max − β_min)) / 2

i.e. score_sde's VP ``dx = −½ β̄_t x dt + √β̄_t dw`` with ``β̄_t = β_min + t (β_max − β_min)`` (β_min 0.1,
β_max 20), so ``β_t = 0.05 + 9.95 t`` by default. Its marginal is ``x_t = α_t x_0 + σ_t ε`` with::

    B(t) = ∫_0^t β_s ds = (β_min t + (β_max − β_min) t² / 2) / 2
    α_t = exp(−B(t)),   σ_t² = 1 − α_t²
    α'_t = −β_t α_t,     σ'_t = β_t α_t² / σ_t

``alpha_sigma_dot`` gives the probability-flow ODE ``dx/dt = α' x̂0 + σ' ε̂ = −β_t x + β_t ε̂/σ_t`` (Song et
al. Eq. 13) to the generic solvers (euler/heun/midpoint/rk4 in ``diffproc.samplers``), and
``euler_maruyama`` is the reverse SDE's EM step (:func:`~diffproc.processes.gaussian.gaussian_reverse_sde_step`).

Grid (:meth:`VPSDEProcess.timesteps`, Pierret & Galerne's, score_sde's truncation): ``S`` steps on
``t_k = eps + (1 − eps) k / S``, ``k = S … 0``, i.e. ``N = S + 1`` points from 1 down to ``eps`` (1e-3): the
sampler stops at ``t = eps`` and returns that state (no extra denoising step).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffproc.processes.base import MULTISTEP_SOLVERS, ODE_SOLVERS, Denoiser, batch_times, continuous_time
from diffproc.processes.gaussian import (Basis, GaussianProcess, Variance,
                                         gaussian_reverse_sde_step)
from diffproc.processes.rng import rand


class VPSDEProcess(GaussianProcess):
    """The VP SDE (module doc) as a diagonal Gaussian process with scalar ``α_t``, ``σ_t``.

    Args:
        beta_min, beta_max: score_sde's β̄ range (0.1, 20); the drift uses ``β_t = β̄_t / 2``.
        eps: truncation time: training times are ``U[eps, 1]`` and sampling grids end at ``eps`` (1e-3,
            score_sde's and Pierret & Galerne's).
        default_steps: steps of the grid when a sampler names no ``num_steps`` (999: N = 1000 points).
        time_scale: the backbone sees ``time_scale · t`` (999: score_sde's continuous-time VP labels).
        default_solver: ``euler_maruyama`` (reverse SDE), an ODE solver, ``ancestral`` or ``ddim``.
        variance, clip_x0, loss_reduction, basis: see :class:`GaussianProcess`. With an
            exact analytic denoiser on unbounded data pass ``clip_x0=False``.

    ``prior`` draws ``N(0, I)``, the usual approximation of ``p_1``; the exact ``p_1`` of data with
    covariance Σ is ``N(0, α_1² Σ + σ_1² I)`` (``α_1 ≈ 6.7e-3`` by default): pass a draw of it as ``z_init``.
    """

    solvers = ("euler_maruyama", *ODE_SOLVERS, "ancestral", "ddim", *MULTISTEP_SOLVERS)
    default_solver = "euler_maruyama"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3,
                 default_steps: int = 999, time_scale: float = 999.0,
                 variance: Variance = "fixedsmall", clip_x0: bool = True,
                 loss_reduction: Literal["mean", "sum"] = "mean", basis: Basis | None = None,
                 default_solver: str = "euler_maruyama") -> None:
        super().__init__(basis=basis, variance=variance,
                         clip_x0=clip_x0, loss_reduction=loss_reduction)
        if default_solver not in self.solvers:
            raise ValueError(f"default_solver must be one of {self.solvers}, got {default_solver!r}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if beta_min < 0 or beta_max < beta_min:
            raise ValueError(f"need 0 <= beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        if int(default_steps) < 1:
            raise ValueError(f"default_steps must be >= 1, got {default_steps}")
        self.default_solver = default_solver
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.eps = float(eps)
        self.default_steps = int(default_steps)
        self.time_scale = float(time_scale)

    # --- schedule -------------------------------------------------------------------------------
    def beta(self, t: Tensor) -> Tensor:
        """``β_t = (β_min + t (β_max − β_min)) / 2`` (float64)."""
        t = t.to(torch.float64)
        return 0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``B(t) = ∫_0^t β_s ds = (β_min t + (β_max − β_min) t²/2) / 2`` (float64)."""
        t = t.to(torch.float64)
        return 0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``α_t = exp(−B(t))``, ``σ_t = √(1 − exp(−2B(t)))`` (float64; ``expm1`` keeps σ exact near 0)."""
        b = self.integrated_beta(t)
        return torch.exp(-b), torch.sqrt(-torch.expm1(-2.0 * b))

    def alpha_sigma_dot(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(α'_t, σ'_t) = (−β_t α_t, β_t α_t² / σ_t)`` (float64; σ' is infinite at t = 0)."""
        a, s = self.alpha_sigma(t)
        beta = self.beta(t)
        return -beta * a, beta * a * a / s

    def model_time(self, t: Tensor) -> Tensor:
        """``time_scale · t`` (score_sde feeds 999 t to its VP networks)."""
        return (t.double() * self.time_scale).float()

    # --- training -------------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """``t ~ U[eps, 1]`` (score_sde's continuous-time training), float64."""
        u = rand((batch,), generator, device, torch.float64)
        return self.eps + (1.0 - self.eps) * u

    # --- sampling -------------------------------------------------------------------------------
    def timesteps(self, num_steps: int | None = None) -> list[float]:
        """Descending ``[t_S, …, t_0]`` with ``t_k = eps + (1 − eps) k / S`` (``S = num_steps``, default
        ``default_steps``): ``S + 1`` points from 1 to ``eps`` (Pierret & Galerne's N = S + 1)."""
        S = int(num_steps or self.default_steps)
        if S < 1:
            raise ValueError(f"num_steps must be >= 1, got {S}")
        return [self.eps + (1.0 - self.eps) * k / S for k in range(S, -1, -1)]

    def ode_timesteps(self, num_steps: int | None = None) -> list[float]:
        """The probability-flow ODE grid (the same as :meth:`timesteps`)."""
        return self.timesteps(num_steps)

    def reverse_sde_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, noise: Tensor) -> Tensor:
        """Euler–Maruyama step of the reverse SDE ``dx = [−β_t x − 2β_t ∇log p_t] dt + √(2β_t) dw̄`` with the
        given standard-normal ``noise`` (:func:`gaussian_reverse_sde_step`)::

            x_next = x + h β_t (x − 2 ε̂/σ_t) + √(2 β_t h) noise,     h = t − t_next
        """
        B, dev = z_t.shape[0], z_t.device
        tb = batch_times(torch.as_tensor(t, dtype=torch.float64), B, dev)
        sb = batch_times(torch.as_tensor(t_next, dtype=torch.float64), B, dev)
        return gaussian_reverse_sde_step(self, denoiser, z_t, tb, sb, noise)

    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """``euler_maruyama`` (:meth:`reverse_sde_step`, noise from ``generator`` through
        :meth:`noise_like`), else the core's ``ancestral``/``ddim`` on the continuous grid. ODE solvers are
        not single reverse steps: run them with :func:`diffproc.samplers.sample_loop`."""
        solver = solver or self.default_solver
        if solver == "euler_maruyama":
            return self.reverse_sde_step(denoiser, z_t, t, t_next, self.noise_like(z_t, generator))
        if solver in ODE_SOLVERS:
            raise ValueError(f"{solver!r} integrates the probability-flow ODE: run it with "
                             "diffproc.samplers.sample_loop (or ode_sample), not reverse_step")
        if solver not in self.solvers:
            raise ValueError(f"unknown solver {solver!r} for {type(self).__name__}; choose one of {self.solvers}")
        return super().reverse_step(denoiser, z_t, continuous_time(t), continuous_time(t_next), solver=solver,
                                    generator=generator, ddim_eta=ddim_eta)
