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

from diffproc.ops import idct2
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.gaussian import MultistepState, dpmpp_step
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.interpolation import InterpolationProcess
from diffproc.processes.vp_sde import VPSDEProcess
from diffproc.samplers import TIME_GRIDS as GRIDS, CountingDenoiser, multistep_order_cap, sample_loop, time_grid

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


def fmnist_eigenvalues(root: str | None = None) -> Tensor:
    """The covariance eigenvalues of the Fashion-MNIST training images as the configs see them (28×28 padded by 2
    background pixels to 32×32, scaled to [-1, 1]), sorted decreasingly, shape ``(1, 32, 32)``: the second data law
    of the solver tables (issue 30). ``root``: as ``FashionMNISTDataModule``'s (``None``: its own search)."""
    from diffproc.data.mnist import FashionMNISTDataModule, to_size

    images, _ = FashionMNISTDataModule(root=root).arrays("train")
    x = to_size(images, 32, "pad").reshape(len(images), -1).double() / 127.5 - 1.0
    x = x - x.mean(0)
    lam = torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).clamp_min(0.0).flip(0)
    return lam.reshape(1, 32, 32)


def load_eigenvalues(path: Path | str = EIGENVALUES) -> Tensor:
    """λ as a float64 tensor of shape :data:`SHAPE`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is the file cifar10.npy of github.com/emilePi/Preprint_code "
                                "(see shared/data/README.md)")
    lam = torch.from_numpy(np.load(path).astype(np.float64))
    return lam.reshape(SHAPE)


def paper_process() -> VPSDEProcess:
    """The table's VP SDE: β_min 0.1, β_max 20 (β_t = 0.05 + 9.95 t), eps = 1e-3, no clipping
    (the exact denoiser of unbounded Gaussian data must reach the solver unchanged)."""
    return VPSDEProcess(beta_min=0.1, beta_max=20.0, eps=1e-3, clip_x0=False)


def exact_denoiser(process, lam: Tensor):
    """The exact denoiser ``(z, t) -> (û0, ε̂)`` of data N(0, diag λ) in the process basis (what any trained network
    behind any head approximates), λ shaped like one sample's basis coefficients (the pixels for VP SDE / DDPM, DCT
    coefficients for blur). Per coordinate ``ε̂ = σ u / (α² λ + σ²)``, ``x̂0 = α λ u / (α² λ + σ²)``, ``u = M z``."""

    def denoiser(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        u = process.to_basis(z)
        a, s = process.coefficients(t, u)
        lam_z = lam.to(u)
        var = a * a * lam_z + s * s
        return a * lam_z * u / var, s * u / var

    return denoiser


def pT_variance(process: VPSDEProcess, lam: Tensor) -> Tensor:
    """Variances of the exact p_1 = N(0, α_1² λ + σ_1²)."""
    a, s = process.alpha_sigma(torch.ones(1, dtype=torch.float64))
    return a[0] ** 2 * lam + s[0] ** 2


def deterministic_gain(process, denoiser, num_steps: int, solver: str, shape=SHAPE,
                       timesteps=None) -> tuple[Tensor, int]:
    """``(a, nfe)``: the solver maps the basis coefficients ``u_T`` to ``a ⊙ u_T`` (run by ``sample_loop`` on
    the state whose coefficients are all 1; ``timesteps`` overrides the process's grid)."""
    z_init = process.from_basis(torch.ones((1, *shape), dtype=torch.float64))
    res = sample_loop(process, denoiser, z_init.shape, num_steps=num_steps, solver=solver,
                      dtype=torch.float64, z_init=z_init, timesteps=timesteps)
    return process.to_basis(res.sample)[0], res.nfe


def sde_variance(process: VPSDEProcess, denoiser, num_steps: int, var_init: Tensor) -> tuple[Tensor, int]:
    """``(var_out, nfe)`` of ``num_steps`` Euler–Maruyama steps from a centred Gaussian of variances
    ``var_init``: each step's ``(A_k, B_k)`` from one call of ``process.reverse_sde_step`` (the code
    ``reverse_step(solver="euler_maruyama")`` runs) on ``(z, ξ) = [(1, 0), (0, 1)]``."""
    counted = CountingDenoiser(denoiser)
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
    denoiser = exact_denoiser(process, lam)
    var_init = pT_variance(process, lam)
    steps = grid_points - 1
    if scheme == "euler_maruyama":
        var, nfe = sde_variance(process, denoiser, steps, var_init)
    else:
        a, nfe = deterministic_gain(process, denoiser, steps, scheme)
        var = a * a * var_init
    return w2_diag(var, lam), nfe


def w2_table(lam: Tensor, schemes=tuple(PUBLISHED), grid_points=GRID_POINTS) -> dict[str, dict[int, tuple[float, int]]]:
    """``{scheme: {N: (W2, nfe)}}``."""
    process = paper_process()
    return {s: {n: w2_cell(s, n, lam, process) for n in grid_points} for s in schemes}


# --- exponential integrators (DPM-Solver++) against DDIM on every Gaussian process ------------------------
#: NFE budgets of the solver table (1 NFE a step for every solver below)
SOLVER_NFE = (5, 10, 20, 50, 100)
#: solvers of the table: DDIM (η = 0), DPM-Solver++(2M), DPM-Solver++(2M) SDE, DPM-Solver++(3M)
TABLE_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m")
RESULTS = REPO / "docs" / "results" / "gaussian_w2"


def stationary_spectrum(lam: Tensor, shape=SHAPE) -> Tensor:
    """A stationary image law with CIFAR-10's eigenvalues: its covariance is diagonal in the (per-channel) DCT
    basis, and the eigenvalues, sorted decreasingly, go to the DCT modes sorted by increasing frequency
    ``ω² = (πk/H)² + (πl/W)²`` (channels interleaved). λ for the DCT-basis processes (blur)."""
    c, h, w = shape
    k = torch.arange(h, dtype=torch.float64)[:, None] / h
    l = torch.arange(w, dtype=torch.float64)[None, :] / w
    freq = (k**2 + l**2).expand(c, h, w).flatten()
    order = torch.argsort(freq * (1 + 1e-9) + torch.arange(c).repeat_interleave(h * w) * 1e-12, stable=True)
    out = torch.empty(c * h * w, dtype=torch.float64)
    out[order] = torch.sort(lam.flatten(), descending=True).values
    return out.reshape(shape)


def gddm_spectrum(process: GradientDomainProcess, lam_dct: Tensor) -> Tensor:
    """Eigenvalues of the GDDM domain data ``z0 = to_domain(x0)`` for ``x0`` with DCT-diagonal covariance
    ``lam_dct`` (C, H, W), laid out in the domain state's shape (zeros in the null space). GDDM's algebra is
    DDPM's (scalar α, σ, identity basis, i.i.d. noise), so it acts on each eigen-coordinate of the domain
    covariance alone: running it on a state holding these eigenvalues gives the exact domain W2."""
    c, h, w = lam_dct.shape
    cols = idct2(torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w))  # images of the DCT modes
    t_cols = process.to_domain(cols).reshape(h * w, -1)  # (modes, domain coords of one channel)
    gram = t_cols @ t_cols.T
    eig = []
    for ch in range(c):
        r = lam_dct[ch].flatten().sqrt()
        eig.append(torch.linalg.eigvalsh(r[:, None] * gram * r[None, :]).clamp_min(0.0))
    dom = process.to_domain(torch.zeros(1, c, h, w, dtype=torch.float64)).shape[1:]
    out = torch.zeros(int(np.prod(dom)), dtype=torch.float64)
    vals = torch.sort(torch.cat(eig), descending=True).values
    out[: vals.numel()] = vals
    return out.reshape(dom)


