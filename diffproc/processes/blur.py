"""Blur diffusion (Lee, Chung, Kim, Ye 2022, "Progressive deblurring of diffusion models for
coarse-to-fine image synthesis") on the diagonal-Gaussian core.

Spec: methods_blur_sie_baselines.md §4 (and §0 findings 1-4, §1.2, §1.3). In coefficients ``u = M x`` of
an orthonormal separable basis, with ``D`` the (H, W) eigenvalue grid of a unit blur (σ = ``sig`` px)::

    a_i = (1 − β_i) D^{2 f(i)}          (official code ``Bs[i]``; the paper's A_i = I − B_i)
    b_i = 1 − a_i                        (paper B_i, per-step noise variance; paper eq. 6-8)
    Ā_i = Π_{j≤i} a_j = ᾱ_i D^{2 F(i)},   F(i) = Σ_{j≤i} f(j)
    u_i = sqrt(Ā_i) u_0 + sqrt(1 − Ā_i) ε_u            (α_i = sqrt(Ā_i), σ_i = sqrt(1 − Ā_i) per coefficient)

Time convention: discrete ``i ∈ {0, …, N}``, ``i = 0`` clean (``Ā_0 = 1``). Training draws
``i ~ U{1, …, N−1}`` as the official code (``i = N`` is never trained); the network gets ``i`` as a float.
The loss is the official ``eps_simple``: MSE to the *pixel-space* ε (paper eq. 18, λ(i) = 1).

Solvers:
- ``official``: the paper's reverse-diffusion sampler (eq. 19-20, App. A; §4.4), every step from ``N−1``
  down to 0 (N−1 NFEs)::

      u ← (2 − sqrt(a_i)) ⊙ u + b_i ⊙ s_u + 1[i > 2] sqrt(b_i) ⊙ z,   s_u = −(1 − Ā_i)^{−1/2} ⊙ M ε̂

  (no noise on the last two steps; the output is the state after ``i = 1``).
- ``ancestral`` / ``ddim`` (**extensions, not in the paper**): the core's per-coefficient DDPM posterior
  and DDIM(η) steps on the same α/σ grids, on strided sub-sequences of ``{1, …, N−1}`` (fewer steps).

Options beyond the paper's defaults: ``basis`` (``dct`` = Neumann DCT-II, the project default; or
``toeplitz_eig``, the official basis, §0 finding 1), ``kernel`` (``sampled`` official-like spectrum or
``heat``), ``invert_spectrum`` (the paper's fine-to-coarse ablation, Fig. 3: D → 1 − D),
``data_range`` (§0 finding 3) and ``official_layout_quirk`` (§0 finding 2, off by default).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffproc.ops import SeparableBasis, kernel_spectrum
from diffproc.processes.base import MULTISTEP_SOLVERS, Denoiser, batch_times, bcast
from diffproc.processes.ddpm import Spacing, ddim_timesteps
from diffproc.processes.ddpm import make_betas
from diffproc.processes.gaussian import GaussianProcess, Variance
from diffproc.processes.rng import randn, randn_like

FType = Literal["linear", "log", "quadratic", "cubic", "quartic", "triangular"]
F_TYPES: tuple[str, ...] = ("linear", "log", "quadratic", "cubic", "quartic", "triangular")
DataRange = Literal["zero_one", "minus_one_one"]


def blur_schedule(f_type: FType, num_timesteps: int, f_1: float, f_n: float) -> Tensor:
    """f(i) for i = 0..N as float64 (official ``ForwardBlurIncreasing``, spec §4.2 table).

    ``f_n = (sig_max/sig)²``, ``f_1 = (sig_min/sig)²``. ``f(N) = f_n`` for every type but ``triangular``;
    ``f(0)`` is never used (``F(i)`` sums from j = 1). ``log`` uses ``ln(i + 1e-6)/ln(N + 1e-6)`` (the
    code's ``a·log(i) + b``; its ``10 ln N`` factor cancels).
    """
    n = int(num_timesteps)
    if n < 2:
        raise ValueError(f"num_timesteps must be >= 2 for a blur schedule, got {num_timesteps}")
    i = torch.arange(n + 1, dtype=torch.float64)
    d = f_n - f_1

    def linear(x: Tensor) -> Tensor:
        return d / (n - 1) * (x - 1) + f_1

    if f_type == "linear":
        return linear(i)
    if f_type == "log":
        return d * torch.log(i + 1e-6) / math.log(n + 1e-6) + f_1
    if f_type == "quadratic":
        return d / (n**2 - 1) * (i**2 - 1) + f_1
    if f_type == "cubic":
        return d / n**3 * i**3 + f_1
    if f_type == "quartic":
        return d / n**4 * i**4 + f_1
    if f_type == "triangular":
        return torch.where(i < n / 2, linear(i), linear(n - i))
    raise ValueError(f"unknown f_type {f_type!r}; choose one of {F_TYPES}")


def cumulative_tables(f: Tensor, betas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(F, ᾱ, log(1 − β))`` for i = 0..N (float64) from f(0..N) and β_1..β_N: ``F(i) = Σ_{1≤j≤i} f(j)``,
    ``ᾱ_i = Π_{j≤i}(1 − β_j)`` with ``F(0) = 0``, ``ᾱ_0 = 1`` and ``log(1 − β_0) = 0``."""
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    return (torch.cat([zero, torch.cumsum(f[1:], 0)]), torch.cat([one, torch.cumprod(1.0 - betas, 0)]),
            torch.cat([zero, torch.log1p(-betas)]))


def official_layout_quirk(spectrum: Tensor, channels: int) -> Tensor:
    """The official code's channel-layout bug (§0 finding 2) as a ``(C, H, W)`` grid.

    Its coefficient vector is channel-interleaved (index ``C·k + c`` for frequency rank ``k``, channel
    ``c``) while ``D_diag = singulars.repeat(1, C)`` is channel-blocked, so coefficient ``(k, c)`` is scaled
    by ``s_sorted[(C·k + c) mod HW]`` instead of ``s_sorted[k]``. Ranks are the descending sort of the
    grid (stable; tied values, e.g. (k, l) and (l, k), may be ordered differently from ``torch.svd``'s
    sort in the official code, which changes which of two equal-D positions gets which value).
    """
    h, w = spectrum.shape
    flat = spectrum.reshape(-1)
    s_sorted, perm = torch.sort(flat, descending=True, stable=True)
    k = torch.arange(h * w, device=spectrum.device)
    out = torch.empty(channels, h * w, dtype=spectrum.dtype, device=spectrum.device)
    for c in range(channels):
        out[c, perm] = s_sorted[(channels * k + c) % (h * w)]
    return out.reshape(channels, h, w)


class BlurProcess(GaussianProcess):
    """Blur diffusion forward process and samplers (spec §4). The basis and spectrum are built for the image
    geometry given to :meth:`set_geometry` (``BlurProcess(...).set_geometry(image_size, channels)``).

    Args:
        num_timesteps: N (1000). schedule, beta_start, beta_end: β_i (linear 1e-4..0.02; §4.1).
        f_type: blur schedule f(i) (§4.2): linear, log, quadratic, cubic, quartic (paper), triangular.
        sig: σ of the unit blur in px (0.4). sig_min, sig_max: ``f(1) = (sig_min/sig)²``,
            ``f(N) = (sig_max/sig)²`` (paper: 0, 0.15 → f(N) = 0.140625 "0.14"); ``sig_max = 0`` is DDPM.
        basis: ``dct`` (Neumann DCT-II; default) or ``toeplitz_eig`` (official, §1.2).
        kernel: spectrum D — ``sampled`` (response of the official sampled kernel; for ``toeplitz_eig``
            its clamped eigenvalues) or ``heat`` (exp(−σ²|ω|²/2); for ``toeplitz_eig`` at the DST-I
            frequencies π(k+1)/(n+1) of its eigenvectors — our choice, the code has no such option).
        invert_spectrum: fine-to-coarse ablation (paper Fig. 3): D → 1 − D.
        spectrum_floor: D is clamped to ``>= spectrum_floor`` (official ``ZERO = 0.03``) so that Ā > 0
            (matters only for ``invert_spectrum``, where 1 − D = 0 at the DCT's DC coefficient).
        data_range: ``zero_one`` (official code: images mapped x ↦ (x+1)/2 in :meth:`to_domain`) or
            ``minus_one_one`` (the package convention; 4x higher SNR for the same β).
        official_layout_quirk: reproduce the official channel-layout bug (§0 finding 2). Off by default.
        variance, clip_x0, loss_reduction: see :class:`GaussianProcess` (paper: mean; its network is an
            eps head). spacing: sub-sequence for strided ``ancestral``/``ddim``. default_solver: ``official``.
    """

    solvers = ("official", "ancestral", "ddim", *MULTISTEP_SOLVERS)
    full_chain_solvers = ("official",)

    def __init__(self, num_timesteps: int = 1000,
                 schedule: Literal["linear", "cosine"] = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, f_type: FType = "quartic", sig: float = 0.4, sig_min: float = 0.0,
                 sig_max: float = 0.15, basis: Literal["dct", "toeplitz_eig"] = "dct",
                 kernel: Literal["sampled", "heat"] = "sampled", invert_spectrum: bool = False,
                 spectrum_floor: float = 0.03, data_range: DataRange = "zero_one",
                 official_layout_quirk: bool = False,
                 variance: Variance = "fixedsmall", spacing: Spacing = "uniform",
                 clip_x0: bool = True, loss_reduction: Literal["mean", "sum"] = "mean",
                 default_solver: str = "official") -> None:
        for name, value, allowed in (("basis", basis, ("dct", "toeplitz_eig")), ("kernel", kernel, ("sampled", "heat")),
                                     ("default_solver", default_solver, self.solvers),
                                     ("data_range", data_range, ("zero_one", "minus_one_one"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if sig <= 0 or sig_min < 0 or sig_max < 0:
            raise ValueError(f"need sig > 0 and sig_min, sig_max >= 0; got sig={sig}, sig_min={sig_min}, "
                             f"sig_max={sig_max}")
        super().__init__(basis=None, variance=variance, clip_x0=clip_x0,
                         loss_reduction=loss_reduction)
        self.default_solver = default_solver
        self.image_size: tuple[int, int] | None = None  # set_geometry
        self.channels: int | None = None
        self.spectrum_floor = float(spectrum_floor)
        self.num_timesteps = int(num_timesteps)
        self.f_type, self.sig, self.sig_min, self.sig_max = f_type, float(sig), float(sig_min), float(sig_max)
        self.basis_kind, self.kernel = basis, kernel
        self.invert_spectrum, self.quirk = bool(invert_spectrum), bool(official_layout_quirk)
        self.data_range, self.spacing = data_range, spacing
        self.x0_range = (0.0, 1.0) if data_range == "zero_one" else (-1.0, 1.0)
        self.betas = make_betas(schedule, self.num_timesteps, beta_start, beta_end)
        #: f(i), i = 0..N (float64); F(i) = Σ_{1≤j≤i} f(j), F(0) = 0; ᾱ_i (ᾱ_0 = 1); log(1 − β_i) (index 0: 0)
        self.f = blur_schedule(f_type, self.num_timesteps, (sig_min / sig) ** 2, (sig_max / sig) ** 2)
        self.F, self.alphas_bar, self.log_keep = cumulative_tables(self.f, self.betas)
        #: spectrum D actually used: (H, W), or (C, H, W) with the layout quirk; float64 (:meth:`set_geometry`)
        self.spectrum: Tensor | None = None
        self._tables: dict[str, tuple[Tensor, ...]] = {}

    # --- spectrum and schedule ----------------------------------------------------------------------
    def set_geometry(self, image_size: int | tuple[int, int], channels: int) -> "BlurProcess":
        """Build the basis and spectrum for ``image_size`` (H = W, or ``(H, W)``) and ``channels`` (used only by
        ``official_layout_quirk``); :class:`~diffproc.methods.base.DiffusionModule` calls it with its data's
        geometry."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if self.basis_kind == "dct":
            self.basis = SeparableBasis.dct(h, w)
        else:
            self.basis = SeparableBasis.toeplitz_eig(h, w, sigma=self.sig)
        self.image_size, self.channels = (int(h), int(w)), int(channels)
        self.spectrum = self._build_spectrum(self.basis, h, w, self.spectrum_floor)
        self._tables = {}
        return self

    def _build_spectrum(self, sb: SeparableBasis, h: int, w: int, floor: float) -> Tensor:
        if self.kernel == "sampled":
            d = sb.eigenvalues if self.basis_kind == "toeplitz_eig" else kernel_spectrum(h, w, self.sig, "sampled")
        elif self.kernel == "heat":
            if self.basis_kind == "toeplitz_eig":  # DST-I frequencies of the (near-sine) eigenvectors
                om_h = math.pi * torch.arange(1, h + 1, dtype=torch.float64) / (h + 1)
                om_w = math.pi * torch.arange(1, w + 1, dtype=torch.float64) / (w + 1)
                d = torch.exp(-0.5 * self.sig**2 * (om_h[:, None] ** 2 + om_w[None, :] ** 2))
            else:
                d = kernel_spectrum(h, w, self.sig, "heat")
        else:
            raise ValueError(f"kernel must be 'sampled' or 'heat', got {self.kernel!r}")
        d = d.to(torch.float64)
        if self.invert_spectrum:
            d = 1.0 - d
        d = d.clamp(min=floor, max=1.0)
        if self.quirk:
            d = official_layout_quirk(d, self.channels)
        return d

    def _table(self, device: torch.device) -> tuple[Tensor, ...]:
        if self.spectrum is None:
            raise ValueError("BlurProcess has no image geometry yet: call set_geometry(image_size, channels) "
                             "(DiffusionModule does it with the data's image_size and channels)")
        key = str(device)
        if key not in self._tables:  # per-device copies: no host sync in the training hot path
            self._tables[key] = tuple(x.to(device) for x in (
                torch.log(self.alphas_bar), self.F, self.f, self.log_keep, torch.log(self.spectrum)))
        return self._tables[key]

    def _grid(self, per_time: Tensor, log_d: Tensor) -> Tensor:
        """``(B,)`` x ``(H,W)`` or ``(C,H,W)`` grid -> ``(B, ...)``."""
        return per_time.view(-1, *([1] * log_d.ndim)) * log_d

    def log_alphas_bar(self, t: Tensor) -> Tensor:
        """log Ā_t = log ᾱ_t + 2 F(t) log D, float64, shape ``(B, H, W)`` (``(B, C, H, W)`` with the quirk)."""
        log_ab, F, _, _, log_d = self._table(t.device)
        i = t.long()
        return log_ab[i].view(-1, *([1] * log_d.ndim)) + 2.0 * self._grid(F[i], log_d)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α_t = sqrt(Ā_t), σ_t = sqrt(1 − Ā_t) per coefficient (float64; σ via expm1 for accuracy)."""
        la = self.log_alphas_bar(t)
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def step_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step ``(a_i, b_i) = ((1 − β_i) D^{2 f(i)}, 1 − a_i)`` for ``i = t ≥ 1`` (float64 grids)."""
        _, _, f, log_keep, log_d = self._table(t.device)
        i = t.long()
        la = log_keep[i].view(-1, *([1] * log_d.ndim)) + 2.0 * self._grid(f[i], log_d)
        return torch.exp(la), -torch.expm1(la)

    # --- domain ---------------------------------------------------------------------------------------
    def to_domain(self, x0: Tensor) -> Tensor:
        """Images in [-1, 1] -> the process range (``zero_one``: (x + 1)/2, as the official code)."""
        return (x0 + 1.0) * 0.5 if self.data_range == "zero_one" else x0

    def from_domain(self, z: Tensor) -> Tensor:
        return z * 2.0 - 1.0 if self.data_range == "zero_one" else z

    def _check_channels(self, x: Tensor) -> None:
        if self.quirk and x.shape[1] != self.channels:
            raise ValueError(f"official_layout_quirk was built for {self.channels} channels but the input has "
                             f"{x.shape[1]}; call set_geometry(image_size, {x.shape[1]})")

    # --- training ---------------------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """i ~ U{1, …, N−1} (official ``int(uniform(1/N, 1)·N)``; i = N is never trained)."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(1, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def forward(self, z0: Tensor, t: Tensor, noise: Tensor, train: bool = False) -> Tensor:
        self._check_channels(z0)
        return super().forward(z0, t, noise, train)

    # --- sampling ---------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int | None = None) -> list[int]:
        """``[N−1, …, 1, 0]`` for the full chain (``official``; N−1 NFEs); a DDIM-style sub-sequence of
        ``{1, …, N−1}`` ending with 0 when ``num_steps < N−1`` (``ancestral``/``ddim`` only)."""
        t_max = self.num_timesteps - 1
        return ddim_timesteps(t_max, num_steps or t_max, self.spacing)

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Official ``get_x_N``: ``Mᵀ(sqrt(1 − Ā_{N−1}) ⊙ M z)`` (the terminal law without its mean)."""
        z = randn(shape, generator, device, dtype)
        t = torch.full((shape[0],), self.num_timesteps - 1, device=z.device)
        _, s = self.coefficients(t, z)
        return self.from_basis(s * self.to_basis(z))

    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        solver = solver or self.default_solver
        if solver != "official":
            return super().reverse_step(denoiser, z_t, t, t_next, solver, generator, ddim_eta)
        i, j = int(t), int(t_next)
        if j != i - 1:
            raise ValueError(f"the 'official' blur sampler runs every step (got t={i} -> {j}); sample with "
                             f"num_steps={self.num_timesteps - 1} (or None), or use solver 'ddim'/'ancestral' "
                             "for fewer steps")
        tb = batch_times(t, z_t.shape[0], z_t.device)
        t1 = tb[:1]  # one time for the whole batch: (1, H, W) grids broadcast over B
        u = self.to_basis(z_t)
        _, eps_u = denoiser(z_t, tb)
        _, sig = self.coefficients(t1, u)
        a, b = self.step_coefficients(t1)
        a, b = bcast(a, u), bcast(b, u)
        u = (2.0 - a.sqrt()) * u - b * eps_u / sig  # (2 − sqrt(a_i)) u + b_i s_u,  s_u = −ε̂_u/σ_i
        if i > 2:
            u = u + b.sqrt() * self.to_basis(randn_like(z_t, generator))
        return self.from_basis(u)

