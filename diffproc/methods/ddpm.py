"""DDPM / DDIM baseline (Ho et al. 2020; Song et al. 2021): image-space Gaussian diffusion.

Algorithm box: train with ``L_simple`` on ``x_t = sqrt(ᾱ_t) x0 + sqrt(1−ᾱ_t) ε`` (Alg. 1); sample
ancestrally over all T steps (Alg. 2) or with DDIM(η) on a sub-sequence of ``num_steps``.
All of it lives in :class:`~diffproc.processes.ddpm.DDPMProcess`; this class only names the knobs.
"""

from __future__ import annotations

from typing import Any, Literal

from diffproc.methods.base import DiffusionModule
from diffproc.processes.ddpm import DDPMProcess


class DDPM(DiffusionModule):
    """DDPM/DDIM.

    Args:
        num_timesteps: T. schedule: ``linear`` (β 1e-4..0.02) or ``cosine``.
        prediction: ``eps`` (paper), ``x0`` or ``v``.
        variance: ancestral variance ``fixedsmall`` (β̃, LSUN/CelebA-HQ) or ``fixedlarge`` (β, CIFAR-10).
        eta: DDIM η (0 = deterministic). spacing: DDIM sub-sequence ``uniform`` or ``quad``.
        clip_x0: clip x̂0 to [-1, 1] in reverse steps (DDPM's ``clip_denoised``).
        **kwargs: the shared options of :class:`DiffusionModule` (backbone, optimiser, EMA, sampling).
    """

    def __init__(self, num_timesteps: int = 1000, schedule: Literal["linear", "cosine"] = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction: Literal["eps", "x0", "v"] = "eps",
                 variance: Literal["fixedsmall", "fixedlarge"] = "fixedsmall", eta: float = 0.0,
                 spacing: Literal["uniform", "quad"] = "uniform", clip_x0: bool = True,
                 **kwargs: Any) -> None:
        process = DDPMProcess(num_timesteps=num_timesteps, schedule=schedule, beta_start=beta_start,
                              beta_end=beta_end, prediction=prediction, variance=variance, eta=eta,
                              spacing=spacing, clip_x0=clip_x0)
        super().__init__(process=process, **kwargs)