def solver_processes(lam: Tensor) -> dict[str, tuple]:
    """``{name: (process, λ in the process basis, state shape)}`` of the table: VP SDE (score_sde, as in the
    published table), DDPM (T = 1000, linear β), SIE (sin schedule, dual heads), blur diffusion (DCT basis,
    quartic blur, data range [-1, 1]) and GDDM (gradient domain, aux DC); clipping off everywhere."""
    shape = tuple(lam.shape)
    blur = BlurProcess(clip_x0=False, data_range="minus_one_one").set_geometry(shape[1], shape[0])
    lam_dct = stationary_spectrum(lam, shape)
    gddm = GradientDomainProcess(clip_x0=False)
    lam_g = gddm_spectrum(gddm, lam_dct)
    return {
        "VP-SDE": (paper_process(), lam, shape),
        "DDPM": (DDPMProcess(clip_x0=False), lam, shape),
        "SIE": (InterpolationProcess(clip_x0=False), lam, shape),
        "blur": (blur, lam_dct, shape),
        "GDDM": (gddm, lam_g, tuple(lam_g.shape)),
    }


def multistep_sde_variance(process, denoiser, grid: list, var_init: Tensor, shape=SHAPE) -> tuple[Tensor, int]:
    """``(var_out, nfe)`` of DPM-Solver++(2M) SDE from a centred Gaussian of basis variances ``var_init``,
    exactly: the chain is linear in the start state and the step noises, so it is run once (through
    :func:`dpmpp_step`, the code ``sample_loop`` runs) on a batch whose row 0 starts at coefficients 1 with no
    noise and row j ≥ 1 starts at 0 with noise e_j only at step j; ``var = a_0² var_init + Σ_j a_j²``."""
    S = len(grid) - 1
    counted = CountingDenoiser(denoiser)
    u = torch.zeros((S + 1, *shape), dtype=torch.float64)
    u[0] = 1.0
    z = process.from_basis(u)
    state = MultistepState()
    for j, (t, t_next) in enumerate(zip(grid[:-1], grid[1:]), start=1):
        xi = torch.zeros_like(u)
        xi[j] = 1.0
        z = dpmpp_step(process, counted, z, t, t_next, "dpmpp_2m_sde", state, noise=process.from_basis(xi),
                       max_order=multistep_order_cap(j - 1, S))
    gains = process.to_basis(z)
    return gains[0] ** 2 * var_init + (gains[1:] ** 2).sum(0), counted.calls


