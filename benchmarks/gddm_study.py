"""Where GDDM/LDDM samples go wrong, and whether a fix holds: metrics and diagnostics of fitted runs at
several training steps, sampling variants and seeds (issue "GDDM and LDDM must generate images";
results in docs/gddm.md and docs/results/gddm_shapes/).

    # runs come from `cli.py fit ... --checkpoint.save_top_k -1 --checkpoint.every_n_train_steps 500`
    python benchmarks/gddm_study.py --runs ddpm/s0=RUNS/ddpm_s0/version_0 gddm/s0=RUNS/gddm_s0/version_0 \
        --ckpt-steps 500 1000 2000 --num-samples 1000 --out docs/results/gddm_shapes \
        --variant literal_sampling --model.init_args.process.init_args.clip_image false

For every run (``LABEL=RUN_DIR``; the label's part before ``/`` names the method, the part after it the
training seed), every checkpoint step in ``--ckpt-steps`` and every sampling variant (``default`` = the
run's own config; each ``--variant NAME ARGS...`` adds CLI overrides, applied to GDDM runs only), it
samples ``--num-samples`` images with the config's solver from seeds ``seed + i`` blocks (the
``benchmarks/compare.py`` protocol, EMA weights) and records

* FID / KID / precision / recall on the features of ``--extractor`` against the train split;
* per-DCT-mode RMS amplitude of generated vs real test images (orthonormal DCT, modes DC, (0,1), (1,0),
  (1,1), (4,4), (8,8)) and band power of generated / real (``diffproc.metrics.frequency``);
* colour of generated vs real images (``colour_stats``: pixel saturation, chroma of the image mean, |brightness|);
* the decoded images *before* the final clip: max |x|, fraction of pixels outside [−1, 1];
* along the sampling trajectory (first ``--diag-num`` images): RMS of x̂0 in the low/mid/high bands and
  its max |x̂0| per step, before any clipping (x̂0 decoded from the network output alone);
* GDDM: curl energy / least-squares residual of the generated fields
  (``diffproc.processes.gradient_stats.integrability``).

Rows go to ``OUT/rows.json`` (resumable: a finished (label, step, variant) is not recomputed). Then
``OUT/convergence.md``/``.png`` (FID vs training step, mean ± std over seeds per method and variant) and
``OUT/grids/<label>_<variant>_<step>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODES = [(0, 0), (0, 1), (1, 0), (1, 1), (4, 4), (8, 8)]


def log(msg: str) -> None:
    print(f"[gddm_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    variants: dict[str, list[str]] = {"default": []}
    while "--variant" in argv:  # --variant NAME ARGS... (until the next --variant or the end)
        i = argv.index("--variant")
        j = argv.index("--variant", i + 1) if "--variant" in argv[i + 1:] else len(argv)
        if j - i < 2:
            raise SystemExit("error: --variant needs a NAME and CLI overrides")
        variants[argv[i + 1]] = argv[i + 2:j]
        del argv[i:j]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR (LABEL = method/seed)")
    ap.add_argument("--ckpt-steps", type=int, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--eval-batch-size", type=int, default=250)
    ap.add_argument("--diag-num", type=int, default=64, help="images whose sampling trajectory is recorded")
    ap.add_argument("--seed", type=int, default=None,
                    help="sampling seed (default: the model's `seed` hyperparameter, 0 unless the config sets it)")
    ap.add_argument("--extractor", default="auto", choices=["auto", "shapes", "inception"])
    ap.add_argument("--grid-images", type=int, default=64)
    ap.add_argument("--no-default", action="store_true", help="only the --variant rows (GDDM runs)")
    args = ap.parse_args(argv)
    if args.no_default and len(variants) > 1:
        del variants["default"]
    args.variants = variants
    return args


def find_ckpt(run_dir: Path, step: int) -> Path | None:
    hits = sorted((run_dir / "checkpoints").glob(f"*step={step}.ckpt"))
    if hits:
        return hits[0]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and int(torch.load(last, map_location="cpu", weights_only=False).get("global_step", -1)) == step:
        return last
    return None


def colour_stats(x: torch.Tensor) -> dict[str, float]:
    """Colour of images in [−1, 1] (C = 3): ``saturation`` = mean over pixels of (max_c − min_c)/2 (0 = grey),
    ``mean_chroma`` = mean over images of the std over channels of the per-channel image mean (a coloured vs
    grey background), ``mean_abs_brightness`` = mean over images of |mean pixel| (dark/light vs mid-grey)."""
    x = x.double().clamp(-1, 1)
    if x.shape[1] != 3:
        return {}
    m = x.mean(dim=(-2, -1))
    return {"saturation": float(((x.amax(1) - x.amin(1)) / 2).mean()), "mean_chroma": float(m.std(1).mean()),
            "mean_abs_brightness": float(m.mean(1).abs().mean())}


def dct_mode_rms(x: torch.Tensor) -> dict[str, float]:
    from diffproc.ops import dct2

    c = dct2(x.double())
    return {f"{k},{l}": float(c[..., k, l].pow(2).mean().sqrt()) for k, l in MODES if k < x.shape[-2] and l < x.shape[-1]}


@torch.no_grad()
def trajectory(model, num: int, seed: int, device) -> dict:
    """x̂0 of every step of the config's solver (no clipping, decoded to images), band RMS and max |x̂0|."""
    from diffproc.metrics.frequency import band_power
    from diffproc.processes.gradient import GradientDomainProcess
    from diffproc.processes.gradient_stats import integrability
    from diffproc.samplers import sample_loop

    p, net = model.process, model.sampling_net.eval()
    rec: list[dict] = []
    denoiser = model.denoiser(net)  # the raw (ẑ0, ε̂) of each step, before the process's clipping

    def recording(*a, **k):
        u0, eps = denoiser(*a, **k)
        x0 = model.decode(p.from_basis(u0))
        bp = band_power(x0.float(), remove_dc=False).sqrt()
        rec.append({"t": float(a[-1].flatten()[0]), "max_abs": float(x0.abs().max()),
                    "frac_out": float((x0.abs() > 1).double().mean()), "rms_low": float(bp[0]),
                    "rms_mid": float(bp[1]), "rms_high": float(bp[2])})
        return u0, eps

    shape = (num, p.domain_channels(model.channels), model.image_size, model.image_size)
    g = torch.Generator(device=device).manual_seed(seed)
    res = sample_loop(p, recording, shape, model.sampling.num_steps, model.sampling.solver, g, device,
                      grid=model.sampling.time_grid, ddim_eta=model.sampling.ddim_eta)
    x = model.decode(res.sample)
    out = {"trajectory": rec, "final_max_abs": float(x.abs().max()), "final_frac_out": float((x.abs() > 1).double().mean()),
           "final_mode_rms_unclipped": dct_mode_rms(x)}
    if isinstance(p, GradientDomainProcess):
        out["integrability"] = integrability(p, res.sample)
    return out


