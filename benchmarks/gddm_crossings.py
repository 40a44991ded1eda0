"""When the sampler decides each image DCT mode: the t at which mode k's SNR ``γ_t σ_d,k² / ((1−γ_t) c_k²)``
crosses 1 (``diffproc.processes.gradient_stats.mode_snr_crossing``), for image DDPM (c_k = 1), GDDM and LDDM at
several noise scales and ``noise_cap`` values, on the data's σ_d per mode and colour component as a fitted GDDM checkpoint holds it
(the ModeEDM head's ``sigma_data_mode: spectrum_colour``). docs/gddm.md §5.

    python benchmarks/gddm_crossings.py --ckpt runs/gddm_shapes/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffproc.processes.gradient import GradientDomainProcess  # noqa: E402
from diffproc.processes.gradient_stats import mode_snr_crossing  # noqa: E402

ROWS = [("DDPM (image; = operator noise)", dict(noise="operator")),
        ("GDDM, s_g = √2 (seed)", dict(domain="gradient")),
        ("GDDM, s_g = √2/2", dict(domain="gradient", gradient_noise_scale=math.sqrt(2) / 2)),
        ("LDDM, s_L = √20 (normalised)", dict(domain="laplacian")),
        ("LDDM, s_L = √(5/2) (seed literal)", dict(domain="laplacian", laplacian_noise_scale=math.sqrt(2.5))),
        ("LDDM, s_L = √20/8", dict(domain="laplacian", laplacian_noise_scale=math.sqrt(20) / 8)),
        ("LDDM, s_L = √20/16", dict(domain="laplacian", laplacian_noise_scale=math.sqrt(20) / 16)),
        ("GDDM, noise_cap 2", dict(domain="gradient", noise_cap=2.0)),
        ("GDDM, noise_cap 1", dict(domain="gradient", noise_cap=1.0)),
        ("LDDM, s_L = √20/8, noise_cap 2", dict(domain="laplacian", laplacian_noise_scale=math.sqrt(20) / 8, noise_cap=2.0)),
        ("LDDM, s_L = √20/8, noise_cap 1", dict(domain="laplacian", laplacian_noise_scale=math.sqrt(20) / 8, noise_cap=1.0))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="a GDDM checkpoint whose ModeEDM head has a spectrum_colour spectrum (C, H, W)")
    args = ap.parse_args()
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"]["precond.spectrum"].double()
    if sd.dim() == 2:
        sd = sd[None]
    print("| process | t of SNR 1, 10 / 50 / 90 % of the modes | lowest modes (0,1) / (0,2) / (1,1) | DC |")
    print("|---|---|---|---|")
    for name, kw in ROWS:
        t = mode_snr_crossing(GradientDomainProcess(**kw), sd)  # (C, H, W)
        rest = torch.cat([t[c].flatten()[1:] for c in range(t.shape[0])]).double()
        q = torch.quantile(rest, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).round().long().tolist()
        low = [int(t[0][k]) for k in [(0, 1), (0, 2), (1, 1)]]
        print(f"| {name} | {q[0]} / {q[1]} / {q[2]} | {low[0]} / {low[1]} / {low[2]} | {int(t[0, 0, 0])} |")


if __name__ == "__main__":
    main()
