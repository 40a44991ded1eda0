"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2 §3).

A *power-function* EMA with exponent gamma averages the weights theta(s) of steps s = 1..t with density
``(gamma+1) s^gamma / t^(gamma+1)``: its width relative to the run length, ``sigma_rel = sqrt((gamma+1) /
((gamma+2)^2 (gamma+3)))``, stays the same at every t. Updated after optimiser step t with
``beta_t = (1 - 1/t)^(gamma+1)``, the discrete weight of step s in the average at step t is exactly

    w_t(s) = (s/t)^(gamma+1) - ((s-1)/t)^(gamma+1)        (the density integrated over [s-1, s])

Training keeps two such profiles (:class:`~diffproc.callbacks.posthoc_ema.PostHocEMA`, ``--posthoc_ema.*``) and saves
their snapshots every N steps. Every snapshot is a known linear combination of the same trajectory theta(1..T), so
the EMA of any other ``sigma_rel`` at a snapshot step is approximated by the combination of snapshots whose weights
w are closest (least squares over the steps) to the target's: ``x = argmin || sum_i x_i w_i - w_r ||`` subject to
``sum_i x_i = 1``, ``theta_r = sum_i x_i snapshot_i``. Two differences from EDM2's continuous solve: the Gram matrix
is summed over the discrete steps (exact for the discrete updates above), and the coefficients are constrained to
sum to 1 like every w, so the part of the weights common to all steps is reproduced exactly.

Command (writes a checkpoint that ``cli.py test``/``predict`` and ``python -m diffproc.interop.export`` take)::

    python -m diffproc.posthoc_ema --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --sigma_rel 0.08 \\
        --out runs/quickstart/version_0/checkpoints/phema_0.080.ckpt

This file is Lightning-free (torch and numpy); the callback that feeds it lives in ``diffproc/callbacks``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

SNAPSHOT_PREFIX = "phema"
#: largest sigma_rel with gamma > 0 (gamma = 0 is the plain running mean, sigma_rel = 1/sqrt(12))
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """gamma of the power profile with relative width ``sigma_rel``: the largest real root of
    ``g^3 + 7 g^2 + (16 - 1/s^2) g + (12 - 1/s^2) = 0`` (``s^2 (g+2)^2 (g+3) = g+1`` expanded)."""
    s = float(sigma_rel)
    if not 0.0 < s < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (gamma > 0), got {sigma_rel}")
    k = 1.0 / (s * s)
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def power_beta(step: int, gamma: float) -> float:
    """EMA decay after optimiser step ``step`` (1-based): ``(1 - 1/step)^(gamma+1)`` (0 at the first step)."""
    return (1.0 - 1.0 / max(1, int(step))) ** (gamma + 1.0)


def step_weights(gamma: float, t: int, steps: np.ndarray) -> np.ndarray:
    """``w_t(s)`` of the module docstring for the 1-based ``steps`` (0 for s > t), float64."""
    s = np.asarray(steps, dtype=np.float64)
    w = (s / t) ** (gamma + 1.0) - (np.maximum(s - 1.0, 0.0) / t) ** (gamma + 1.0)
    return np.where(s <= t, w, 0.0)


class PowerEMA:
    """One power-function EMA profile over a list of tensors (float32 copies)."""

    def __init__(self, sigma_rel: float, tensors: Iterable[Tensor]) -> None:
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.ema = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor], step: int) -> None:
        """Fold in the weights after optimiser step ``step`` (1-based)."""
        cur = [t.detach().float() for t in tensors]
        torch._foreach_lerp_(self.ema, cur, 1.0 - power_beta(step, self.gamma))


# --- snapshots and reconstruction -------------------------------------------------------------------
@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"{SNAPSHOT_PREFIX}-{int(step):09d}-{float(sigma_rel):.4f}.pt"


def save_snapshot(directory: str | os.PathLike, state: dict[str, Tensor], step: int, sigma_rel: float,
                  gamma: float) -> Path:
    """Write one profile's weights at ``step`` (atomic: a temporary file renamed into place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / snapshot_name(step, sigma_rel)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state.items()}, "step": int(step),
                "sigma_rel": float(sigma_rel), "gamma": float(gamma)}, tmp)
    os.replace(tmp, path)
    return path


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Snapshots in ``directory`` (metadata read through a memory map: the weights are not loaded)."""
    out = []
    for path in sorted(Path(directory).glob(f"{SNAPSHOT_PREFIX}-*.pt")):
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        out.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"])))
    return out


