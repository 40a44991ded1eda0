"""Generic sampling loops over a process's :meth:`reverse_step` and, for processes with a
probability-flow ODE, ODE solvers. They see the network only as ``denoiser(z, t)``.

ODE protocol (any process, not only SIE). A process that defines a probability-flow ODE exposes

* ``ode_velocity(denoiser, z, t) -> dz/dt`` for a ``(B,)`` float64 time tensor ``t``, and
* ``ode_timesteps(num_steps) -> [t_S, …, t_0]`` (descending; falls back to ``timesteps``),

and lists the solver names it supports in ``process.solvers``. :func:`sample_loop` then runs
``euler | heun | midpoint | rk4`` over that grid (:data:`ODE_SOLVERS`). Diagonal Gaussian processes
(``u_t = α_t u0 + σ_t ε``) get the velocity for free from :func:`gaussian_pf_velocity` once they
define ``alpha_sigma_dot(t) -> (dα/dt, dσ/dt)``: the PF-ODE is ``du/dt = α' û0 + σ' ε̂``
(Song et al. 2021's ODE with score = −ε̂/σ, rewritten with û0 = (u − σ ε̂)/α). Any Gaussian process
can also offer ``ddim_dual`` through :func:`ddim_dual_step`.

Multistep exponential integrators (:data:`~diffproc.processes.base.MULTISTEP_SOLVERS`: ``dpmpp_2m``,
``dpmpp_2m_sde``, ``dpmpp_3m``) run on any diagonal Gaussian process that lists them in ``solvers``:
:func:`sample_loop` steps :func:`~diffproc.processes.gaussian.dpmpp_step` along the time grid, carrying a
:class:`~diffproc.processes.gaussian.MultistepState`. The log-SNR step is per coordinate of the process basis;
the last step to σ = 0 is first order (returns α' û0), and on grids of fewer than
:data:`LOWER_ORDER_FINAL_BELOW` steps the last steps lower the order (diffusers' ``lower_order_final``).

Time grids (:func:`time_grid`, :data:`TIME_GRIDS`): ``process`` (the process's own :meth:`timesteps`, the grid of
``ancestral``/``ddim``), ``uniform_t``, ``quadratic`` (dense near the data) and ``logsnr`` (uniform in the
log-SNR of the process's median coordinate). Any solver walks any of them.

NFE: every solver counts calls through :class:`CountingDenoiser`; per step Euler 1, Heun 2,
midpoint 2, RK4 4, DPM-Solver++ 1 (:data:`NFE_PER_STEP`), reported as ``SampleResult.nfe``.

SDEdit (:func:`hijack_grid`, :func:`sdedit_loop`): the same loop started from a guide noised to a hijack time
(``diffproc.methods.sdedit`` runs it with a module).

Room ``samplers``: imports ``processes`` (their public API) only; ``methods`` and ``interop`` use it, a process
never does.

The sampling spec (:class:`SamplingSpec`: solver, num_steps, time_grid, ddim_eta, seed, SDEdit strength) is defined
here once: the module holds the default (``model.init_args.sampling``), every callback, the predict step and the
diffusers pipeline take an override whose unset (``None``) fields inherit it (:meth:`SamplingSpec.over`), and
:meth:`SamplingSpec.resolve` completes and checks it against a process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffproc.processes.base import MULTISTEP_SOLVERS, ODE_SOLVERS, DiffusionProcess, Denoiser, batch_times
from diffproc.processes.gaussian import MultistepState, dpmpp_step, gaussian_pf_velocity
from diffproc.processes.rng import randn_like

# ODE_SOLVERS (defined with the process API, processes/base.py): the probability-flow ODE solvers run by
# :func:`sample_loop` through the ODE protocol. gaussian_pf_velocity / ddim_dual_step live with the Gaussian
# core (processes/gaussian.py) and are re-exported here.
#: network evaluations per step of each solver
NFE_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "ddim_dual": 1,
                                "ddim": 1, "ancestral": 1, "euler_maruyama": 1,
                                "dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 1}
#: time grids :func:`time_grid` makes
TIME_GRIDS: tuple[str, ...] = ("process", "uniform_t", "quadratic", "logsnr")
#: the ``logsnr`` grid starts no lower than this log-SNR (a process whose first time has α ≈ 0, SIE's t = 1 with
#: λ ≈ −37, would otherwise spend its first steps where nothing is visible); the grid still starts at t_max
LOGSNR_FLOOR: float = -10.0
#: multistep solvers lower their order on the last steps of grids shorter than this (diffusers' rule)
LOWER_ORDER_FINAL_BELOW: int = 15
#: SDEdit's hijack point when no spec sets ``strength`` ([recon]: t0 = T/2, EPDM §1.8)
DEFAULT_STRENGTH: float = 0.5


class CountingDenoiser:
    """Wraps a denoiser and counts network evaluations (NFE = number of calls); anything else (``kind``, ``error``)
    is the wrapped denoiser's."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        return self.denoiser(z, t)

    def __getattr__(self, name: str):
        if name == "denoiser":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.denoiser, name)


