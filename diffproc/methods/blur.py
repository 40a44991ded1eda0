"""Blur diffusion (Lee, Chung, Kim, Ye 2022): coarse-to-fine generation with frequency-dependent noise.

Algorithm box: train the ε-network with ``eps_simple`` (pixel-space ε, paper eq. 18) on
``x_i = Mᵀ[sqrt(Ā_i) ⊙ M x0 + sqrt(1 − Ā_i) ⊙ M ε]``; sample with the paper's reverse-diffusion sampler
(``solver: official``, N−1 steps) or, as our extension, strided ``ddim``/``ancestral`` steps.
All of it lives in :class:`~diffproc.processes.blur.BlurProcess` (spec methods_blur_sie_baselines.md §4);
this class only names the knobs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from diffproc.methods.base import DiffusionModule
from diffproc.processes.blur import BlurProcess


class BlurDiffusion(DiffusionModule):
    """Blur diffusion.

    Args:
        num_timesteps: N (1000). schedule/beta_start/beta_end: β_i (linear 1e-4..0.02).
        beta_schedule: former name of ``schedule`` (deprecated, still accepted for one release).
        f_type: blur schedule f(i): ``quartic`` (paper's best), linear, log, quadratic, cubic, triangular.
        sig: unit blur σ in px (0.4). sig_min, sig_max: f(1) = (sig_min/sig)², f(N) = (sig_max/sig)²
            (paper Table 1 "f(N)=0.14" = sig_max 0.15; sig_max = 0 is plain DDPM).
        basis: ``dct`` (Neumann DCT, default) or ``toeplitz_eig`` (official code's basis).
        kernel: spectrum ``sampled`` (official-like) or ``heat``.
        invert_spectrum: fine-to-coarse ablation (D → 1 − D).
        data_range: ``zero_one`` (official code) or ``minus_one_one``.
        official_layout_quirk: reproduce the official channel-layout bug (off; spec §0 finding 2).
        prediction: ``eps`` (paper). variance, eta, spacing: strided ``ancestral``/``ddim`` extensions.
        clip_x0: clip x̂0 to the data range in ``ancestral``/``ddim`` steps (the official sampler never clips).
        image_size, channels: linked from the DataModule by the CLI.
        **kwargs: the shared options of :class:`DiffusionModule` (backbone, optimiser, EMA, sampling).
    """

    def __init__(self, num_timesteps: int = 1000, schedule: Literal["linear", "cosine"] = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 f_type: Literal["linear", "log", "quadratic", "cubic", "quartic", "triangular"] = "quartic",
                 sig: float = 0.4, sig_min: float = 0.0, sig_max: float = 0.15,
                 basis: Literal["dct", "toeplitz_eig"] = "dct", kernel: Literal["sampled", "heat"] = "sampled",
                 invert_spectrum: bool = False, data_range: Literal["zero_one", "minus_one_one"] = "zero_one",
                 official_layout_quirk: bool = False, prediction: Literal["eps", "x0", "v"] = "eps",
                 variance: Literal["fixedsmall", "fixedlarge"] = "fixedsmall", eta: float = 0.0,
                 spacing: Literal["uniform", "quad"] = "uniform", clip_x0: bool = True,
                 image_size: int = 32, channels: int = 3,
                 beta_schedule: Optional[Literal["linear", "cosine"]] = None, **kwargs: Any) -> None:
        process = BlurProcess(image_size=image_size, channels=channels, num_timesteps=num_timesteps,
                              schedule=schedule, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=beta_schedule,
                              f_type=f_type, sig=sig, sig_min=sig_min, sig_max=sig_max, basis=basis,
                              kernel=kernel, invert_spectrum=invert_spectrum, data_range=data_range,
                              official_layout_quirk=official_layout_quirk, prediction=prediction,
                              variance=variance, eta=eta, spacing=spacing, clip_x0=clip_x0)
        super().__init__(process=process, image_size=image_size, channels=channels, **kwargs)
