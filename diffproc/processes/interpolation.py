"""SIE: sinusoidal interpolation with x̂0 + ε̂ heads and a derivative loss (Zhang, Ehinger, Drummond,
ACML 2023). Spec: methods_blur_sie_baselines.md §5 (and §0 finding 5, §9.5).

Forward (eq. 9), with continuous time ``t ∈ [0, 1]`` (``t = 0`` clean, ``t = 1`` pure noise)::

    x_t = cos(η_t) x0 + sin(η_t) ε,      η_t = t · π/2

The paper's integer time ``t_paper ∈ {0..T}`` is ``T·t``; :meth:`model_time` hands the backbone exactly
that scale (``T·t``, fractional during RK stages), so a network trained here sees the same embedding
values as one trained on the paper's integer grid.

Derivative (eq. 10 with η' = 1; §0 finding 5): ``v = dx/dη = −sin η x0 + cos η ε`` — Salimans & Ho's v.

Loss (eq. 12), a network with two heads ``[x̂0 | ε̂]`` on 2C outputs (``diffproc.nets.precond.DualHead``, the
default head)::

    L = ‖x̂0 − x0‖ + ‖ε̂ − ε‖ + γ · c² ‖v̂ − v‖,     v̂ = −sin η x̂0 + cos η ε̂

(``‖·‖`` = mean squared error by default; ``c`` = 1 for ``gradient_wrt="eta"``.)

Every variance-preserving schedule is ``α = cos η(t)``, ``σ = sin η(t)`` for some angle η(t), so the
ablation schedules of Table 2 are angle tables on the same code path:

* ``sin``: η(t) = t·π/2 (the paper; analytic, smooth).
* ``beta_star``: β* = ``betas_for_alpha_bar(T, τ ↦ cos²(τπ/2), max_beta)`` (improved-DDPM clipping,
  spec §5.1 assumption), i.e. DDIM run on the same ᾱ written as betas; ᾱ_T = 0.001·ᾱ_{T−1} > 0.
* ``linear``: DDPM's β = linspace(1e-4, 0.02, T) (the DDIM baseline schedule, for "DDIM + x̂0, ε̂").

Tabulated schedules give η at ``t = k/T`` exactly (``η_k = arccos sqrt(ᾱ_k)``) and interpolate η
linearly in between, so fractional ODE stage times are well defined (η'(t) is piecewise constant).

The probability-flow ODE of any diagonal Gaussian process is ``dz/dt = α'(t) û0 + σ'(t) ε̂``
(:func:`diffproc.samplers.gaussian_pf_velocity`); here that is ``η'(t) · v̂``, the paper's eq. 11,
integrated by the solvers of :mod:`diffproc.samplers` (Euler = eq. 13, Heun/midpoint RK2, RK4).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffproc.processes.base import MULTISTEP_SOLVERS, ODE_SOLVERS, Denoiser, batch_times, bcast, continuous_time
from diffproc.processes.ddpm import ddim_timesteps, make_betas
from diffproc.processes.gaussian import Basis, GaussianProcess, Variance, ddim_dual_step, gaussian_pf_velocity
from diffproc.processes.rng import randn_like

Schedule = Literal["sin", "beta_star", "linear"]
GradientWrt = Literal["eta", "t"]
LossNorm = Literal["l2", "l1"]
TimeSampling = Literal["continuous", "discrete"]
Spacing = Literal["linspace", "uniform", "quad"]


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> Tensor:
    """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), i = 0..T−1 (Nichol & Dhariwal 2021), float64."""
    T = num_timesteps
    tau = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar(tau)
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


class InterpolationProcess(GaussianProcess):
    """SIE's forward process, loss and reverse steps (spec §5).

    Args:
        num_timesteps: T of the paper's integer grid (1000). Sets the backbone's time scale
            (``model_time = T·t``), the tables of ``beta_star``/``linear`` and the DDIM grids.
        schedule: ``sin`` (paper eq. 9), ``beta_star`` or ``linear`` (Table 2 ablation rows; see module doc).
        gamma: weight γ of the derivative term (eq. 12). Not reported in the paper; default 1.0 weighs
            the three terms equally (all three targets have unit variance per element under the
            forward law, so γ = 1 gives them the same scale). ``gamma=0`` is the "+x̂0, ε̂" ablation.
            Only meaningful with the dual head (the module's ``precond``: ``DualHead``, the default, paper §3.2). With
            one head (``EpsHead``/``X0Head``/``VHead``: the ablation rows "DDIM + sin(·)" and "DDIM + β*") the loss is
            that head's own objective and ``gamma`` must be 0.
        gradient_wrt: the variable the derivative term differentiates by. ``eta`` (default): v = dx/dη,
            O(1) like the other two terms. ``t``: the paper's literal eq. 10 with integer t,
            ẋ = η'(t)·v with η' = π/(2T) for ``sin`` — that term is ≈2.5e-6 × smaller, i.e. useless,
            which is why it is not the default (spec §5.2).
        loss_norm: ``l2`` (squared error; default — eq. 12 writes norms but inherits DDPM's MSE, eq. 5,
            and the paper builds on DDIM's code, which uses squared error) or ``l1`` (absolute error).
        loss_reduction: ``mean`` over all elements (default) or ``sum`` over pixels, mean over batch.
        time_sampling: training times. ``continuous`` (default): t ~ U[0, 1]; the RK stages evaluate the
            network at fractional times and at t = 0, so training must cover them (spec §5.1).
            ``discrete``: t ~ U{1..T}/T (DDIM's training law; use with the DDIM grids).
        spacing: the sampling grid. ``linspace`` (default): S uniform steps 1 → 0 in t (= in η), the
            ODE grid of §5.3. ``uniform``/``quad``: DDIM's sub-sequences divided by T
            (never start at t = 1; required by single ε-head models, whose x̂0 = (x − sin η ε̂)/cos η
            is singular at η = π/2).
        clip_x0: clip x̂0 to [-1, 1] inside every step. Default False: the paper builds on DDIM's code,
            which does not clip, and clipping makes the ODE right-hand side non-smooth (it would cap
            the RK orders); the final sample is clipped by the caller (``DiffusionModule.sample``).
        max_beta: clipping of β* (``beta_star`` only; 0.999 as in improved DDPM).
        beta_start, beta_end: the ``linear`` schedule (DDPM: 1e-4, 0.02).
        variance: ancestral variance of the core's ``ancestral`` solver (DDIM's η is the sampling option ``ddim_eta``).
        default_solver: solver when none is named. Default ``euler``: eq. 13 is the only update the
            paper writes out, and with 1 NFE per step "steps" and NFE coincide (§5.3 ambiguity).
        basis: orthonormal basis (None = pixels, as in the paper).

    Solvers: ``euler``, ``heun``, ``midpoint``, ``rk4`` (probability-flow ODE, run by
    :func:`diffproc.samplers.sample_loop`), ``ddim_dual`` (x' = cos η' x̂0 + sin η' ε̂, 1 NFE),
    and the core's ``ddim`` (η from the sampling spec's ``ddim_eta``) and ``ancestral``.
    """

    solvers = ODE_SOLVERS + ("ddim_dual", "ddim", "ancestral", *MULTISTEP_SOLVERS)
    default_solver = "euler"
    heads = ("dual", "eps", "x0", "v")
    default_head = "dual"

    def __init__(self, num_timesteps: int = 1000, schedule: Schedule = "sin", gamma: float = 1.0,
                 gradient_wrt: GradientWrt = "eta", loss_norm: LossNorm = "l2",
                 loss_reduction: Literal["mean", "sum"] = "mean",
                 time_sampling: TimeSampling = "continuous", spacing: Spacing = "linspace",
                 clip_x0: bool = False, max_beta: float = 0.999,
                 beta_start: float = 1e-4, beta_end: float = 0.02, variance: Variance = "fixedsmall",
                 default_solver: str = "euler", basis: Basis | None = None) -> None:
        checks = {"schedule": (schedule, ("sin", "beta_star", "linear")),
                  "gradient_wrt": (gradient_wrt, ("eta", "t")), "loss_norm": (loss_norm, ("l2", "l1")),
                  "time_sampling": (time_sampling, ("continuous", "discrete")),
                  "spacing": (spacing, ("linspace", "uniform", "quad"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if default_solver not in self.solvers:
            raise ValueError(f"default_solver must be one of {list(self.solvers)}, got {default_solver!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        super().__init__(basis=basis, variance=variance, clip_x0=clip_x0, loss_reduction=loss_reduction)
        self.num_timesteps = int(num_timesteps)
        self.schedule, self.gamma = schedule, float(gamma)
        self.gradient_wrt, self.loss_norm = gradient_wrt, loss_norm
        self.time_sampling, self.spacing = time_sampling, spacing
        self.default_solver = default_solver
        self.eta_table: Tensor | None = None  # η_k at t = k/T, k = 0..T (tabulated schedules)
        if schedule != "sin":
            T = self.num_timesteps
            if schedule == "beta_star":
                betas = betas_for_alpha_bar(T, lambda s: torch.cos(s * math.pi / 2) ** 2, max_beta)
            else:
                betas = make_betas("linear", T, beta_start, beta_end)
            ab = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
            self.eta_table = torch.arccos(ab.sqrt().clamp(0.0, 1.0))
        self._tables: dict[str, Tensor] = {}

    # --- schedule ---------------------------------------------------------------------------------
    def _table(self, device) -> Tensor:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.eta_table.to(device)
        return self._tables[key]

    def eta_of(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Float64 ``(η(t), η'(t))`` for continuous ``t ∈ [0, 1]``."""
        t = t.double()
        if self.eta_table is None:
            return t * (math.pi / 2), torch.full_like(t, math.pi / 2)
        T = self.num_timesteps
        tab = self._table(t.device)
        pos = (t * T).clamp(0, T)
        k = pos.floor().clamp(max=T - 1).long()
        slope = (tab[k + 1] - tab[k]) * T
        return tab[k] + (pos - k) * (tab[k + 1] - tab[k]), slope

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos η_t, sin η_t)`` (eq. 9); at t = 1 (sin): cos(π/2) ≈ 6e-17, sin = 1."""
        eta, _ = self.eta_of(t)
        return torch.cos(eta), torch.sin(eta)

    def alpha_sigma_dot(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(dα/dt, dσ/dt) = η'(t)·(−sin η, cos η)`` — what the generic PF-ODE velocity needs."""
        eta, deta = self.eta_of(t)
        return -torch.sin(eta) * deta, torch.cos(eta) * deta

    def model_time(self, t: Tensor) -> Tensor:
        """``T·t``: the paper's integer time scale for the diffusers embedding."""
        return (t.double() * self.num_timesteps).float()

    def check_head(self, name: str) -> None:
        """Eq. 12's derivative term needs two heads: ``gamma > 0`` with one head is refused."""
        super().check_head(name)
        if name != "dual" and self.gamma != 0:
            raise ValueError(f"gamma={self.gamma} weighs the derivative loss of two heads (x̂0, ε̂), but the {name!r} "
                             "head is one; set the process's gamma: 0 or model.init_args.precond: DualHead")

    # --- training ---------------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """``continuous``: t ~ U[0, 1]; ``discrete``: t ~ U{1..T}/T (float64)."""
        gen_device = generator.device if generator is not None else "cpu"
        if self.time_sampling == "continuous":
            t = torch.rand((batch,), generator=generator, device=gen_device, dtype=torch.float64)
        else:
            k = torch.randint(1, self.num_timesteps + 1, (batch,), generator=generator, device=gen_device)
            t = k.double() / self.num_timesteps
        return t.to(device)

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``v = dx/dη = −sin η x0 + cos η ε`` (eq. 10 with η' = 1; pixel/domain space)."""
        a, s = self.coefficients(t, x0)
        return a * eps - s * x0

    def _err(self, diff: Tensor) -> Tensor:
        return self.reduce(diff.abs() if self.loss_norm == "l1" else diff * diff)

    def loss_terms(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The terms of eq. 12: ``x0``, ``eps``, ``v`` (unweighted) and ``loss`` (weighted sum); with one head, that
        head's own objective (``loss_norm`` on its output's error)."""
        if t is None:
            t = self.sample_time(z0.shape[0], generator, z0.device)
        if noise is None:
            noise = randn_like(z0, generator)
        z_t = self.forward(z0, t, noise)
        kind = getattr(denoiser, "kind", "dual")
        if kind != "dual":
            term = self._err(denoiser.residual(z_t, t, z0, noise))
            return {kind: term, "loss": term}
        u0, e = denoiser(z_t, t)
        dx0, de = self.from_basis(u0) - z0, self.from_basis(e) - noise
        terms = {"x0": self._err(dx0), "eps": self._err(de)}
        loss = terms["x0"] + terms["eps"]
        if self.gamma > 0:
            scale = 1.0
            if self.gradient_wrt == "t":  # ẋ = η'(t_paper)·v, with t_paper = T·t
                scale = bcast(self.eta_of(t)[1] / self.num_timesteps, z0)
            terms["v"] = self._err(scale * self.velocity(dx0, de, t))  # v̂ − v is linear in the errors
            loss = loss + self.gamma * terms["v"]
        terms["loss"] = loss
        return terms

    def loss(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Eq. 12: ``‖x̂0 − x0‖² + ‖ε̂ − ε‖² + γ‖v̂ − v‖²`` (single head: ``‖ε̂ − ε‖²`` etc.)."""
        return self.loss_terms(denoiser, z0, t, noise, generator)["loss"]

    # --- sampling ---------------------------------------------------------------------------------
    def timesteps(self, num_steps: int | None = None) -> list[float]:
        """Descending grid ``[t_S, …, t_0 = 0]`` of ``num_steps`` steps (default T) per ``spacing``."""
        S = int(num_steps or self.num_timesteps)
        if S < 1:
            raise ValueError(f"num_steps must be >= 1, got {S}")
        if self.spacing == "linspace":
            return [(S - i) / S for i in range(S + 1)]
        kind = self.spacing
        return [k / self.num_timesteps for k in ddim_timesteps(self.num_timesteps, S, kind)]

    def ode_timesteps(self, num_steps: int | None = None) -> list[float]:
        """The ODE grid (same as :meth:`timesteps`)."""
        return self.timesteps(num_steps)

    def ode_velocity(self, denoiser: Denoiser, z: Tensor, t: Tensor) -> Tensor:
        """``dz/dt = η'(t)·v̂ = α' x̂0 + σ' ε̂`` (eq. 11) — the ODE protocol of :mod:`diffproc.samplers`."""
        return gaussian_pf_velocity(self, denoiser, z, t)

    def reverse_step(self, denoiser: Denoiser, z_t: Tensor, t, t_next, solver: str | None = None,
                     generator: torch.Generator | None = None, ddim_eta: float = 0.0) -> Tensor:
        """``ddim_dual`` (x' = cos η' x̂0 + sin η' ε̂), else the core's ``ancestral``/``ddim``.
        ODE solvers are not single reverse steps: run them with :func:`diffproc.samplers.sample_loop`."""
        solver = solver or self.default_solver
        B, dev = z_t.shape[0], z_t.device
        tb = batch_times(torch.as_tensor(t, dtype=torch.float64), B, dev)
        sb = batch_times(torch.as_tensor(t_next, dtype=torch.float64), B, dev)
        if solver == "ddim_dual":
            return ddim_dual_step(self, denoiser, z_t, tb, sb)
        if solver in ODE_SOLVERS:
            raise ValueError(f"{solver!r} integrates the probability-flow ODE over a whole grid, not one reverse step: "
                             "run it with diffproc.samplers.sample_loop (or ode_step for a single step).")
        return super().reverse_step(denoiser, z_t, continuous_time(t), continuous_time(t_next), solver=solver,
                                    generator=generator, ddim_eta=ddim_eta)

