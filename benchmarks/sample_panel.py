"""One labelled figure of sample grids from several trained runs, each with its own solver and time grid.

The same samples as ``benchmarks/compare.py``'s rows: indices ``0 .. n-1`` of sampling seed ``--seed``, EMA
weights, so a panel shows the first images of the rows it sits next to in ``docs/results/``.

    python benchmarks/sample_panel.py --nfe 10 --out panel.png \\
        --run DDPM runs/ddpm_fmnist dpmpp_2m logsnr --run SIE runs/sie_fmnist dpmpp_2m process

A run folder is what ``cli.py fit`` / ``compare.py`` leave: ``<run>/version_0/{config.yaml,checkpoints/last.ckpt}``
(or the ``version_0`` folder itself). Steps are ``NFE // NFE-per-step`` of the solver, as in ``compare.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_files(run: Path) -> tuple[Path, Path]:
    """(config.yaml, last.ckpt) of a run folder or of its ``version_0``; one clear error when missing."""
    for d in (run, run / "version_0"):
        cfg, ckpt = d / "config.yaml", d / "checkpoints" / "last.ckpt"
        if cfg.is_file() and ckpt.is_file():
            return cfg, ckpt
    raise SystemExit(f"error: {run} holds no config.yaml + checkpoints/last.ckpt (nor does {run / 'version_0'}); "
                     "pass the folder `cli.py fit` wrote")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=4, action="append", required=True, metavar=("LABEL", "RUN_DIR", "SOLVER", "GRID"),
                    help="one panel: a label, a run folder, a solver and a time grid (process|uniform_t|quadratic|logsnr)")
    ap.add_argument("--nfe", type=int, required=True, help="network evaluations per sample (same for every panel)")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (compare.py's --seed)")
    ap.add_argument("--cols", type=int, default=3, help="panels per row of the figure")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.compare import plan, sample_all, tile
    from benchmarks.nfe_sweep import load

    rows = math.ceil(len(args.run) / args.cols)
    fig, axes = plt.subplots(rows, args.cols, figsize=(5 * args.cols, 5.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, run, solver, grid) in zip(axes.flat, args.run):
        cfg, ckpt = run_files(Path(run))
        model, _ = load(str(cfg), str(ckpt), [])
        model = model.eval()
        model.sampling = replace(model.sampling, time_grid=grid)
        combo = plan(model.process, [args.nfe], [solver])  # compare.py's steps for this NFE, and its refusals
        if not combo or combo[0]["skip"]:
            raise SystemExit(f"error: {label}: {solver} at {args.nfe} NFE "
                             + (f"is skipped: {combo[0]['skip']}" if combo else
                                f"is not a solver of this process (it has {', '.join(model.process.solvers)})"))
        steps = combo[0]["steps"]
        # compare.py's own sampling call: samples 0 .. n-1 of --seed, EMA weights
        images, _, nfe = sample_all(model, solver, steps, args.num_images, args.num_images, args.seed, torch.device("cpu"))
        ax.imshow(tile(images, args.num_images).permute(1, 2, 0).numpy())
        ax.set_title(f"{label}: {solver}, {grid} grid, {nfe} NFE", fontsize=13)
        print(f"{label}: {solver} {steps} steps on the {grid} grid, {nfe} NFE", flush=True)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