def solve_coefficients(snapshots: Sequence[Snapshot], gamma: float, step: int, chunk: int = 1 << 16) -> np.ndarray:
    """Least-squares coefficients ``x`` with ``sum_i x_i w_i ~ w_r`` (Gram summed over steps 1..max, float64)."""
    n = len(snapshots)
    a = np.zeros((n, n))
    b = np.zeros(n)
    last = max([step] + [s.step for s in snapshots])
    for lo in range(1, last + 1, chunk):
        s = np.arange(lo, min(last, lo + chunk - 1) + 1)
        w = np.stack([step_weights(sn.gamma, sn.step, s) for sn in snapshots])
        a += w @ w.T
        b += w @ step_weights(gamma, step, s)
    # every w sums to 1 over the steps: constrain sum(x) = 1 too (KKT system), so the weights' common part is kept
    # exactly and only the trajectory's changes are fitted
    kkt = np.block([[a, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    return np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]


def select_snapshots(snapshots: Sequence[Snapshot], step: Optional[int] = None,
                     profiles: Optional[Sequence[float]] = None) -> tuple[list[Snapshot], int]:
    """Snapshots taken at or before ``step`` (default: the last snapshot step) of the given profiles (default:
    all); returns them and the step."""
    use = [s for s in snapshots if profiles is None or any(abs(s.sigma_rel - p) < 1e-6 for p in profiles)]
    if not use:
        raise ValueError("no snapshots" + (f" of the profiles {list(profiles)}" if profiles else "")
                         + ": train with --posthoc_ema.every_n_steps N (PostHocEMA callback)")
    step = max(s.step for s in use) if step is None else int(step)
    use = [s for s in use if s.step <= step]
    if not any(s.step == step for s in use):
        raise ValueError(f"no snapshot at step {step}; snapshot steps: {sorted({s.step for s in snapshots})}")
    return use, step


@torch.no_grad()
def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, step: Optional[int] = None,
                profiles: Optional[Sequence[float]] = None) -> tuple[dict[str, Tensor], dict]:
    """The EMA of ``sigma_rel`` at ``step`` from snapshots: ``(state_dict, info)`` (weights float32)."""
    use, step = select_snapshots(snapshots, step, profiles)
    gamma = sigma_rel_to_gamma(sigma_rel)
    x = solve_coefficients(use, gamma, step)
    acc: dict[str, Tensor] = {}
    for coef, sn in zip(x, use):
        state = torch.load(sn.path, map_location="cpu", weights_only=True)["state_dict"]
        for k, v in state.items():
            if k not in acc:
                acc[k] = torch.zeros_like(v, dtype=torch.float64)
            acc[k].add_(v.double(), alpha=float(coef))
    info = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": step, "num_snapshots": len(use),
            "profiles": sorted({s.sigma_rel for s in use}), "coefficient_sum": float(x.sum()),
            "max_abs_coefficient": float(np.abs(x).max())}
    return {k: v.float() for k, v in acc.items()}, info


def reconstruct_checkpoint(ckpt_path: str | os.PathLike, sigma_rel: float, out: str | os.PathLike,
                           snapshots_dir: Optional[str | os.PathLike] = None, step: Optional[int] = None,
                           profiles: Optional[Sequence[float]] = None) -> dict:
    """Copy a run's checkpoint with its EMA weights (``ema_unet.*``, or ``unet.*`` for a run without EMA)
    replaced by the reconstruction; returns the reconstruction info (also stored under ``posthoc_ema``)."""
    ckpt_path = Path(ckpt_path)
    directory = Path(snapshots_dir) if snapshots_dir else ckpt_path.resolve().parent.parent / "posthoc_ema"
    snaps = list_snapshots(directory)
    if not snaps:
        raise ValueError(f"no post-hoc EMA snapshots in {directory}: train with --posthoc_ema.every_n_steps N, or "
                         "pass --snapshots DIR")
    state, info = reconstruct(snaps, sigma_rel, step, profiles)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    prefix = "ema_unet." if any(k.startswith("ema_unet.") for k in sd) else "unet."
    missing = [k for k in state if prefix + k not in sd]
    if missing:
        raise ValueError(f"the snapshots do not fit {ckpt_path} (e.g. {missing[:3]} not in its {prefix}* weights)")
    for k, v in state.items():
        sd[prefix + k] = v.to(sd[prefix + k].dtype)
    info["into"] = prefix.rstrip(".")
    ckpt["posthoc_ema"] = info
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return info


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffproc.posthoc_ema",
                                 description="Reconstruct the EMA of any sigma_rel from post-hoc EMA snapshots and "
                                             "write it into a copy of a checkpoint (EDM2 post-hoc EMA).")
    ap.add_argument("--ckpt", required=True, help="a checkpoint of the run (hyperparameters, other weights)")
    ap.add_argument("--sigma_rel", type=float, required=True, help=f"target EMA width, in (0, {MAX_SIGMA_REL:.3f})")
    ap.add_argument("--out", required=True, help="checkpoint to write")
    ap.add_argument("--snapshots", help="snapshot folder (default: <run dir>/posthoc_ema)")
    ap.add_argument("--step", type=int, help="reconstruct at this snapshot step (default: the last one)")
    ap.add_argument("--profiles", type=float, nargs="+", help="use only the snapshots of these sigma_rel profiles")
    args = ap.parse_args(argv)
    try:
        info = reconstruct_checkpoint(args.ckpt, args.sigma_rel, args.out, args.snapshots, args.step, args.profiles)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"sigma_rel {info['sigma_rel']} (gamma {info['gamma']:.3f}) at step {info['step']} from "
          f"{info['num_snapshots']} snapshots of {info['profiles']} -> {args.out}")


if __name__ == "__main__":
    main()
