"""Generic sampling loops over a process's :meth:`reverse_step` (and, for processes with a
probability-flow ODE, ODE solvers). They see the network only as ``model_fn(z, t)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffproc.processes.base import DiffusionProcess, ModelFn


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
    """Output of a sampling loop: the final domain state, the NFE actually spent and the time grid."""

    sample: Tensor
    nfe: int
    timesteps: list = field(default_factory=list)
    solver: str = ""


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
        raise ValueError(f"{type(process).__name__} has no solver {solver!r}; choose one of {process.solvers}")
    grid = list(timesteps) if timesteps is not None else list(process.timesteps(num_steps))
    counted = CountingModelFn(model_fn)
    z = z_init if z_init is not None else process.prior(tuple(shape), generator, device, dtype)
    pairs = list(zip(grid[:-1], grid[1:]))
    for t, t_next in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        z = process.reverse_step(counted, z, t, t_next, solver=solver, generator=generator)
    return SampleResult(sample=z, nfe=counted.calls, timesteps=grid, solver=solver)
