"""Generic sampling loops over a process's :meth:`reverse_step` and, for processes with a
probability-flow ODE, ODE solvers. They see the network only as ``model_fn(z, t)``.

ODE protocol (any process, not only SIE). A process that defines a probability-flow ODE exposes

* ``ode_velocity(model_fn, z, t) -> dz/dt`` for a ``(B,)`` float64 time tensor ``t``, and
* ``ode_timesteps(num_steps) -> [t_S, …, t_0]`` (descending; falls back to ``timesteps``),

and lists the solver names it supports in ``process.solvers``. :func:`sample_loop` then runs
``euler | heun | midpoint | rk4`` over that grid (:data:`ODE_SOLVERS`). Diagonal Gaussian processes
(``u_t = α_t u0 + σ_t ε``) get the velocity for free from :func:`gaussian_pf_velocity` once they
define ``alpha_sigma_dot(t) -> (dα/dt, dσ/dt)``: the PF-ODE is ``du/dt = α' û0 + σ' ε̂``
(Song et al. 2021's ODE with score = −ε̂/σ, rewritten with û0 = (u − σ ε̂)/α). Any Gaussian process
can also offer ``ddim_dual`` through :func:`ddim_dual_step`.

Multistep exponential integrators (:data:`~diffproc.processes.base.MULTISTEP_SOLVERS`: ``dpmpp_2m``,
``dpmpp_2m_sde``) run on any diagonal Gaussian process that lists them in ``solvers``: :func:`sample_loop`
steps :func:`~diffproc.processes.gaussian.dpmpp_step` along the process's own :meth:`timesteps` grid (the grid
of ``ancestral``/``ddim``), carrying a :class:`~diffproc.processes.gaussian.MultistepState`. The log-SNR step is
per coordinate of the process basis; the last step to σ = 0 is first order (returns α' û0).

NFE: every solver counts calls through :class:`CountingModelFn`; per step Euler 1, Heun 2,
midpoint 2, RK4 4, DPM-Solver++ 1 (:data:`NFE_PER_STEP`), reported as ``SampleResult.nfe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffproc.processes.base import MULTISTEP_SOLVERS, ODE_SOLVERS, DiffusionProcess, ModelFn
from diffproc.processes.gaussian import MultistepState, ddim_dual_step, dpmpp_step, gaussian_pf_velocity

# ODE_SOLVERS (defined with the process API, processes/base.py): the probability-flow ODE solvers run by
# :func:`sample_loop` through the ODE protocol. gaussian_pf_velocity / ddim_dual_step live with the Gaussian
# core (processes/gaussian.py) and are re-exported here.
#: network evaluations per step of each solver
NFE_PER_STEP: dict[str, int] = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "ddim_dual": 1,
                                "ddim": 1, "ancestral": 1, "euler_maruyama": 1,
                                "dpmpp_2m": 1, "dpmpp_2m_sde": 1}


class CountingModelFn:
    """Wraps ``model_fn`` and counts network evaluations (NFE = number of calls)."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn
        self.calls = 0

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model_fn(z, t)


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


def sampling_grid(process: DiffusionProcess, num_steps: int | None, solver: str | None = None) -> list:
    """The descending time grid ``solver`` visits with ``num_steps`` steps (``ode_timesteps`` for the ODE
    solvers). Refuses, rather than silently shortens, a request for more steps than the process has."""
    grid_fn = process.timesteps
    if solver in ODE_SOLVERS:
        grid_fn = getattr(process, "ode_timesteps", grid_fn)
    grid = list(grid_fn(num_steps))
    if num_steps is not None and len(grid) - 1 < int(num_steps):
        raise ValueError(f"num_steps={num_steps} is more than {type(process).__name__} can take: its grid has "
                         f"{len(grid) - 1} steps at most (num_timesteps={getattr(process, 'num_timesteps', '?')}). "
                         f"Ask for {len(grid) - 1} or fewer steps")
    return grid


