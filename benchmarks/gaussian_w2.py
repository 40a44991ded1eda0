"""Exact W2 errors of the VP SDE samplers on Gaussian data, through the project's own solver code.

Pierret & Galerne (ICML 2025) tabulate the Wasserstein-2 distance between a sampler's output law and the data
law N(0, diag λ), λ = the CIFAR-10 covariance eigenvalues (``../shared/data``, see its README), for the VP SDE
``dx = −β_t x dt + √(2β_t) dw``, ``β_t = 0.05 + 9.95 t`` on the grid ``t_k = eps + (1 − eps) k/(N − 1)``
(N points, eps = 1e-3), started from the exact p_1. This module reproduces the rows Euler–Maruyama (reverse
SDE), Euler and Heun (probability-flow ODE) with :class:`~diffproc.processes.vp_sde.VPSDEProcess` and the
samplers of ``diffproc.samplers`` — no re-derived recursion.

Why it is exact (no Monte Carlo). For Gaussian data the exact denoiser is linear per coordinate::

    ε̂(z_t, t) = σ_t z_t / (α_t² λ + σ_t²),        x̂0(z_t, t) = α_t λ z_t / (α_t² λ + σ_t²)

so every solver step is a linear map of the state and the step's noise, diagonal in the coordinates:

* a deterministic solver sends ``x_1`` to ``a ⊙ x_1``; running it on ``z_init = 1`` gives ``a``, and the
  output variance is ``a² ⊙ var(x_1)``;
* an Euler–Maruyama step is ``x_{k+1} = A_k ⊙ x_k + B_k ⊙ ξ_k``; one call of the step on the batch
  ``(z, ξ) = [(1, 0), (0, 1)]`` returns ``A_k`` and ``B_k`` and ``var_{k+1} = A_k² var_k + B_k²``.

W2 between centred Gaussians with the same eigenbasis: ``√(Σ_i (√v_i − √λ_i)²)``.

Run ``python benchmarks/gaussian_w2.py`` to print our table beside the published one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffproc.processes.vp_sde import VPSDEProcess
from diffproc.samplers import CountingModelFn, sample_loop

REPO = Path(__file__).resolve().parents[1]
#: the eigenvalue file shipped beside the repository (``../shared/data``)
EIGENVALUES = REPO.parent / "shared" / "data" / "cifar10_covariance_eigenvalues.npy"
#: CIFAR-10's image shape: the 3072 eigen-coordinates are laid out as one image
SHAPE = (3, 32, 32)
#: grid sizes N (points; N − 1 steps) of the published table
GRID_POINTS = (50, 250, 500, 1000)
#: the published W2 errors (Figures_readme/table.png; truncation eps = 1e-3, initialised from p_T)
PUBLISHED: dict[str, dict[int, float]] = {
    "euler_maruyama": {50: 4.67, 250: 0.69, 500: 0.39, 1000: 0.27},
    "euler": {50: 1.72, 250: 0.42, 500: 0.27, 1000: 0.21},
    "heun": {50: 0.56, 250: 0.13, 500: 0.16, 1000: 0.17},
}
LABELS = {"euler_maruyama": "Euler-Maruyama (reverse SDE)", "euler": "Euler (probability-flow ODE)",
          "heun": "Heun (probability-flow ODE)"}


def load_eigenvalues(path: Path | str = EIGENVALUES) -> Tensor:
    """λ as a float64 tensor of shape :data:`SHAPE`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is the file cifar10.npy of github.com/emilePi/Preprint_code "
                                "(see shared/data/README.md)")
    lam = torch.from_numpy(np.load(path).astype(np.float64))
    return lam.reshape(SHAPE)


def paper_process() -> VPSDEProcess:
    """The table's VP SDE: β_min 0.1, β_max 20 (β_t = 0.05 + 9.95 t), eps = 1e-3, ε-prediction, no clipping
    (the exact denoiser of unbounded Gaussian data must reach the solver unchanged)."""
    return VPSDEProcess(beta_min=0.1, beta_max=20.0, eps=1e-3, prediction="eps", clip_x0=False)


def exact_denoiser(process: VPSDEProcess, lam: Tensor):
    """``model_fn(z, t)`` returning the exact ε̂ (or x̂0, per ``process.prediction``) of data N(0, diag λ),
    λ shaped like one sample in the process basis (the pixels here)."""
    if process.prediction not in ("eps", "x0"):
        raise ValueError(f"exact_denoiser supports prediction 'eps' or 'x0', not {process.prediction!r}")

    def model_fn(z: Tensor, t: Tensor) -> Tensor:
        a, s = process.coefficients(t, z)
        lam_z = lam.to(z)
        var = a * a * lam_z + s * s
        return s * z / var if process.prediction == "eps" else a * lam_z * z / var

    return model_fn