def evaluate(args, extractor, ref, ref_id, real, label: str, run_dir: Path, step: int, variant: str) -> dict | None:
    from benchmarks.compare import checkpoint_step
    from benchmarks.nfe_sweep import load, sample_all
    from diffproc.metrics.frequency import compare_bands
    from diffproc.metrics.suite import MetricSuite

    ckpt = find_ckpt(run_dir, step)
    if ckpt is None:
        log(f"{label}: no checkpoint at step {step} in {run_dir}/checkpoints; skipped")
        return None
    cfg_text = (run_dir / "config.yaml").read_text()
    is_gddm = "methods.gddm.GDDM" in cfg_text
    if variant != "default" and not is_gddm:
        return None
    device = torch.device("cpu")
    model, _ = load(str(run_dir / "config.yaml"), str(ckpt), args.variants[variant] if is_gddm else [])
    model = model.to(device).eval()
    seed = args.seed if args.seed is not None else int(model.hparams.get("seed", 0) or 0)
    train_seed = label.split("/")[-1]
    t0 = time.perf_counter()
    images, _, nfe = sample_all(model, model.sampling.solver, model.sampling.num_steps, args.num_samples, args.eval_batch_size,
                                seed, True, device)
    secs = time.perf_counter() - t0
    suite = MetricSuite(extractor, metrics=["fid", "kid", "precision", "recall"])
    suite.set_reference(ref)
    for chunk in images.split(args.eval_batch_size):
        suite.update(chunk)
    m = {k.removeprefix(extractor.name + "_"): float(v) for k, v in suite.compute().items()}
    bands = compare_bands(real, {"gen": images}, remove_dc=True)["gen"]
    diag = trajectory(model, args.diag_num, seed, device)
    row = {"label": label, "method": label.split("/")[0], "train_seed": train_seed, "step": checkpoint_step(ckpt),
           "variant": variant, "overrides": args.variants[variant] if is_gddm else [], "solver": model.sampling.solver,
           "num_steps": model.sampling.num_steps, "nfe": nfe, "num_samples": args.num_samples, "sample_seed": seed,
           "reference": ref_id, "seconds": secs, **m, "band_power_ratio": bands["power_ratio"],
           "mode_rms_gen": dct_mode_rms(images), "mode_rms_real": dct_mode_rms(real),
           "colour_gen": colour_stats(images), "colour_real": colour_stats(real), **diag}
    grid_dir = args.out / "grids"
    grid_dir.mkdir(parents=True, exist_ok=True)
    save_grid(images[: args.grid_images], grid_dir / f"{label.replace('/', '_')}_{variant}_{step}.png")
    log(f"{label} step {row['step']} {variant}: FID {m['fid']:.3f} KID {m['kid_mean']:.4f} P {m['precision']:.3f} "
        f"R {m['recall']:.3f}  pre-clip max {diag['final_max_abs']:.2f} out {diag['final_frac_out']:.3f}")
    return row