@dataclass
class SampleResult:
    """Output of a sampling run: the final domain state ``sample``, the NFE actually spent, the time
    grid and the solver; :meth:`DiffusionModule.sample <diffproc.methods.base.DiffusionModule.sample>`
    also fills ``images`` (decoded, clamped to [-1, 1])."""

    sample: Tensor
    nfe: int
    timesteps: list = field(default_factory=list)
    solver: str = ""
    images: Tensor | None = None

    @property
    def steps(self) -> int:
        """Number of steps taken (grid length − 1)."""
        return max(0, len(self.timesteps) - 1)


def _median_log_snr(process: DiffusionProcess, ts: Sequence) -> np.ndarray:
    """log(α/σ) of the process's median coordinate at each time of ``ts`` (the scalar itself for a scalar
    schedule; blur: the median DCT mode)."""
    dtype = torch.long if isinstance(ts[0], int) else torch.float64
    a, s = process.alpha_sigma(torch.as_tensor(list(ts), dtype=dtype))
    lam = (torch.log(a.double()) - torch.log(s.double())).reshape(len(ts), -1)
    return lam.median(dim=1).values.cpu().numpy()


def time_grid(process: DiffusionProcess, num_steps: int | None, kind: str = "process") -> list:
    """The descending time grid of ``num_steps`` steps of kind ``kind`` (:data:`TIME_GRIDS`) between the ends of
    the process's full grid ``timesteps()``.

    ``process``: ``timesteps(num_steps)``; ``uniform_t``: ``t_k = t_min + (t_max − t_min) k/S``; ``quadratic``:
    ``t_min + (t_max − t_min)(k/S)²``; ``logsnr``: uniform in the median coordinate's log-SNR from
    ``max(λ(t_max), LOGSNR_FLOOR)`` to ``λ`` just before the end, the first point kept at ``t_max`` and a last step
    to σ = 0 kept as its own step. Discrete-time processes round to integers and drop duplicates, so a dense
    request may come back with fewer steps (the NFE counted says so).
    """
    if kind not in TIME_GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {list(TIME_GRIDS)}")
    if kind == "process" or num_steps is None:
        return list(process.timesteps(num_steps))
    if getattr(process, "data_dependent", False) and kind == "logsnr":
        raise ValueError(f"{type(process).__name__}'s log-SNR depends on the image, so it has no 'logsnr' grid; "
                         "use time_grid 'process', 'uniform_t' or 'quadratic'")
    full = list(process.timesteps(None))
    t_max, t_min = full[0], full[-1]
    discrete = isinstance(t_max, int)
    S = int(num_steps)
    if kind in ("uniform_t", "quadratic"):
        k = np.arange(S, -1, -1) / S
        ts = t_min + (t_max - t_min) * (k if kind == "uniform_t" else k**2)
    else:
        ends_clean = bool(np.isinf(_median_log_snr(process, [t_min])[0]))
        lo = (t_min + 1 if discrete else t_min + 1e-4 * (t_max - t_min)) if ends_clean else t_min
        inner = S - 1 if ends_clean else S
        lam_hi, lam_lo = _median_log_snr(process, [lo, t_max])  # λ decreases with t
        target = np.linspace(max(lam_lo, LOGSNR_FLOOR), lam_hi, inner + 1)  # from the noisy end to lo
        if discrete:
            dense = np.arange(lo, t_max + 1)
            ts = np.interp(target, _median_log_snr(process, dense.tolist())[::-1], dense[::-1])
        else:  # invert λ(t) by bisection (float64, to ~1e-15 of the interval)
            a, b = np.full_like(target, lo), np.full_like(target, t_max)
            for _ in range(60):
                mid = (a + b) / 2
                above = _median_log_snr(process, mid.tolist()) > target
                a, b = np.where(above, mid, a), np.where(above, b, mid)
            ts = (a + b) / 2
        ts[0], ts[-1] = t_max, lo
        if ends_clean:
            ts = np.append(ts, t_min)
    if discrete:
        out: list = []
        for x in np.rint(ts).astype(int).tolist():
            if not out or x < out[-1]:
                out.append(x)
        return out
    return [float(x) for x in ts]