def sample_loop(process: DiffusionProcess, model_fn: ModelFn, shape: Sequence[int],
                num_steps: int | None = None, solver: str | None = None,
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, z_init: Tensor | None = None,
                timesteps: Sequence | None = None, progress: bool = False,
                desc: str = "sampling") -> SampleResult:
    """Run ``process.reverse_step`` along ``process.timesteps(num_steps)`` (or an explicit grid).

    ``z_init`` replaces the prior draw (e.g. SDEdit starts from a noised guide at ``timesteps[0]``).
    Returns the state at the last time of the grid, in the process domain.
    """
    solver = solver or process.default_solver
    if solver not in process.solvers:
        raise ValueError(process.unknown_solver_message(solver))
    if solver in ODE_SOLVERS:
        return ode_sample(process, model_fn, shape, num_steps, solver, generator, device, dtype,
                          z_init=z_init, timesteps=timesteps, progress=progress, desc=desc)
    grid = list(timesteps) if timesteps is not None else sampling_grid(process, num_steps, solver)
    counted = CountingModelFn(model_fn)
    z = z_init if z_init is not None else process.prior(tuple(shape), generator, device, dtype)
    pairs = list(zip(grid[:-1], grid[1:]))
    state = MultistepState() if solver in MULTISTEP_SOLVERS else None
    for t, t_next in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        if state is not None:
            z = dpmpp_step(process, counted, z, t, t_next, solver, state, generator=generator)
        else:
            z = process.reverse_step(counted, z, t, t_next, solver=solver, generator=generator)
    return SampleResult(sample=z, nfe=counted.calls, timesteps=grid, solver=solver)


# --- probability-flow ODE ---------------------------------------------------------------------------
def _velocity_fn(process: DiffusionProcess):
    if hasattr(process, "ode_velocity"):
        return process.ode_velocity
    if hasattr(process, "alpha_sigma_dot") and hasattr(process, "predict"):
        return lambda model_fn, z, t: gaussian_pf_velocity(process, model_fn, z, t)
    raise ValueError(f"{type(process).__name__} defines no probability-flow ODE: implement "
                     "ode_velocity(model_fn, z, t) (or alpha_sigma_dot(t) for a GaussianProcess) to use "
                     f"the solvers {ODE_SOLVERS}")


def _times(t, z: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
    return t.expand(z.shape[0]) if t.ndim == 0 else t.to(torch.float64)


def ode_step(process, model_fn: ModelFn, z: Tensor, t, t_next, solver: str) -> Tensor:
    """One step ``t → t_next`` of an explicit Runge-Kutta method on ``dz/dt = ode_velocity``.

    ``euler`` (1 NFE), ``heun`` (RK2 trapezoidal: k2 at the Euler predictor, 2 NFE), ``midpoint``
    (RK2: k2 at the half step, 2 NFE), ``rk4`` (classic 1/6·(k1 + 2k2 + 2k3 + k4), 4 NFE). Step sizes
    and stage times are float64.
    """
    f = _velocity_fn(process)
    tb, sb = _times(t, z), _times(t_next, z)
    h64 = sb - tb
    h = h64.to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
    k1 = f(model_fn, z, tb)
    if solver == "euler":
        return z + h * k1
    if solver == "heun":
        k2 = f(model_fn, z + h * k1, sb)
        return z + h * (k1 + k2) / 2
    if solver == "midpoint":
        k2 = f(model_fn, z + h / 2 * k1, tb + h64 / 2)
        return z + h * k2
    if solver == "rk4":
        tm = tb + h64 / 2
        k2 = f(model_fn, z + h / 2 * k1, tm)
        k3 = f(model_fn, z + h / 2 * k2, tm)
        k4 = f(model_fn, z + h * k3, sb)
        return z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")


def ode_sample(process: DiffusionProcess, model_fn: ModelFn, shape: Sequence[int],
               num_steps: int | None = None, solver: str = "euler",
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, z_init: Tensor | None = None,
               timesteps: Sequence | None = None, progress: bool = False,
               desc: str = "sampling") -> SampleResult:
    """Integrate the process's probability-flow ODE from the prior along ``ode_timesteps(num_steps)``
    (or an explicit descending grid) with ``solver`` in :data:`ODE_SOLVERS`; exact NFE is counted."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")
    _velocity_fn(process)  # fail before drawing anything
    grid = list(timesteps) if timesteps is not None else sampling_grid(process, num_steps, solver)
    counted = CountingModelFn(model_fn)
    z = z_init if z_init is not None else process.prior(tuple(shape), generator, device, dtype)
    pairs = list(zip(grid[:-1], grid[1:]))
    for t, t_next in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        z = ode_step(process, counted, z, t, t_next, solver)
    return SampleResult(sample=z, nfe=counted.calls, timesteps=grid, solver=solver)
