"""Quality vs. network evaluations for every solver of a trained checkpoint (SIE spec §5.3: compare
solvers at equal NFE, since "steps" is ambiguous for RK methods).

    python benchmarks/nfe_sweep.py --config configs/sie_shapes.yaml --ckpt runs/sie_shapes/version_0/checkpoints/last.ckpt \
        --nfe 4 8 16 32 --solvers euler heun midpoint rk4 ddim_dual --num-samples 2000

For each solver and target NFE the script takes ``steps = NFE // (NFE per step)`` steps (Euler 1,
Heun/midpoint 2, RK4 4, DDIM 1; skipped when < 1), samples ``--num-samples`` images from the same
seeded noise, and prints FID (``diffproc.metrics``; ``shapes`` features for the embedded dataset,
Inception otherwise, ``--extractor`` to force) and seconds per image. NFE in the table is the count
the solver actually spent. ``--json`` also writes the rows. Extra ``--key value`` pairs after ``--``
go to the config parser (e.g. ``-- --data.init_args.num_test 500``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffproc.callbacks.metrics import resolve_extractor_name  # noqa: E402
from diffproc.cli import DiffprocCLI  # noqa: E402
from diffproc.metrics.features import build_extractor  # noqa: E402
from diffproc.metrics.reference import load_or_compute_reference  # noqa: E402
from diffproc.metrics.suite import MetricSuite  # noqa: E402
from diffproc.samplers import NFE_PER_STEP, SamplingSpec  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    ap.add_argument("--ckpt", required=True, help="a .ckpt written by `cli.py fit`")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--solvers", nargs="+", default=None, help="default: every solver of the process")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--extractor", default="auto", choices=["auto", "shapes", "inception"])
    ap.add_argument("--feature-extractor-weights-path", default=None)
    ap.add_argument("--reference", default="train",
                    help="split name (cached stats; train = what `cli.py test` uses) or an .npz file")
    ap.add_argument("--reference-num", type=int, default=None, help="real images for the reference (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ema", action="store_true", help="sample with the raw weights")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("overrides", nargs="*", help="config overrides after `--`")
    return ap.parse_args(argv)


def load(config: str, ckpt: str, overrides: list[str]):
    """Model (weights from ``ckpt``) and DataModule of ``config`` — a configs/*.yaml or the
    ``config.yaml`` a run saved (its subcommand-only keys such as ``ckpt_path`` are dropped)."""
    cfg = yaml.safe_load(Path(config).read_text())
    for key in ("ckpt_path", "weights_only", "verbose", "return_predictions"):
        cfg.pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    cli = DiffprocCLI(args=["--config", f.name, *overrides, "--trainer.logger", "false"], run=False)
    os.unlink(f.name)
    model, dm = cli.model, cli.datamodule
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    return model, dm


@torch.no_grad()
def sample_all(model, solver: str, steps: int, num: int, batch: int, seed: int, use_ema: bool, device):
    """Images in [-1, 1], total seconds (synchronised) and NFE per image batch."""
    out, nfe, secs = [], None, 0.0
    for b in range(math.ceil(num / batch)):
        n = min(batch, num - b * batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = model.sample(n, SamplingSpec(solver=solver, num_steps=steps, seed=seed), progress=False,
                           use_ema=use_ema, indices=range(b * batch, b * batch + n))  # per-sample noise from (seed, i)
        x = res.images
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs += time.perf_counter() - t0
        nfe = res.nfe
        out.append(x)
    return torch.cat(out), secs, nfe


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, dm = load(args.config, args.ckpt, args.overrides)
    model = model.to(device).eval()
    solvers = args.solvers or list(model.process.solvers)
    bad = [s for s in solvers if s not in model.process.solvers]
    if bad:
        raise SystemExit(f"error: {type(model.process).__name__} has no solver(s) {bad}; "
                         f"choose from {list(model.process.solvers)}")
    extractor = build_extractor(resolve_extractor_name(args.extractor, dm),
                                args.feature_extractor_weights_path).to(device).eval()
    dm.prepare_data()
    ref, ref_id = load_or_compute_reference(dm, args.reference, extractor, num=args.reference_num,
                                            device=device, progress=False)
    print(f"# {args.ckpt}: {type(model).__name__}, {args.num_samples} samples, reference {ref_id}")
    rows = []
    for nfe_target in args.nfe:
        for solver in solvers:
            steps = nfe_target // NFE_PER_STEP.get(solver, 1)
            if steps < 1:
                continue
            images, secs, nfe = sample_all(model, solver, steps, args.num_samples, args.batch_size, args.seed,
                                           not args.no_ema, device)
            suite = MetricSuite(extractor, metrics=["fid"]).to(device)
            suite.set_reference(ref)
            for chunk in images.split(args.batch_size):
                suite.update(chunk)
            metric = suite.compute()
            name, value = next(iter(metric.items()))
            rows.append({"solver": solver, "target_nfe": nfe_target, "steps": steps, "nfe": nfe,
                         "metric": name, "value": value, "sec_per_image": secs / args.num_samples})
    metric_name = rows[0]["metric"] if rows else "fid"
    print(f"columns: {metric_name} (steps taken) seconds/image")
    print(f"{'target NFE':>10} | " + " | ".join(f"{s:>22}" for s in solvers))
    for nfe_target in args.nfe:
        cells = []
        for solver in solvers:
            r = next((r for r in rows if r["solver"] == solver and r["target_nfe"] == nfe_target), None)
            cells.append(f"{'-':>22}" if r is None else
                         f"{r['value']:9.3f} ({r['steps']:>3}) {r['sec_per_image']:.4f}".rjust(22))
        print(f"{nfe_target:>10} | " + " | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