def sampling_grid(process: DiffusionProcess, num_steps: int | None, solver: str | None = None,
                  grid: str = "process") -> list:
    """The descending time grid ``solver`` visits with ``num_steps`` steps: ``ode_timesteps`` for the ODE
    solvers on the ``process`` grid, otherwise :func:`time_grid` of kind ``grid``. Refuses, rather than silently
    shortens, a request for more steps than the process has."""
    if grid == "process" and solver in ODE_SOLVERS and hasattr(process, "ode_timesteps"):
        out = list(process.ode_timesteps(num_steps))
    else:
        out = time_grid(process, num_steps, grid)
    most = len(out) - 1
    if grid != "process":  # a dense discrete grid may lose duplicates: refuse only what the full chain lacks
        most = max(most, len(process.timesteps(None)) - 1)
    if num_steps is not None and int(num_steps) > most:
        raise ValueError(f"num_steps={num_steps} is more than {type(process).__name__} can take: its grid has "
                         f"{most} steps at most (num_timesteps={getattr(process, 'num_timesteps', '?')}). "
                         f"Ask for {most} or fewer steps")
    return out


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample, said once: the module's ``sampling`` is the default; a callback's, the pipeline call's or a
    Python caller's spec overrides it field by field (``None`` = inherit; :meth:`over`), and :meth:`resolve` fills
    what is still unset from the process and checks the result.

    Args:
        solver: reverse solver, one of the process's ``solvers`` (``None``: the process's ``default_solver``).
        num_steps: reverse steps of the full chain (``None``: the process's full chain). With an SDEdit
            ``strength``, the grid of that many steps is truncated at the hijack time.
        time_grid: time grid the solver walks (:data:`TIME_GRIDS`): ``process`` (the process's own spacing,
            default), ``uniform_t``, ``quadratic`` or ``logsnr``.
        ddim_eta: stochasticity of the ``ddim`` solver (Song et al. 2021, Eq. 16): 0 = deterministic DDIM
            (default), 1 = the ancestral (posterior) step. Other solvers ignore it.
        seed: base seed: sample ``i`` draws all its noise from ``(seed, i)`` whatever the batch size or rank count
            (default 0).
        strength: SDEdit hijack point as a fraction of the chain, in [0, 1] (``t0 = strength · t_max``; default
            0.5); used only by stroke-guided generation (guide batches in ``predict``).
    """

    solver: Optional[str] = None
    num_steps: Optional[int] = None
    time_grid: Optional[str] = None
    ddim_eta: Optional[float] = None
    seed: Optional[int] = None
    strength: Optional[float] = None

    @classmethod
    def of(cls, value: "SamplingSpec | dict | None") -> "SamplingSpec":
        """``value`` as a spec: a spec, a dict of its fields (hyperparameters, scheduler configs) or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown sampling option(s) {unknown}; a sampling spec has "
                                 f"{[f.name for f in fields(cls)]}")
            return cls(**value)
        raise TypeError(f"a sampling spec must be a SamplingSpec or a dict, got {type(value).__name__}")

    def over(self, base: "SamplingSpec | dict | None") -> "SamplingSpec":
        """This spec on top of ``base``: the fields set here win, the others come from ``base``."""
        base = SamplingSpec.of(base)
        return SamplingSpec(**{f.name: getattr(base, f.name) if getattr(self, f.name) is None
                               else getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (what hyperparameters and scheduler configs store)."""
        return asdict(self)

    def resolve(self, process: DiffusionProcess, where: str = "sampling", sdedit: bool = False) -> "SamplingSpec":
        """The complete spec for ``process``: unset fields take the process's ``default_solver``, ``time_grid``
        ``process``, ``ddim_eta`` 0 and ``seed`` 0 (``num_steps`` ``None`` stays the full chain; ``strength`` gets
        :data:`DEFAULT_STRENGTH` only with ``sdedit``). Raises ``ValueError`` naming ``where.<field>`` and what to
        change when the process cannot run it (the grid check is :func:`sampling_grid`'s)."""
        solver = self.solver or process.default_solver
        if solver not in process.solvers:
            raise ValueError(f"{where}.solver: {process.unknown_solver_message(solver)}")
        if self.num_steps is not None and int(self.num_steps) < 1:
            raise ValueError(f"{where}.num_steps must be >= 1 (or null for the process's full chain), "
                             f"got {self.num_steps}")
        grid = self.time_grid or "process"
        if grid not in TIME_GRIDS:
            raise ValueError(f"{where}.time_grid must be one of {list(TIME_GRIDS)}, got {grid!r}")
        ddim_eta = 0.0 if self.ddim_eta is None else float(self.ddim_eta)
        if not ddim_eta >= 0.0:
            raise ValueError(f"{where}.ddim_eta must be >= 0 (0 = deterministic DDIM, 1 = the ancestral step), "
                             f"got {self.ddim_eta}")
        strength = self.strength
        if strength is None and sdedit:
            strength = DEFAULT_STRENGTH
        if strength is not None and not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"{where}.strength (SDEdit hijack point, a fraction of the chain) must lie in [0, 1], "
                             f"got {strength}")
        num_steps = None if self.num_steps is None else int(self.num_steps)
        try:
            sampling_grid(process, num_steps, solver, grid)
        except ValueError as err:
            field_name = "time_grid" if "grid" in str(err).split(";")[0] and "num_steps=" not in str(err) else "num_steps"
            raise ValueError(f"{where}.{field_name}: {err}") from None
        return SamplingSpec(solver=solver, num_steps=num_steps, time_grid=grid, ddim_eta=ddim_eta,
                            seed=0 if self.seed is None else int(self.seed),
                            strength=None if strength is None else float(strength))

    def nfe(self, process: DiffusionProcess) -> int:
        """Network evaluations per image of this (resolved) spec on ``process``, without SDEdit truncation."""
        grid = sampling_grid(process, self.num_steps, self.solver, self.time_grid or "process")
        return (len(grid) - 1) * NFE_PER_STEP.get(self.solver or process.default_solver, 1)


def multistep_order_cap(j: int, num_steps: int) -> int | None:
    """The highest order a multistep solver may use on step ``j`` (0-based) of ``num_steps``: on grids shorter than
    :data:`LOWER_ORDER_FINAL_BELOW` the last step is first order and the one before at most second (diffusers'
    ``lower_order_final``); otherwise no cap (``None``)."""
    return num_steps - j if num_steps < LOWER_ORDER_FINAL_BELOW else None


def sample_loop(process: DiffusionProcess, denoiser: Denoiser, shape: Sequence[int],
                num_steps: int | None = None, solver: str | None = None,
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, z_init: Tensor | None = None,
                timesteps: Sequence | None = None, progress: bool = False,
                desc: str = "sampling", grid: str = "process", ddim_eta: float = 0.0) -> SampleResult:
    """Run ``process.reverse_step`` (or a multistep / ODE solver) along the ``grid`` time grid of ``num_steps``
    steps (:func:`sampling_grid`) or an explicit descending grid ``timesteps``.

    ``z_init`` replaces the prior draw (e.g. SDEdit starts from a noised guide at ``timesteps[0]``). ``ddim_eta``:
    the ``ddim`` solver's stochasticity (:class:`SamplingSpec`), passed to every reverse step.
    Returns the state at the last time of the grid, in the process domain.
    """
    solver = solver or process.default_solver
    if solver not in process.solvers:
        raise ValueError(process.unknown_solver_message(solver))
    if solver in ODE_SOLVERS:
        return ode_sample(process, denoiser, shape, num_steps, solver, generator, device, dtype, z_init=z_init,
                          timesteps=timesteps, progress=progress, desc=desc, grid=grid)
    ts = list(timesteps) if timesteps is not None else sampling_grid(process, num_steps, solver, grid)
    counted = CountingDenoiser(denoiser)
    z = z_init if z_init is not None else process.prior(tuple(shape), generator, device, dtype)
    pairs = list(zip(ts[:-1], ts[1:]))
    state = MultistepState() if solver in MULTISTEP_SOLVERS else None
    for j, (t, t_next) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        if state is not None:
            z = dpmpp_step(process, counted, z, t, t_next, solver, state, generator=generator,
                           max_order=multistep_order_cap(j, len(pairs)))
        else:
            z = process.reverse_step(counted, z, t, t_next, solver=solver, generator=generator, ddim_eta=ddim_eta)
    return SampleResult(sample=z, nfe=counted.calls, timesteps=ts, solver=solver)


# --- probability-flow ODE ---------------------------------------------------------------------------
def _velocity_fn(process: DiffusionProcess):
    if hasattr(process, "ode_velocity"):
        return process.ode_velocity
    if hasattr(process, "alpha_sigma_dot") and hasattr(process, "predict"):
        return lambda denoiser, z, t: gaussian_pf_velocity(process, denoiser, z, t)
    raise ValueError(f"{type(process).__name__} defines no probability-flow ODE: implement "
                     "ode_velocity(denoiser, z, t) (or alpha_sigma_dot(t) for a GaussianProcess) to use "
                     f"the solvers {ODE_SOLVERS}")


def _times(t, z: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
    return t.expand(z.shape[0]) if t.ndim == 0 else t.to(torch.float64)


def ode_step(process, denoiser: Denoiser, z: Tensor, t, t_next, solver: str) -> Tensor:
    """One step ``t → t_next`` of an explicit Runge-Kutta method on ``dz/dt = ode_velocity``.

    ``euler`` (1 NFE), ``heun`` (RK2 trapezoidal: k2 at the Euler predictor, 2 NFE), ``midpoint``
    (RK2: k2 at the half step, 2 NFE), ``rk4`` (classic 1/6·(k1 + 2k2 + 2k3 + k4), 4 NFE). Step sizes
    and stage times are float64.
    """
    f = _velocity_fn(process)
    tb, sb = _times(t, z), _times(t_next, z)
    h64 = sb - tb
    h = h64.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
    k1 = f(denoiser, z, tb)
    if solver == "euler":
        return z + h * k1
    if solver == "heun":
        k2 = f(denoiser, z + h * k1, sb)
        return z + h * (k1 + k2) / 2
    if solver == "midpoint":
        k2 = f(denoiser, z + h / 2 * k1, tb + h64 / 2)
        return z + h * k2
    if solver == "rk4":
        tm = tb + h64 / 2
        k2 = f(denoiser, z + h / 2 * k1, tm)
        k3 = f(denoiser, z + h / 2 * k2, tm)
        k4 = f(denoiser, z + h * k3, sb)
        return z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")


def ode_sample(process: DiffusionProcess, denoiser: Denoiser, shape: Sequence[int],
               num_steps: int | None = None, solver: str = "euler",
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, z_init: Tensor | None = None,
               timesteps: Sequence | None = None, progress: bool = False,
               desc: str = "sampling", grid: str = "process") -> SampleResult:
    """Integrate the process's probability-flow ODE from the prior along ``ode_timesteps(num_steps)`` (or the
    ``grid`` time grid, or an explicit descending grid) with ``solver`` in :data:`ODE_SOLVERS`; exact NFE is
    counted."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")
    _velocity_fn(process)  # fail before drawing anything
    ts = list(timesteps) if timesteps is not None else sampling_grid(process, num_steps, solver, grid)
    counted = CountingDenoiser(denoiser)
    z = z_init if z_init is not None else process.prior(tuple(shape), generator, device, dtype)
    pairs = list(zip(ts[:-1], ts[1:]))
    for t, t_next in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        z = ode_step(process, counted, z, t, t_next, solver)
    return SampleResult(sample=z, nfe=counted.calls, timesteps=ts, solver=solver)


# --- SDEdit: a reverse loop started from a noised guide ----------------------------------------------
def hijack_grid(process: DiffusionProcess, strength: Optional[float] = None, t0: Any = None,
                num_steps: Optional[int] = None, kind: str = "process") -> list:
    """Sampling grid truncated at the hijack time: ``[t0] + [t in grid if t < t0]``, ``grid`` the time grid of kind
    ``kind`` with ``num_steps`` steps (:func:`~diffproc.samplers.time_grid`; ``process``: ``process.timesteps``).

    Give either ``strength`` ∈ [0, 1] (fraction of the top time of the full chain,
    ``process.timesteps(None)[0]``; T for DDPM and EPDM) or ``t0`` (process units).
    """
    grid = list(time_grid(process, num_steps, kind))
    try:  # top of the full chain (a strided grid may start below it, e.g. DDIM's 91 of T = 100)
        t_max = max(grid[0], process.timesteps(None)[0])
    except (TypeError, ValueError):
        t_max = grid[0]
    if t0 is None:
        if strength is None or not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"SDEdit strength must lie in [0, 1] (fraction of the chain), got {strength}")
        t0 = float(strength) * float(t_max)
        if isinstance(t_max, int):
            t0 = int(round(t0))
    if t0 > t_max or t0 < 0:
        raise ValueError(f"SDEdit hijack time t0={t0} is outside [0, {t_max}] of {type(process).__name__}")
    return [t0] + [t for t in grid if t < t0]


@torch.no_grad()
def sdedit_loop(process: DiffusionProcess, denoiser: Denoiser, z_guide: Tensor, grid: Sequence,
                solver: Optional[str] = None, generator: Optional[torch.Generator] = None,
                ddim_eta: float = 0.0) -> SampleResult:
    """Noise the guide (process domain) to ``grid[0]`` with ``process.forward`` and run the reverse
    steps along ``grid`` (a grid of one time makes no step and returns the noised guide)."""
    t0 = grid[0]
    noise = randn_like(z_guide, generator)
    z_init = process.forward(z_guide, batch_times(t0, z_guide.shape[0], z_guide.device), noise)
    if len(grid) < 2:
        return SampleResult(sample=z_init, nfe=0, timesteps=list(grid), solver=solver or process.default_solver)
    return sample_loop(process, denoiser, tuple(z_guide.shape), solver=solver, generator=generator,
                       z_init=z_init, timesteps=grid, desc="SDEdit", ddim_eta=ddim_eta)
