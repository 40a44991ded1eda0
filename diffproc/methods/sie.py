"""SIE (Zhang, Ehinger, Drummond, ACML 2023): sinusoidal interpolation ``x_t = cos η x0 + sin η ε``, one
UNet with two heads ``[x̂0 | ε̂]`` (2C output channels), loss ``‖x̂0−x0‖² + ‖ε̂−ε‖² + γ‖v̂−v‖²`` (eq. 12)
and sampling by integrating ``dx/dη = v̂`` (eq. 11) with Euler (eq. 13), RK2 or RK4.

All of it lives in :class:`~diffproc.processes.interpolation.InterpolationProcess` and
:mod:`diffproc.samplers`; this class names the paper's knobs (and the Table-2 ablation switches).
The loss terms are logged separately as ``train/loss_x0``, ``train/loss_eps``, ``train/loss_v``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from diffproc.methods.base import DiffusionModule
from diffproc.processes.interpolation import InterpolationProcess


class SIE(DiffusionModule):
    """SIE and its Table-2 ablations.

    Args:
        num_timesteps: T of the paper's integer grid (1000); the UNet sees ``T·t``.
        schedule: ``sin`` (paper), ``beta_star`` (ablation "+β*"), ``linear`` (DDPM β, "DDIM + x̂0, ε̂").
        heads: ``dual`` (paper: 2C outputs [x̂0 | ε̂]) or one head ``eps``/``x0``/``v``.
        gamma: weight of the derivative loss (paper: unreported; default 1.0, 0 = "+x̂0, ε̂" rows).
        gradient_wrt: derivative w.r.t. ``eta`` (default; O(1) term) or integer ``t`` (literal eq. 10,
            η' = π/(2T), makes the term ~2.5e-6× smaller).
        loss_norm: ``l2`` (default, DDIM-code MSE) or ``l1``.
        time_sampling: ``continuous`` t ~ U[0,1] (default; RK stages need fractional and t=0 times) or
            ``discrete`` t ~ U{1..T}/T (DDIM's law, for the DDIM-grid ablation rows).
        spacing: sampling grid ``linspace`` (S uniform steps in η; default) or DDIM's ``uniform``/``quad``
            sub-sequences (needed by single ε-head rows; ``ddim_uniform``/``ddim_quad`` are their former,
            deprecated names).
        clip_x0: clip x̂0 inside steps (default False: DDIM code does not; keeps the ODE smooth).
        eps_min_cos: floor on cos η when converting a single ε head to x̂0.
        max_beta: β* clipping (0.999). beta_start, beta_end: the ``linear`` schedule.
        **kwargs: shared options of :class:`DiffusionModule`; ``solver`` is one of ``euler``
            (default, eq. 13), ``heun``, ``midpoint``, ``rk4``, ``ddim_dual``, ``ddim``, ``ancestral``;
            ``num_steps`` counts steps (NFE = steps × 1/2/2/4 for euler/heun/midpoint/rk4).
    """

    def __init__(self, num_timesteps: int = 1000,
                 schedule: Literal["sin", "beta_star", "linear"] = "sin",
                 heads: Literal["dual", "eps", "x0", "v"] = "dual", gamma: float = 1.0,
                 gradient_wrt: Literal["eta", "t"] = "eta", loss_norm: Literal["l2", "l1"] = "l2",
                 time_sampling: Literal["continuous", "discrete"] = "continuous",
                 spacing: Literal["linspace", "uniform", "quad", "ddim_uniform", "ddim_quad"] = "linspace",
                 clip_x0: bool = False, eps_min_cos: float = 1e-4, max_beta: float = 0.999,
                 beta_start: float = 1e-4, beta_end: float = 0.02, **kwargs: Any) -> None:
        process = InterpolationProcess(
            num_timesteps=num_timesteps, schedule=schedule, heads=heads, gamma=gamma,
            gradient_wrt=gradient_wrt, loss_norm=loss_norm, time_sampling=time_sampling,
            spacing=spacing, clip_x0=clip_x0, eps_min_cos=eps_min_cos, max_beta=max_beta,
            beta_start=beta_start, beta_end=beta_end)
        super().__init__(process=process, **kwargs)

    def compute_loss(self, x: Tensor, net: nn.Module, generator: Optional[torch.Generator] = None) -> Tensor:
        """Eq. 12; logs the individual terms during training."""
        terms = self.process.loss_terms(self.model_fn(net), self.process.to_domain(x), generator=generator)
        if self.training and self._trainer is not None:
            for name, value in terms.items():
                if name != "loss":
                    self.log(f"train/loss_{name}", value.detach())
        return terms["loss"]
