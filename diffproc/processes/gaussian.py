"""Diagonal Gaussian process in an orthonormal basis — the core DDPM, DDIM, SIE, blur diffusion and GDDM
share (methods_blur_sie_baselines.md §1.3).

In basis coefficients ``u = M x`` (``M`` orthonormal; identity for pixel-space processes)::

    u_t = α_t ⊙ u_0 + σ_t ⊙ ε_u,            ε_u ~ N(0, I)
    posterior, s < t:   α_ts = α_t / α_s,   σ²_ts = σ_t² − α_ts² σ_s²
        μ(u_t, û_0) = (α_ts σ_s² / σ_t²) u_t + (α_s σ²_ts / σ_t²) û_0,    var = σ²_ts σ_s² / σ_t²
    û_0 = (u_t − σ_t ε̂_u) / α_t,   ε̂_u = (u_t − α_t û_0) / σ_t,   v = α_t ε_u − σ_t u_0

``α_t`` and ``σ_t`` are scalars per time or per-coefficient ``(H, W)`` grids. Schedule quantities are
kept in float64 and cast at use (σ²_ts cancels catastrophically near t → 0 in float32).

**Data-dependent grids** (one hook, :meth:`GaussianProcess.alpha_sigma_given`): a process whose σ_t
depends on the clean image itself (EPDM: σ_t(x0) per pixel from x0's edges) returns its grids for a
given x0. The core then evaluates them at the data in the forward marginal and the loss, and at the
current estimate x̂0 in every reverse step (posterior, DDIM), so the whole algebra above is reused
unchanged. See ``docs/core.md``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from diffproc.processes.base import MULTISTEP_SOLVERS, Denoiser, DiffusionProcess, batch_times, bcast
from diffproc.processes.rng import randn, randn_like

Variance = Literal["fixedsmall", "fixedlarge"]


class Basis(Protocol):
    """An orthonormal basis on the last two dims: ``forward(x) = M x``, ``inverse(u) = Mᵀ u``."""

    def forward(self, x: Tensor) -> Tensor: ...

    def inverse(self, u: Tensor) -> Tensor: ...


class GaussianProcess(DiffusionProcess):
    """Base class: subclasses define the schedule :meth:`alpha_sigma`, the training-time law and the
    time grid; this class owns the forward marginal, the loss, the posterior and the reverse steps. The network's
    parameterisation (eps, x0, v or σε head) is not the process's: it reaches the process as a denoiser returning
    ``(û0, ε̂)`` (:mod:`diffproc.nets.precond`).

    Args:
        basis: orthonormal basis with ``forward``/``inverse`` (``None`` = pixels).
        variance: ancestral-step variance — ``fixedsmall`` (posterior variance β̃) or ``fixedlarge``
            (σ²_ts, = β_t on the full grid); DDPM §3.2.
        clip_x0: clip the predicted clean image to ``x0_range`` inside reverse steps.
        loss_reduction: ``mean`` over all elements, or ``sum`` over pixels then mean over batch.
    """

    solvers = ("ancestral", "ddim", *MULTISTEP_SOLVERS)
    default_solver = "ancestral"
    heads = ("eps", "x0", "v", "sigma_eps")
    #: valid range of a clean sample in the process domain (for ``clip_x0``); None disables clipping
    x0_range: tuple[float, float] | None = (-1.0, 1.0)
    #: True when :meth:`alpha_sigma_given` depends on x0 (the core then passes x0 / x̂0 to it)
    data_dependent: bool = False
    #: dtype of the reverse-step algebra (None = the state's); EPDM uses float64 as its official code
    work_dtype: torch.dtype | None = None

    def __init__(self, basis: Basis | None = None, variance: Variance = "fixedsmall", clip_x0: bool = True,
                 loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        if variance not in ("fixedsmall", "fixedlarge"):
            raise ValueError(f"variance must be 'fixedsmall' or 'fixedlarge', got {variance!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.basis = basis
        self.variance = variance
        self.clip_x0 = clip_x0
        self.loss_reduction = loss_reduction

    # --- schedule (subclasses) ------------------------------------------------------------------
    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Float64 ``(α_t, σ_t)`` for times ``t`` of shape ``(B,)``: each ``(B,)`` or ``(B, H, W)``."""

    def alpha_sigma_given(self, t: Tensor, x0: Tensor | None = None, *, t_from: Tensor | None = None,
                          train: bool = False) -> tuple[Tensor, Tensor]:
        """THE hook for data-dependent coefficient grids: float64 ``(α_t, σ_t)`` for the clean image
        ``x0`` (process domain; the data in the forward marginal and the loss, the current estimate
        x̂0 in reverse steps). ``t_from``: the start time when a reverse step t_from → t asks for σ at
        its end time (EPDM's official λ(t) in σ_s). ``train``: the coefficients of the training
        objective (EPDM's ``train_transition``). Grids may be ``(B,)``, ``(B,H,W)`` or ``(B,1|C,H,W)``.

        Default: the data-independent :meth:`alpha_sigma`. A process overriding this sets
        ``data_dependent = True``; :meth:`alpha_sigma` then stays its x0-free schedule (prior, end
        points).
        """
        return self.alpha_sigma(t)

    def coefficients(self, t: Tensor, ref: Tensor, x0: Tensor | None = None, *, t_from: Tensor | None = None,
                     train: bool = False) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)`` broadcastable against ``ref`` and in its dtype (see :meth:`alpha_sigma_given`)."""
        a, s = self.alpha_sigma_given(t, x0, t_from=t_from, train=train)
        return bcast(a, ref), bcast(s, ref)

    # --- basis ----------------------------------------------------------------------------------
    def to_basis(self, x: Tensor) -> Tensor:
        return x if self.basis is None else self.basis.forward(x)

    def from_basis(self, u: Tensor) -> Tensor:
        return u if self.basis is None else self.basis.inverse(u)

    # --- forward process and loss ---------------------------------------------------------------
    def noise_like(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard-normal noise shaped like a domain state (training and ancestral/DDIM steps).
        Processes whose noise lives in a subspace of the domain (GDDM ``noise="operator"``) override it."""
        return randn_like(z, generator)

    def forward(self, z0: Tensor, t: Tensor, noise: Tensor, train: bool = False) -> Tensor:
        """q(z_t | z_0): ``Mᵀ(α_t ⊙ M z0 + σ_t ⊙ M ε)`` for pixel-space ``noise`` ε (``train``: the
        training objective's coefficients, which differ only for EPDM's ``train_transition``)."""
        a, s = self.coefficients(t, z0, z0 if self.data_dependent else None, train=train)
        if self.basis is None:
            return a * z0 + s * noise
        return self.from_basis(a * self.to_basis(z0) + s * self.to_basis(noise))

    def reduce(self, err: Tensor) -> Tensor:
        """Per-element squared error -> scalar loss (``loss_reduction``)."""
        if self.loss_reduction == "sum":
            return err.flatten(1).sum(1).mean()
        return err.mean()

    def loss(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The denoiser's own objective at ``z_t ~ q(z_t | z0)``: ``reduce(‖output − target‖²)`` of its head (DDPM
        Eq. 14 for an eps head)."""
        if t is None:
            t = self.sample_time(z0.shape[0], generator, z0.device)
        if noise is None:
            noise = self.noise_like(z0, generator)
        z_t = self.forward(z0, t, noise, train=True)
        return self.reduce(denoiser.error(z_t, t, z0, noise))

    # --- predictions ----------------------------------------------------------------------------
    def clip(self, x0: Tensor) -> Tensor:
        """x̂0 clipped to ``x0_range`` when ``clip_x0`` (process domain)."""
        if self.clip_x0 and self.x0_range is not None:
            return x0.clamp(*self.x0_range)
        return x0

    def predict(self, denoiser: Denoiser, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(û_0, ε̂_u)`` of the denoiser for state ``z_t`` at times ``t``; û_0 clipped to ``x0_range`` if asked."""
        u0, eps = denoiser(z_t, t)
        if self.clip_x0 and self.x0_range is not None:
            u0 = self.to_basis(self.clip(self.from_basis(u0)))
        return u0, eps

    # --- posterior and reverse steps ------------------------------------------------------------
    def posterior(self, u_t: Tensor, u0: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, fixed-small variance and fixed-large variance (σ²_ts) of q(u_s | u_t, u_0), with the
        grids of a data-dependent process evaluated at ``u0`` (EPDM Eqs. 3, 5, 6)."""
        x0 = self.from_basis(u0) if self.data_dependent else None
        a_t, s_t = self.alpha_sigma_given(t, x0)
        a_s, s_s = self.alpha_sigma_given(s, x0, t_from=t)
        a_ts = a_t / a_s
        a_ts, a_s = bcast(a_ts, s_t), bcast(a_s, s_t)  # scalars per time against grids
        var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(0.0)
        inv = 1.0 / (s_t**2)
        c_t = bcast(a_ts * s_s**2 * inv, u_t)
        c_0 = bcast(a_s * var_ts * inv, u_t)
        return c_t * u_t + c_0 * u0, bcast(var_ts * s_s**2 * inv, u_t), bcast(var_ts, u_t)

    def final_step(self, t_next) -> bool:
        """Whether a step to ``t_next`` ends at σ = 0 (then no noise is added), decided from the grid value on the
        host: the samplers pass the grid's Python numbers, so no accelerator is synchronised (a time given as a
        device tensor is read back once)."""
        t = torch.as_tensor(t_next, dtype=torch.float64 if isinstance(t_next, float) else None)
        return bool((self.alpha_sigma(t.reshape(-1)[:1].cpu())[1] == 0).all())

    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """Ancestral (posterior) or DDIM(η) step from ``t`` to ``t_next`` on any sub-grid (algebra in
        ``work_dtype``; the result in ``z_t``'s dtype). ``ddim_eta``: DDIM's stochasticity η (0 = deterministic DDIM,
        1 = the ancestral step; Song et al. Eq. 16), a sampling option (:class:`~diffproc.samplers.SamplingSpec`)."""
        solver = solver or self.default_solver
        if solver in MULTISTEP_SOLVERS:
            raise ValueError(f"{solver!r} is a multistep solver (each step uses the previous step's prediction): "
                             "run it with diffproc.samplers.sample_loop, or step it with "
                             "diffproc.processes.gaussian.dpmpp_step and a MultistepState")
        if solver not in ("ancestral", "ddim"):
            raise ValueError(f"unknown solver {solver!r} for {type(self).__name__}; choose one of {self.solvers}")
        # continuous times in float64 (a Python float would become float32); discrete ones stay integers
        tb, sb = (batch_times(torch.as_tensor(x, dtype=torch.float64) if isinstance(x, float) else x, z_t.shape[0],
                              z_t.device) for x in (t, t_next))
        wd = self.work_dtype or z_t.dtype
        u_t = self.to_basis(z_t.to(wd))
        u0, eps = self.predict(denoiser, z_t, tb)
        final = self.final_step(t_next)

        def noise() -> Tensor:  # drawn in the state's dtype: the same stream whatever work_dtype is
            return self.to_basis(self.noise_like(z_t, generator).to(wd))

        if solver == "ancestral":
            mean, var_small, var_large = self.posterior(u_t, u0, tb, sb)
            var = var_small if self.variance == "fixedsmall" else var_large
            out = mean if final else mean + var.sqrt() * noise()
        else:  # DDIM(η), Song et al. Eq. 12 with σ_s (and, data-dependent, σ_t in ε̂) at x̂0
            x0 = self.from_basis(u0) if self.data_dependent else None
            a_s, s_s = self.coefficients(sb, u_t, x0, t_from=tb)
            out = a_s * u0
            if not final:
                _, var_small, _ = self.posterior(u_t, u0, tb, sb)
                c1 = float(ddim_eta) * var_small.sqrt()
                c2 = (s_s**2 - c1**2).clamp_min(0.0).sqrt()
                out = out + c2 * eps
                if ddim_eta > 0:
                    out = out + c1 * noise()
        return self.from_basis(out).to(z_t.dtype)

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``N(0, I)`` (the terminal law of a variance-preserving process)."""
        return randn(shape, generator, device, dtype)


def gaussian_pf_velocity(process, denoiser: Denoiser, z: Tensor, t: Tensor) -> Tensor:
    """PF-ODE of a diagonal Gaussian process: ``dz/dt = Mᵀ(α'(t) û0 + σ'(t) ε̂)``.

    Needs ``process.alpha_sigma_dot(t)`` (float64 ``(B,)`` or ``(B,H,W)`` each) and
    ``process.predict(denoiser, z, t) -> (û0, ε̂)`` in basis coefficients (``GaussianProcess``).
    """
    u0, eps = process.predict(denoiser, z, t)
    da, ds = process.alpha_sigma_dot(t)
    return process.from_basis(bcast(da, u0) * u0 + bcast(ds, u0) * eps)


def ddim_dual_step(process, denoiser: Denoiser, z: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """``u' = α_{t'} û0 + σ_{t'} ε̂`` with both predictions taken as they are (SIE "DDIM + x̂0, ε̂",
    spec §5.3; exact for frozen predictions). With one ε head this is DDIM η = 0. 1 NFE."""
    u0, eps = process.predict(denoiser, z, t)
    a, s = process.coefficients(t_next, u0)
    return process.from_basis(a * u0 + s * eps)


def gaussian_reverse_sde_step(process, denoiser: Denoiser, z: Tensor, t: Tensor, t_next: Tensor,
                              noise: Tensor) -> Tensor:
    """One Euler–Maruyama step ``t → t_next`` (< t) of the reverse-time SDE of a diagonal Gaussian process.

    The forward marginal ``u_t = α_t u_0 + σ_t ε`` is that of the linear SDE ``du = f_t u dt + g_t dw`` with
    ``f_t = α'_t/α_t`` and ``g_t² = d(σ_t²)/dt − 2 f_t σ_t²`` (Song et al. 2021, Eqs. 5 and 29, per
    coordinate). Its reverse (Anderson 1982; Song et al. Eq. 6) is ``du = [f_t u − g_t² ∇log p_t] dt + g_t dw̄``
    with the score ``∇log p_t = −ε̂/σ_t``; stepping backwards by ``h = t − t_next`` with the coefficients at
    the step's start ``t``::

        u_next = u − h (f_t u + g_t² ε̂ / σ_t) + g_t √h ξ,        ξ = M ``noise``

    (for the VP SDE ``f = −β_t``, ``g² = 2β_t``: ``u + h β_t (u − 2 ε̂/σ_t) + √(2 β_t h) ξ``). ``noise`` is a
    standard-normal draw shaped like ``z`` in the process domain; passing it explicitly makes the step an
    affine map of ``(z, noise)`` a test can read off. The final step is a plain EM step (no extra
    denoising). Needs ``process.alpha_sigma_dot``; ``t``, ``t_next`` are ``(B,)`` float64. 1 NFE.
    """
    wd = process.work_dtype or z.dtype
    u = process.to_basis(z.to(wd))
    _, eps = process.predict(denoiser, z, t)
    a, s = process.alpha_sigma(t)
    da, ds = process.alpha_sigma_dot(t)
    f = da / a
    g2 = 2.0 * s * ds - 2.0 * f * s * s
    h = (t - t_next).to(torch.float64)
    h = h.view(-1, *([1] * (a.ndim - 1)))
    drift = bcast(h * f, u) * u + bcast(h * g2 / s, u) * eps
    out = u - drift + bcast((g2 * h).clamp_min(0.0).sqrt(), u) * process.to_basis(noise.to(wd))
    return process.from_basis(out).to(z.dtype)


# --- exponential integrators (DPM-Solver++ family) ---------------------------------------------------
#: why a process whose σ_t depends on x0 cannot run the exponential integrators (EPDM)
DATA_DEPENDENT_REFUSAL = (
    "{name} cannot run {solver!r}: DPM-Solver++ integrates the probability-flow ODE in the log-SNR "
    "λ = log(α/σ) of a schedule fixed in advance, but this process's σ_t depends on the clean image x0 "
    "(σ_t(x0), re-evaluated at every step's estimate x̂0), so λ and the step h = λ(t_next) − λ(t) are not "
    "known before the network is called and the multistep correction mixes predictions made under different "
    "schedules. Use solver 'ancestral' or 'ddim' (see docs/epdm.md, 'Exponential integrators').")


@dataclass
class MultistepState:
    """What a multistep exponential integrator carries from one step to the next: the data predictions of the
    last two steps ``u0`` (newest) and ``u0_2`` (basis coefficients, work dtype) and their per-coordinate log-SNR
    steps ``h``, ``h_2`` (float64 grids, ``(B,)`` or ``(B, H, W)``). Empty before the first step."""

    u0: Tensor | None = None
    h: Tensor | None = None
    u0_2: Tensor | None = None
    h_2: Tensor | None = None
    steps: int = 0


#: order of each multistep solver (the first steps and, on short grids, the last ones run lower)
MULTISTEP_ORDER: dict[str, int] = {"dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m": 3}


def _usable(h_prev: Tensor | None, h: Tensor, final: Tensor) -> Tensor:
    """Coordinates where a correction from a previous step with log-SNR step ``h_prev`` can be used: it exists
    and is finite (a step from λ = −∞, SIE's t = 1, has none) and this step does not end at σ = 0."""
    if h_prev is None:
        return torch.zeros_like(final)
    return torch.isfinite(h_prev) & ~final


def dpmpp_step(process, denoiser: Denoiser, z: Tensor, t, t_next, solver: str, state: MultistepState,
               generator: torch.Generator | None = None, noise: Tensor | None = None,
               max_order: int | None = None) -> Tensor:
    """One step ``t → t_next`` of DPM-Solver++(2M) (``dpmpp_2m``; Lu et al. 2022, "DPM-Solver++", Alg. 2), its
    stochastic variant (``dpmpp_2m_sde``; k-diffusion's ``sample_dpmpp_2m_sde``, midpoint form, η = 1 =
    diffusers' ``sde-dpmsolver++``) or DPM-Solver++(3M) (``dpmpp_3m``; the third-order multistep update of Lu et
    al.'s §3.2, with the second-difference term taken at full weight, see below) with data prediction, on any
    diagonal Gaussian process. 1 NFE.

    Everything is per coordinate of the process basis: ``λ_k(t) = log(α_k(t)/σ_k(t))``,
    ``h_k = λ_k(t_next) − λ_k(t)`` (so blur diffusion's per-DCT-mode α, σ are integrated mode by mode). With
    ``φ1 = 1 − e^{−h}`` and the data predictions ``m0`` (this step), ``m1``, ``m2`` (the two before)::

        ODE 1st order:  u' = (σ'/σ) u + α' φ1 m0                      (= α' m0 + σ' ε̂: DDIM, η = 0, exactly)
        2M:             + α' φ1 (h / 2h1) (m0 − m1)                   (h1: the previous step's h)
        2M SDE:         u' = (σ'/σ) e^{−h} u + α' (1 − e^{−2h}) D + σ' √(1 − e^{−2h}) ξ,  D as in 2M
        3M:             u' = (σ'/σ) u + α' φ1 m0 + α' φ2 d1 − α' φ3 d2,   φ2 = 1 − φ1/h,  φ3 = φ2/h − 1/2,
                        r0 = h1/h, r1 = h2/h, e0 = (m0 − m1)/r0, e1 = (m1 − m2)/r1,
                        d1 = e0 + r0 (e0 − e1)/(r0 + r1),  d2 = 2 (e0 − e1)/(r0 + r1)

    3M is the Taylor expansion of ``x̂0(λ)`` to second order inside the exact integral
    ``α' ∫_0^h e^{−(h−τ)} x̂0(λ + τ) dτ``: ``d1 ≈ h x̂0'``, ``d2 ≈ h² x̂0''`` and ``∫ e^{−(h−τ)} τ²/2 dτ = −h² φ3``.
    The multistep third-order update of the DPM-Solver code and of diffusers (``solver_order=3``) takes
    ``d2 = (e0 − e1)/(r0 + r1) ≈ h² x̂0''/2``, half that weight; with the exact denoiser of a Gaussian law on a
    log-SNR-uniform grid it measures order 2.0 here, this form 3.0 (``tests/test_samplers.py``,
    ``test_convergence_order``).

    The order rises with the history (first step 1st order, second step 2nd, ...) and is capped by
    ``max_order`` (``sample_loop`` lowers it on the last steps of a short grid, diffusers'
    ``lower_order_final``).

    **Final step to σ = 0** (``t_next = 0`` on DDPM/blur/GDDM/SIE grids; λ = +∞): the step is taken first
    order, which is the formulas' limit ``h → ∞``: ``u' = α' û0`` (= û0 when α' = 1), no noise — DDIM's last
    step and k-diffusion's ``x = denoised``. (The correction weights diverge there, so they are dropped.)
    Coordinates are handled one by one, so a grid where only some σ_k vanish is fine.

    ``state`` (a :class:`MultistepState`) is updated in place. ``noise`` (SDE only) is a standard-normal draw
    shaped like ``z`` in the process domain; by default ``process.noise_like(z, generator)`` (a
    :class:`~diffproc.processes.rng.PerSampleGenerator` makes each sample's stream its own).
    """
    if solver not in MULTISTEP_SOLVERS:
        raise ValueError(f"unknown multistep solver {solver!r}; choose one of {MULTISTEP_SOLVERS}")
    if getattr(process, "data_dependent", False):
        raise ValueError(DATA_DEPENDENT_REFUSAL.format(name=type(process).__name__, solver=solver))
    order = min(MULTISTEP_ORDER[solver], max_order or 3, state.steps + 1)
    B, dev = z.shape[0], z.device
    # continuous times in float64 (a python float would become float32); discrete ones stay integers
    tb = batch_times(torch.as_tensor(t, dtype=torch.float64) if isinstance(t, float) else t, B, dev)
    sb = batch_times(torch.as_tensor(t_next, dtype=torch.float64) if isinstance(t_next, float) else t_next, B, dev)
    wd = process.work_dtype or z.dtype
    u = process.to_basis(z.to(wd))
    u0, _ = process.predict(denoiser, z, tb)
    a_t, s_t = process.alpha_sigma(tb)
    a_n, s_n = process.alpha_sigma(sb)
    a_t, s_t, a_n, s_n = (x.to(torch.float64) for x in (a_t, s_t, a_n, s_n))
    final = s_n == 0
    h = (torch.log(a_n) - torch.log(s_n)) - (torch.log(a_t) - torch.log(s_t))  # +inf where σ' = 0
    sde = solver == "dpmpp_2m_sde"
    ratio = torch.where(final, torch.zeros_like(s_n), s_n / s_t)
    hh = 2.0 * h if sde else h
    phi1 = -torch.expm1(-hh)  # 1 − e^{−h} (1 − e^{−2h} for the SDE); = 1 at the final step
    c_d = a_n * phi1
    c_u = ratio * torch.exp(-h) if sde else ratio
    out = bcast(c_u, u) * u + bcast(c_d, u) * u0
    zero = torch.zeros_like(h)
    use1 = _usable(state.h, h, final) if order >= 2 else torch.zeros_like(final)
    use2 = use1 & _usable(state.h_2, h, final) if order >= 3 else torch.zeros_like(final)
    if use2.any():  # third order where both previous steps are usable
        hs = torch.where(use2, h, torch.ones_like(h))
        r0 = torch.where(use2, state.h / hs, torch.ones_like(h))
        r1 = torch.where(use2, state.h_2 / hs, torch.ones_like(h))
        phi2 = 1.0 - phi1 / hs
        phi3 = phi2 / hs - 0.5
        e0 = bcast(1.0 / r0, u) * (u0 - state.u0)
        e1 = bcast(1.0 / r1, u) * (state.u0 - state.u0_2)
        d1 = e0 + bcast(r0 / (r0 + r1), u) * (e0 - e1)
        d2 = bcast(2.0 / (r0 + r1), u) * (e0 - e1)  # ≈ h² x̂0''(λ) (see the docstring)
        out = out + bcast(torch.where(use2, a_n * phi2, zero), u) * d1 - bcast(torch.where(use2, a_n * phi3, zero), u) * d2
    if (use1 & ~use2).any():  # second order (2M's midpoint form) where only the last step is usable
        w = torch.where(use1 & ~use2, h / (2.0 * torch.where(use1, state.h, torch.ones_like(h))), zero)
        out = out + bcast(c_d * w, u) * (u0 - state.u0)
    if sde:
        c_n = torch.where(final, torch.zeros_like(s_n), s_n * (-torch.expm1(-hh)).clamp_min(0.0).sqrt())
        if not bool(final.all()):
            xi = noise if noise is not None else process.noise_like(z, generator)
            out = out + bcast(c_n, u) * process.to_basis(xi.to(wd))
    state.u0_2, state.h_2 = state.u0, state.h
    state.u0, state.h, state.steps = u0, h, state.steps + 1
    return process.from_basis(out).to(z.dtype)
