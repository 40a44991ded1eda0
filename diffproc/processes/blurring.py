"""Blurring diffusion (Hoogeboom & Salimans 2022, "Blurring Diffusion Models", arXiv 2209.05557) on the
diagonal-Gaussian core: heat dissipation (a blur) and additive Gaussian noise, diagonal in the DCT basis.

In coefficients ``u = Vᵀ x`` of the orthonormal 2-D DCT-II (``diffproc.ops.SeparableBasis.dct``, the basis
``blur.py`` uses), per frequency ``(k, l)`` of an ``H x W`` image (paper §3-4 and its appendix pseudo-code)::

    u_t = α_t ⊙ u_0 + σ_t ε,           α_t = a_t · d_t,       σ_t one scalar per time (isotropic noise)
    d_t = (1 − d_min) exp(−λ τ_t) + d_min                       frequency scaling, d_min = ``min_scale``
    λ_kl = π² (k²/H² + l²/W²)                                   squared DCT frequencies (ops.dct_frequencies)
    τ_t = σ_B(t)² / 2,   σ_B(t) = σ_B,max sin²(π t / 2)         dissipation time of a blur of std σ_B px
    a_t = cos φ_t,  σ_t = sin φ_t,  φ_t = φ_0 + (φ_1 − φ_0) t    the cosine schedule with its log-SNR clipped to
        [logsnr_min, logsnr_max]: φ_0 = arctan e^{−logsnr_max/2}, φ_1 = arctan e^{−logsnr_min/2}

(the appendix writes the cosine part as ``logsnr = −2 log tan(φ_t)``, ``a = √sigmoid(logsnr)``,
``σ = √sigmoid(−logsnr)``, which is ``cos φ_t``, ``sin φ_t``). Derivatives, for the probability-flow ODE::

    a' = −σ_t φ',  σ' = a_t φ',  φ' = φ_1 − φ_0;   τ' = σ_B,max² π sin³(πt/2) cos(πt/2)
    d' = −(1 − d_min) λ τ' exp(−λ τ_t);             α' = a' d_t + a_t d'

Time: continuous ``t ∈ [0, 1]``. ``t = 0`` is clean up to the clipped log-SNR: ``d_0 = 1``, ``α_0 = cos φ_0``,
``σ_0 = sin φ_0 ≈ 6.7e-3`` (log-SNR 10). Training draws ``t ~ U[0, 1]`` and regresses ε (the paper's loss; the
core's ``eps`` target in pixels, which equals the DCT-domain ε since the basis is orthonormal). The network sees
``time_scale · t``.

Sampling: ``ancestral`` is the paper's ``denoise`` step: its σ²_denoise = (1/σ_s² + α_ts²/σ²_ts)⁻¹ = σ²_ts σ_s²/σ_t²
and its mean coefficients are the core's fixed-small posterior; the paper walks ``t = 1, 1 − 1/T, …, 0`` and
returns the state at ``t = 0`` (no extra denoising step), as :meth:`timesteps` does. Its δ = 1e-8 guards are left
out: they guard divisions by quantities that never vanish here (σ_t ≥ σ_0 > 0, σ²_ts > 0 for s < t) and move a
step by < 2e-3 (last steps, where σ²_ts ~ 1e-5; tests/test_blurring.py). ``ddim``, the PF-ODE solvers
(euler/heun/midpoint/rk4, through :meth:`alpha_sigma_dot`) and the DPM-Solver++ family run on the same grids
(extensions, not in the paper).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffproc.ops import SeparableBasis, dct_frequencies
from diffproc.processes.base import MULTISTEP_SOLVERS, ODE_SOLVERS, Denoiser
from diffproc.processes.rng import rand
from diffproc.processes.gaussian import GaussianProcess


class BlurringDiffusionProcess(GaussianProcess):
    """Blurring diffusion (module doc). The DCT basis and the frequency grid λ are built for the image geometry
    given to :meth:`set_geometry` (``DiffusionModule`` passes its data's).

    Args:
        sigma_blur_max: σ_B,max, the largest blur std in pixels (20, the value used with the paper's 32x32 pseudo-code).
        min_scale: d_min, the floor of the frequency scaling (paper: 0.001), so that α_t > 0 for every frequency.
        logsnr_min, logsnr_max: clipping of the cosine schedule's log-SNR (paper: −10, 10).
        time_scale: the backbone sees ``time_scale · t`` (1000; ours: diffusers' sinusoidal embedding needs a
            DDPM-like range, the paper does not say how its network embeds t).
        default_steps: steps of the grid when a sampler names no ``num_steps`` (the paper's T = 1000).
        clip_x0: clip x̂0 to [-1, 1] inside reverse steps (the paper's pseudo-code does not: off).
        default_solver: ``ancestral`` (the paper's sampler), ``ddim``, an ODE solver or a DPM-Solver++ one.

    ``α_t`` is returned as a ``(B, H, W)`` grid and ``σ_t`` as ``(B, 1, 1)`` (one value per time, kept at the
    grid's rank so that it broadcasts against α in the core's posterior).
    """

    solvers = ("ancestral", "ddim", *ODE_SOLVERS, *MULTISTEP_SOLVERS)

    def __init__(self, sigma_blur_max: float = 20.0, min_scale: float = 0.001, logsnr_min: float = -10.0,
                 logsnr_max: float = 10.0, time_scale: float = 1000.0, default_steps: int = 1000,
                 clip_x0: bool = False, default_solver: str = "ancestral") -> None:
        super().__init__(clip_x0=clip_x0)
        if default_solver not in self.solvers:
            raise ValueError(f"default_solver must be one of {self.solvers}, got {default_solver!r}")
        if sigma_blur_max < 0 or not 0.0 < min_scale <= 1.0:
            raise ValueError(f"need sigma_blur_max >= 0 and 0 < min_scale <= 1; got sigma_blur_max={sigma_blur_max}, "
                             f"min_scale={min_scale}")
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
            raise ValueError(f"need finite logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        if int(default_steps) < 1:
            raise ValueError(f"default_steps must be >= 1, got {default_steps}")
        self.default_solver = default_solver
        self.sigma_blur_max, self.min_scale = float(sigma_blur_max), float(min_scale)
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.time_scale, self.default_steps = float(time_scale), int(default_steps)
        #: φ_0, φ_1: the angles of the clipped cosine schedule at t = 0 and t = 1
        self.phi_0 = math.atan(math.exp(-0.5 * self.logsnr_max))
        self.phi_1 = math.atan(math.exp(-0.5 * self.logsnr_min))
        self.image_size: tuple[int, int] | None = None
        #: λ, the (H, W) float64 grid of squared DCT frequencies (:meth:`set_geometry`)
        self.freqs: Tensor | None = None
        self._freqs: dict[str, Tensor] = {}

    def set_geometry(self, image_size: int | tuple[int, int], channels: int) -> "BlurringDiffusionProcess":
        """The DCT basis and λ grid for ``image_size`` (H = W, or ``(H, W)``); ``channels`` is not used (every
        channel is blurred alike)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(h), int(w))
        self.basis = SeparableBasis.dct(int(h), int(w))
        self.freqs = dct_frequencies(int(h), int(w))
        self._freqs = {}
        return self

    def _lambda(self, device: torch.device) -> Tensor:
        if self.freqs is None:
            raise ValueError("BlurringDiffusionProcess has no image geometry yet: call set_geometry(image_size, "
                             "channels) (DiffusionModule does it with the data's image_size and channels)")
        key = str(device)
        if key not in self._freqs:  # per-device copy: no host sync in the training hot path
            self._freqs[key] = self.freqs.to(device)
        return self._freqs[key]

    # --- schedule -------------------------------------------------------------------------------
    def dissipation_time(self, t: Tensor) -> Tensor:
        """τ_t = σ_B(t)²/2 with σ_B(t) = σ_B,max sin²(πt/2), float64 ``(B,)``."""
        return 0.5 * (self.sigma_blur_max * torch.sin(0.5 * math.pi * t.to(torch.float64)) ** 2) ** 2

    def frequency_scaling(self, t: Tensor) -> Tensor:
        """d_t = (1 − d_min) exp(−λ τ_t) + d_min, float64 ``(B, H, W)``."""
        tau = self.dissipation_time(t).view(-1, 1, 1)
        return (1.0 - self.min_scale) * torch.exp(-self._lambda(t.device) * tau) + self.min_scale

    def noise_scaling(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, σ_t) = (cos φ_t, sin φ_t)``, the clipped cosine schedule, float64 ``(B,)`` each."""
        phi = self.phi_0 + (self.phi_1 - self.phi_0) * t.to(torch.float64)
        return torch.cos(phi), torch.sin(phi)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α_t = a_t d_t ``(B, H, W)`` and σ_t ``(B, 1, 1)``, float64."""
        a, s = self.noise_scaling(t)
        return a.view(-1, 1, 1) * self.frequency_scaling(t), s.view(-1, 1, 1)

    def alpha_sigma_dot(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α'_t, σ'_t) of the module doc, float64 ``(B, H, W)`` and ``(B, 1, 1)``."""
        t = t.to(torch.float64)
        a, s = (x.view(-1, 1, 1) for x in self.noise_scaling(t))
        dphi = self.phi_1 - self.phi_0
        sn, cs = torch.sin(0.5 * math.pi * t), torch.cos(0.5 * math.pi * t)
        dtau = (self.sigma_blur_max**2 * math.pi * sn**3 * cs).view(-1, 1, 1)
        lam = self._lambda(t.device)
        decay = (1.0 - self.min_scale) * torch.exp(-lam * self.dissipation_time(t).view(-1, 1, 1))
        d, dd = decay + self.min_scale, -lam * dtau * decay
        return -s * dphi * d + a * dd, a * dphi

    def model_time(self, t: Tensor) -> Tensor:
        """``time_scale · t``."""
        return (t.to(torch.float64) * self.time_scale).float()

    # --- training and sampling ------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """t ~ U[0, 1] (the paper's loss), float64."""
        return rand((batch,), generator, device, torch.float64)

    def timesteps(self, num_steps: int | None = None) -> list[float]:
        """Descending ``[1, 1 − 1/S, …, 1/S, 0]`` (``S = num_steps``, default ``default_steps``): the paper's grid."""
        S = int(num_steps or self.default_steps)
        if S < 1:
            raise ValueError(f"num_steps must be >= 1, got {S}")
        return [k / S for k in range(S, -1, -1)]

    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """The core's ``ancestral`` (the paper's ``denoise``) or ``ddim`` step (float64 times)."""
        solver = solver or self.default_solver
        if solver in ODE_SOLVERS:
            raise ValueError(f"{solver!r} integrates the probability-flow ODE: run it with "
                             "diffproc.samplers.sample_loop, not reverse_step")
        return super().reverse_step(denoiser, z_t, t, t_next, solver=solver, generator=generator, ddim_eta=ddim_eta)