def pT_variance(process: VPSDEProcess, lam: Tensor) -> Tensor:
    """Variances of the exact p_1 = N(0, α_1² λ + σ_1²)."""
    a, s = process.alpha_sigma(torch.ones(1, dtype=torch.float64))
    return a[0] ** 2 * lam + s[0] ** 2


def deterministic_gain(process: VPSDEProcess, model_fn, num_steps: int, solver: str) -> tuple[Tensor, int]:
    """``(a, nfe)``: the solver maps ``x_1`` to ``a ⊙ x_1`` (run by ``sample_loop`` on ``z_init = 1``)."""
    z_init = torch.ones((1, *SHAPE), dtype=torch.float64)
    res = sample_loop(process, model_fn, z_init.shape, num_steps=num_steps, solver=solver,
                      dtype=torch.float64, z_init=z_init)
    return res.sample[0], res.nfe


def sde_variance(process: VPSDEProcess, model_fn, num_steps: int, var_init: Tensor) -> tuple[Tensor, int]:
    """``(var_out, nfe)`` of ``num_steps`` Euler–Maruyama steps from a centred Gaussian of variances
    ``var_init``: each step's ``(A_k, B_k)`` from one call of ``process.reverse_sde_step`` (the code
    ``reverse_step(solver="euler_maruyama")`` runs) on ``(z, ξ) = [(1, 0), (0, 1)]``."""
    counted = CountingModelFn(model_fn)
    one = torch.ones((1, *SHAPE), dtype=torch.float64)
    z, xi = torch.cat([one, 0 * one]), torch.cat([0 * one, one])
    grid = process.timesteps(num_steps)
    var = var_init.clone()
    for t, t_next in zip(grid[:-1], grid[1:]):
        out = process.reverse_sde_step(counted, z, t, t_next, xi)
        var = out[0] ** 2 * var + out[1] ** 2
    return var, counted.calls


def w2_diag(var: Tensor, lam: Tensor) -> float:
    """W2 between N(0, diag var) and N(0, diag λ): ``√(Σ (√var − √λ)²)``."""
    return float(torch.sqrt(((var.clamp_min(0).sqrt() - lam.sqrt()) ** 2).sum()))


def w2_cell(scheme: str, grid_points: int, lam: Tensor, process: VPSDEProcess | None = None) -> tuple[float, int]:
    """``(W2, nfe)`` of ``scheme`` (``euler_maruyama``, or an ODE solver) with ``grid_points`` grid points,
    initialised from the exact p_1."""
    process = process or paper_process()
    model_fn = exact_denoiser(process, lam)
    var_init = pT_variance(process, lam)
    steps = grid_points - 1
    if scheme == "euler_maruyama":
        var, nfe = sde_variance(process, model_fn, steps, var_init)
    else:
        a, nfe = deterministic_gain(process, model_fn, steps, scheme)
        var = a * a * var_init
    return w2_diag(var, lam), nfe


def w2_table(lam: Tensor, schemes=tuple(PUBLISHED), grid_points=GRID_POINTS) -> dict[str, dict[int, tuple[float, int]]]:
    """``{scheme: {N: (W2, nfe)}}``."""
    process = paper_process()
    return {s: {n: w2_cell(s, n, lam, process) for n in grid_points} for s in schemes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eigenvalues", default=str(EIGENVALUES))
    args = ap.parse_args(argv)
    lam = load_eigenvalues(args.eigenvalues)
    t0 = time.perf_counter()
    table = w2_table(lam)
    secs = time.perf_counter() - t0
    print("| scheme | " + " | ".join(f"N = {n} ours / paper" for n in GRID_POINTS) + " |")
    print("|---|" + "---|" * len(GRID_POINTS))
    for s, row in table.items():
        cells = [f"{row[n][0]:.4f} / {PUBLISHED[s][n]:.2f}" for n in GRID_POINTS]
        print(f"| {LABELS[s]} | " + " | ".join(cells) + " |")
    worst = max(abs(table[s][n][0] - PUBLISHED[s][n]) for s in table for n in GRID_POINTS)
    print(f"largest |ours - published| = {worst:.4f}; NFE "
          + ", ".join(f"{s}: {[table[s][n][1] for n in GRID_POINTS]}" for s in table) + f"; {secs:.1f} s")


if __name__ == "__main__":
    main()