def save_grid(images: torch.Tensor, path: Path) -> None:
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    x = (images.clamp(-1, 1) + 1) / 2
    if x.shape[-1] < 64:
        x = F.interpolate(x, scale_factor=64 // x.shape[-1], mode="nearest")
    save_image(make_grid(x, nrow=int(math.sqrt(len(x))) or 1, padding=2, pad_value=1.0), path)


def report(rows: list[dict], out: Path) -> None:
    """convergence.md / convergence.png: FID (mean ± std over training seeds) per method, variant and step."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["variant"], r["step"]), []).append(r)
    lines = ["| method | variant | step | seeds | FID mean ± std | FID min | KID mean | precision | recall | "
             "pre-clip max abs | frac out of [-1,1] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    series: dict[tuple, list] = {}
    for (m, v, s), rs in sorted(groups.items()):
        f = [r["fid"] for r in rs]
        sd = statistics.stdev(f) if len(f) > 1 else float("nan")
        mean = statistics.mean
        lines.append(f"| {m} | {v} | {s} | {','.join(r['train_seed'] for r in rs)} | {mean(f):.2f} ± {sd:.2f} | "
                     f"{min(f):.2f} | {mean(r['kid_mean'] for r in rs):.4f} | {mean(r['precision'] for r in rs):.3f} | "
                     f"{mean(r['recall'] for r in rs):.3f} | {mean(r['final_max_abs'] for r in rs):.1f} | "
                     f"{mean(r['final_frac_out'] for r in rs):.3f} |")
        series.setdefault((m, v), []).append((s, mean(f), sd if len(f) > 1 else 0.0))
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (m, v), pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=m if v == "default" else f"{m} ({v})")
    ax.set_xlabel("training step")
    n = sorted({r["num_samples"] for r in rows})
    ax.set_ylabel(f"FID ({'/'.join(map(str, n))} samples; mean ± std over training seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    from benchmarks.nfe_sweep import load
    from diffproc.callbacks.metrics import resolve_extractor_name
    from diffproc.metrics.features import build_extractor
    from diffproc.metrics.reference import load_or_compute_reference

    path = args.out / "rows.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["label"], r["step"], r["variant"], r["num_samples"]) for r in rows}
    runs = [r.split("=", 1) for r in args.runs]
    _, dm = load(str(Path(runs[0][1]) / "config.yaml"), str(next(Path(runs[0][1]).glob("checkpoints/*.ckpt"))), [])
    extractor = build_extractor(resolve_extractor_name(args.extractor, dm), None).eval()
    dm.prepare_data()
    dm.setup("fit")
    ref, ref_id = load_or_compute_reference(dm, "train", extractor, num=len(dm.build_dataset("train")), device="cpu")
    test = dm.build_dataset("test")
    real = torch.stack([test[i][0] if isinstance(test[i], (tuple, list)) else test[i]
                        for i in range(min(args.num_samples, len(test)))])
    for label, rd in runs:
        for step in args.ckpt_steps:
            for variant in args.variants:
                if (label, step, variant, args.num_samples) in done:
                    continue
                row = evaluate(args, extractor, ref, ref_id, real, label, Path(rd), step, variant)
                if row is not None:
                    rows.append(row)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(rows, indent=1))
                    os.replace(tmp, path)
    report(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