def start_variance(process, lam: Tensor, t0) -> Tensor:
    """Basis variances of the exact marginal at the grid's first time ``t0``: ``α² λ + σ²``."""
    tt = torch.as_tensor([t0], dtype=torch.float64 if isinstance(t0, float) else torch.long)
    a, s = process.alpha_sigma(tt)
    return a[0] ** 2 * lam + s[0] ** 2


def solver_w2(process, lam: Tensor, shape, solver: str, num_steps: int, grid: str = "process") -> tuple[float, int]:
    """``(W2, nfe)`` of ``solver`` with ``num_steps`` steps on ``grid``, started from the exact marginal at
    the grid's first time, with the exact denoiser of N(0, diag λ)."""
    denoiser = exact_denoiser(process, lam)
    ts = time_grid(process, num_steps, grid)
    var_init = start_variance(process, lam, ts[0])
    if solver == "dpmpp_2m_sde":
        var, nfe = multistep_sde_variance(process, denoiser, ts, var_init, shape)
    else:
        a, nfe = deterministic_gain(process, denoiser, None, solver, shape, timesteps=ts)
        var = a * a * var_init
    return w2_diag(var, lam), nfe


def solver_table(lam: Tensor, nfes=SOLVER_NFE, solvers=TABLE_SOLVERS, grid: str = "process",
                 processes: dict | None = None) -> dict[str, dict[str, dict[int, tuple[float, int]]]]:
    """``{process: {solver: {NFE: (W2, nfe counted)}}}``."""
    processes = processes or solver_processes(lam)
    return {name: {s: {n: solver_w2(p, l, shape, s, n, grid) for n in nfes} for s in solvers}
            for name, (p, l, shape) in processes.items()}


def write_solver_results(table, out_dir: Path = RESULTS, grid: str = "process", secs: float | None = None,
                         law: str = "CIFAR-10 eigenvalues") -> None:
    """``table.md`` (markdown, W2 per process × solver × NFE) and ``w2_vs_nfe.png`` (one panel a process)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nfes = sorted(next(iter(next(iter(table.values())).values())))
    lines = [f"# Exact W2 on N(0, diag λ) ({law}), grid `{grid}`", "",
             "Generated by `python benchmarks/gaussian_w2.py --solvers` (exact: linear denoiser, no Monte Carlo; "
             "started from the exact marginal at the grid's first time). VP-SDE/DDPM/SIE: λ in pixels; blur: "
             "the same eigenvalues on DCT modes by frequency (stationary law); GDDM: the eigenvalues of that "
             "law's gradient-domain covariance (W2 in the domain). Counted NFE in brackets where it differs.", "",
             "| process | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for pname, rows in table.items():
        for sname, row in rows.items():
            cells = [f"{row[n][0]:.4f}" + ("" if row[n][1] == n else f" [{row[n][1]}]") for n in nfes]
            lines.append(f"| {pname} | {sname} | " + " | ".join(cells) + " |")
    if secs is not None:
        lines += ["", f"({secs:.1f} s on one CPU core)"]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 3.0), sharey=False)
    for ax, (pname, rows) in zip(np.atleast_1d(axes), table.items()):
        for sname, row in rows.items():
            ax.loglog([row[n][1] for n in nfes], [row[n][0] for n in nfes], marker="o", label=sname)
        ax.set_title(pname)
        ax.set_xlabel("NFE")
    np.atleast_1d(axes)[0].set_ylabel("W2")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "w2_vs_nfe.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eigenvalues", default=str(EIGENVALUES))
    ap.add_argument("--fmnist", nargs="?", const="", default=None, metavar="ROOT",
                    help="--solvers on the covariance eigenvalues of the Fashion-MNIST training images (32×32 padded) "
                         "instead of CIFAR-10's; ROOT as the DataModule's (default: its own search); results under "
                         "<out>/fmnist/")
    ap.add_argument("--solvers", action="store_true",
                    help="DDIM / DPM-Solver++(2M) / 2M SDE on every Gaussian process: write table.md and "
                         "w2_vs_nfe.png into docs/results/gaussian_w2/ (instead of the published EM/Euler/Heun table)")
    ap.add_argument("--grid", default="process", choices=GRIDS, help="time grid of --solvers")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    lam = load_eigenvalues(args.eigenvalues) if args.fmnist is None else fmnist_eigenvalues(args.fmnist or None)
    if args.solvers:
        t0 = time.perf_counter()
        table = solver_table(lam, grid=args.grid)
        secs = time.perf_counter() - t0
        out = Path(args.out) if args.fmnist is None else Path(args.out) / "fmnist"
        out = out if args.grid == "process" else out / args.grid
        law = "CIFAR-10 eigenvalues" if args.fmnist is None else "Fashion-MNIST 32×32 eigenvalues"
        write_solver_results(table, out, args.grid, secs, law)
        print((out / "table.md").read_text())
        return
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
