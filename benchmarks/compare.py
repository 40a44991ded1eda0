"""Every method on equal terms: same data, steps, batch, UNet and seed; quality vs NFE per solver.

    python benchmarks/compare.py --configs configs/ddpm_shapes.yaml configs/gddm_shapes.yaml \
        configs/lddm_shapes.yaml configs/epdm_shapes.yaml configs/blur_shapes.yaml configs/sie_shapes.yaml \
        --steps 2000 --out docs/results/compare_shapes --nfe 10 20 50 100 --num-samples 1000

1. Train: each config is trained by ``cli.py fit`` as a subprocess (exactly what users run) with the
   SAME ``--seed_everything``, ``--trainer.max_steps``, ``--data.init_args.{image_size,batch_size,
   num_train}`` (and any ``--fit-args``); logs in ``OUT/runs/<method>/version_0`` (TensorBoard,
   ``config.yaml``, ``checkpoints/last.ckpt``), console output in ``OUT/runs/<method>/fit.log``.
   A run whose ``last.ckpt`` has reached ``--steps`` is not trained again; a shorter one is resumed.
2. Evaluate (in this process, :mod:`diffproc.metrics`): for each method, solver in
   ``process.solvers`` and target NFE, ``steps = NFE // NFE_PER_STEP[solver]`` (equal NFE across
   solvers), ``--num-samples`` images with the EMA weights from fixed seeds, FID/KID/precision/recall
   against cached reference statistics of the train split, seconds per image. With ``--seeds 0 1000 2000``
   (EDM's seed blocks) every row is measured on each block of ``--num-samples`` samples (block ``s`` = samples
   ``s .. s + num_samples - 1`` of ``--seed``) and reported as mean ± std (ddof=1) and min over the blocks. Combinations that make
   no sense are listed as skipped with the reason (blur ``official`` = full chain only).
   Finished rows are cached in ``results.json`` and not recomputed.
3. Write ``results.md``, ``results.json``, ``fid_vs_nfe.png``, ``loss_vs_step.png``,
   ``grids/<method>.png``, ``freq_bands.md``/``freq_bands.png`` (:mod:`diffproc.metrics.frequency`,
   samples of each method's default solver at the largest NFE vs real test images).

Manual: docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEFAULT_CONFIGS = ["configs/ddpm_shapes.yaml", "configs/gddm_shapes.yaml", "configs/lddm_shapes.yaml",
                   "configs/epdm_shapes.yaml", "configs/blur_shapes.yaml", "configs/sie_shapes.yaml"]


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="one config per method")
    ap.add_argument("--steps", type=int, required=True, help="training steps (same for every method)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (runs, tables, plots)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100], help="target NFEs")
    ap.add_argument("--solvers", nargs="+", default=None,
                    help="restrict to these solvers (where a method has them); 'config': each method's own "
                         "configured solver only; default: all of each process")
    ap.add_argument("--num-samples", type=int, default=1000, help="generated images per (method, solver, NFE)")
    ap.add_argument("--eval-batch-size", type=int, default=250)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device for evaluation; training uses the configs' trainer.accelerator unless "
                         "--fit-args overrides it")
    ap.add_argument("--extractor", default="auto", choices=["auto", "shapes", "inception"])
    ap.add_argument("--feature-extractor-weights-path", default=None)
    ap.add_argument("--reference-num", type=int, default=None,
                    help="real train images for the reference statistics (default: the whole train split)")
    ap.add_argument("--image-size", type=int, default=None, help="forced on every method (default: the configs')")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch, forced on every method")
    ap.add_argument("--num-train", type=int, default=None, help="--data.init_args.num_train (shapes only)")
    ap.add_argument("--seed", type=int, default=0, help="--seed_everything of every fit and the sampling seed")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=None,
                    help="train every method once per seed (runs <method>_s<seed>); the summary table shows mean "
                         "± std (ddof=1) over them. Default: one fit with --seed, run named <method>")
    ap.add_argument("--reference-split", default="train", choices=["train", "test"],
                    help="real split of the reference statistics (train: the published protocol; test: held-out images)")
    ap.add_argument("--fit-only", action="store_true",
                    help="train (or resume) every run and stop: evaluate later, e.g. in parallel lanes")
    ap.add_argument("--floor", action="store_true",
                    help="add the floor row: --num-samples real train images against the reference (with "
                         "--reference-split test), measured exactly like a method's samples")
    ap.add_argument("--time-grid", default="process", choices=("process", "uniform_t", "quadratic", "logsnr"),
                    help="time grid every solver walks in the evaluation (diffproc.samplers.time_grid; default: each "
                         "process's own spacing)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seed blocks for sampling (EDM convention, e.g. --seeds 0 1000 2000 with --num-samples 1000): "
                         "block s = samples s .. s+num_samples-1 of --seed, each measured separately; the tables "
                         "show mean ± std over the blocks. Default: one block [0] (the samples of --seed)")
    ap.add_argument("--freq-real", type=int, default=None, help="real test images for freq_bands (default: num-samples)")
    ap.add_argument("--grid-images", type=int, default=64)
    ap.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                    help="extra `cli.py fit` arguments for EVERY method (last option; e.g. --fit-args "
                         "--trainer.precision bf16-mixed --model.init_args.unet '{...}')")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    args.seeds = list(args.seeds) if args.seeds else [0]
    starts = sorted(args.seeds)
    if starts[0] < 0 or len(set(starts)) != len(starts) or any(b - a < args.num_samples for a, b in zip(starts, starts[1:])):
        ap.error(f"--seeds {args.seeds}: seed blocks must be distinct, >= 0 and at least --num-samples "
                 f"({args.num_samples}) apart (a block is samples s .. s+num_samples-1)")
    return args


def method_name(config: str) -> str:
    return Path(config).stem


# --------------------------------------------------------------------------------------------- train
def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name / "version_0"


def checkpoint_step(ckpt: Path) -> int:
    """``global_step`` stored in a Lightning checkpoint (-1 when missing or unreadable)."""
    if not ckpt.is_file():
        return -1
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1))
    except Exception:  # a truncated file: train again
        return -1


def fit_command(config: str, name: str, args: argparse.Namespace, resume: Path | None,
                seed: int | None = None) -> list[str]:
    cmd = [sys.executable, "cli.py", "fit", "--config", config,
           "--seed_everything", str(args.seed if seed is None else seed), "--trainer.max_steps", str(args.steps),
           "--trainer.logger.init_args.save_dir", str((args.out / "runs").resolve()),
           "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0",
           "--trainer.log_every_n_steps", str(max(1, min(10, args.steps // 10))),
           "--throughput.window_size", str(max(2, min(50, args.steps // 4))),
           "--trainer.enable_progress_bar", "false"]
    for key, val in (("image_size", args.image_size), ("batch_size", args.batch_size), ("num_train", args.num_train)):
        if val is not None:
            cmd += [f"--data.init_args.{key}", str(val)]
    cmd += list(args.fit_args)
    if resume is not None:
        cmd += ["--ckpt_path", str(resume)]
    return cmd


def train(config: str, name: str, args: argparse.Namespace, seed: int | None = None) -> dict:
    """Train (or resume) one method; returns {'trained': bool, 'fit_seconds', 'steps'}."""
    rd = run_dir(args.out, name)
    ckpt = rd / "checkpoints" / "last.ckpt"
    info_path = rd.parent / "fit_time.json"
    step = checkpoint_step(ckpt)
    if step >= args.steps:
        log(f"{name}: last.ckpt already at step {step} >= {args.steps}; not training again")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return {"trained": False, **info}
    resume = ckpt if step > 0 else None
    cmd = fit_command(config, name, args, resume, seed)
    log(f"{name}: training {args.steps} steps" + (f" (resuming from step {step})" if resume else "")
        + f"; log {rd.parent / 'fit.log'}")
    rd.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(rd.parent / "fit.log", "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            logf.write(line)
            print(f"  [{name}] {line}", end="", flush=True)
        rc = proc.wait()
    secs = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"error: `cli.py fit` for {name} failed with exit code {rc}; see {rd.parent / 'fit.log'}")
    step = checkpoint_step(ckpt)
    if step < args.steps:
        raise SystemExit(f"error: {name} finished but {ckpt} is at step {step} < {args.steps}; see {rd.parent / 'fit.log'}")
    info = {"fit_seconds": secs, "steps_run": args.steps - (checkpoint_step(resume) if resume else 0)}
    info_path.write_text(json.dumps(info))
    return {"trained": True, **info}


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall_time) of a TensorBoard scalar over every event file in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return sorted((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))


def seconds_per_train_step(log_dir: Path, info: dict) -> tuple[float | None, str]:
    """From the logged ``train/batches_per_sec`` (all ranks; on one device Lightning logs only
    ``train/device/batches_per_sec``) — the median, which excludes start-up and validation — else the
    fit wall time per step (includes start-up: an upper bound)."""
    bps = [v for _, v, _ in read_scalars(log_dir, "train/batches_per_sec") if v > 0]
    bps = bps or [v for _, v, _ in read_scalars(log_dir, "train/device/batches_per_sec") if v > 0]
    if bps:
        bps.sort()
        return 1.0 / bps[len(bps) // 2], "throughput"
    if info.get("fit_seconds") and info.get("steps_run"):
        return info["fit_seconds"] / info["steps_run"], "wall"
    return None, "n/a"


# ------------------------------------------------------------------------------------------ evaluate
def plan(process, nfe_targets: list[int], solvers: list[str] | None = None) -> list[dict]:
    """(solver, target NFE) combinations at equal NFE: ``steps = NFE // NFE_PER_STEP[solver]``.

    Rows that make no sense get ``skip`` with the reason: fewer NFE than one step needs; a solver
    that only runs the full chain (``official``); more steps than the process has."""
    from diffproc.samplers import NFE_PER_STEP

    full = len(process.timesteps(None)) - 1  # the full chain's steps
    out = []
    for solver in process.solvers:
        if solvers is not None and solver not in solvers:
            continue
        for nfe in nfe_targets:
            k = NFE_PER_STEP.get(solver, 1)
            steps = nfe // k
            row = {"solver": solver, "target_nfe": nfe, "steps": steps, "skip": None, "note": ""}
            if steps < 1:
                row["skip"] = f"{solver} needs {k} NFE per step"
            elif solver == "official":
                row["skip"] = f"full chain only ({full} steps = {full} NFE)"
            elif steps > full:
                row["skip"] = f"more steps than the chain has ({full})"
            elif type(process).__name__ == "EdgePreservingProcess" and solver != "ancestral":
                row["note"] = f"{solver} (extension; paper: ancestral, full chain)"
            elif type(process).__name__ == "EdgePreservingProcess" and steps < full:
                row["note"] = "strided chain (extension; paper: full chain)"
            out.append(row)
    return out


@torch.no_grad()
def sample_all(model, solver: str, steps: int, num: int, batch: int, seed: int, device: torch.device, offset: int = 0):
    """Images in [-1, 1], seconds (synchronised) and NFE actually spent per image: the samples
    ``offset .. offset + num - 1`` of ``seed`` (sample i draws its noise from (seed, i); EMA weights)."""
    from diffproc.samplers import SamplingSpec

    out, nfe, secs = [], None, 0.0
    for b in range(math.ceil(num / batch)):
        lo = offset + b * batch
        n = min(batch, num - b * batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = model.sample(n, SamplingSpec(solver=solver, num_steps=steps, seed=seed), progress=False, use_ema=True,
                           indices=range(lo, lo + n))
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs += time.perf_counter() - t0
        nfe = res.nfe
        out.append(res.images)
    return torch.cat(out), secs, nfe


METRIC_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall")


def aggregate_blocks(blocks: list[dict]) -> dict:
    """Row fields from per-block metrics: the mean of each metric at the top level (what tables and plots
    read), and with >= 2 blocks ``std`` (ddof=1) and ``min`` dicts (``diffproc.callbacks.metrics``' rule)."""
    from diffproc.callbacks.metrics import aggregate_blocks as _agg

    agg = _agg([{k: b[k] for k in METRIC_KEYS} for b in blocks])
    return {**agg["metrics"], **{k: agg[k] for k in ("std", "min") if k in agg}}


def score(batches, extractor, ref, device) -> dict:
    """FID, KID, precision and recall of ``batches`` (images in [-1, 1]) against ``ref``, the extractor's name
    prefix stripped (``shapes_fid`` -> ``fid``): one block of a row, generated or real."""
    from diffproc.metrics.suite import MetricSuite

    suite = MetricSuite(extractor, metrics=["fid", "kid", "precision", "recall"]).to(device)
    suite.set_reference(ref)
    for batch in batches:
        suite.update(batch.to(device))
    return {k.removeprefix(extractor.name + "_"): v for k, v in suite.compute().items()}


def evaluate(args: argparse.Namespace, names: list[str], cache: dict) -> tuple[list[dict], dict]:
    """Rows of every (method, solver, NFE); the default-solver samples at the largest NFE per method."""
    from benchmarks.nfe_sweep import load
    from dataclasses import replace

    from diffproc.callbacks.metrics import resolve_extractor_name
    from diffproc.metrics.features import build_extractor
    from diffproc.metrics.reference import load_or_compute_reference

    device = torch.device(args.device)
    samples_dir = args.out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    rows, keep = [], {}
    extractor = ref = ref_id = None
    cached = {(r["method"], r["solver"], r["target_nfe"]): r for r in cache.get("rows", [])}
    for name in names:
        rd = run_dir(args.out, name)
        ckpt = rd / "checkpoints" / "last.ckpt"
        step = checkpoint_step(ckpt)
        model, dm = load(str(rd / "config.yaml"), str(ckpt), [])
        model = model.to(device).eval()
        model.sampling = replace(model.sampling, time_grid=args.time_grid)
        if extractor is None:
            ex_name = resolve_extractor_name(args.extractor, dm)
            extractor = build_extractor(ex_name, args.feature_extractor_weights_path).to(device).eval()
            dm.prepare_data()
            split = args.reference_split
            num_ref = args.reference_num or len(dm.dataset(split) if hasattr(dm, "dataset") else dm.build_dataset(split))
            ref, ref_id = load_or_compute_reference(dm, args.reference_split, extractor, num=num_ref, device=device,
                                                    progress=True)
            keep["_real_dm"] = dm
            log(f"reference statistics: {ref_id}")
            if args.floor:
                rows.append(floor_row(args, dm, extractor, ref, ref_id, cached, device))
        preferred = model.sampling.solver  # the config's solver
        combos = plan(model.process, args.nfe, [preferred] if args.solvers == ["config"] else args.solvers)
        evaluated = [c for c in combos if c["skip"] is None]
        default = preferred if any(c["solver"] == preferred for c in evaluated) else (
            evaluated[0]["solver"] if evaluated else None)
        top_nfe = max((c["target_nfe"] for c in evaluated if c["solver"] == default), default=None)
        n_params = sum(p.numel() for p in model.unet.parameters())
        for i, c in enumerate(combos):
            key = (name, c["solver"], c["target_nfe"])
            base = {"method": name, "solver": c["solver"], "target_nfe": c["target_nfe"], "steps": c["steps"],
                    "note": c["note"], "train_step": step, "num_samples": args.num_samples, "seed": args.seed,
                    "seeds": args.seeds, "unet_params": n_params, "reference": ref_id,
                    "time_grid": args.time_grid}
            is_top = c["solver"] == default and c["target_nfe"] == top_nfe
            spath = samples_dir / f"{name}.pt"
            old = cached.get(key)
            if c["skip"] is not None:
                rows.append({**base, "skip": c["skip"]})
                continue
            if (old and old.get("skip") is None and old.get("train_step") == step and old.get("num_samples") == args.num_samples
                    and old.get("seed") == args.seed and old.get("seeds", [0]) == args.seeds
                    and old.get("reference") == ref_id and old.get("time_grid", "process") == args.time_grid
                    and (not is_top or spath.is_file())):
                log(f"{name} {c['solver']:>9} NFE {c['target_nfe']:>4}: cached")
                rows.append(old)
                if is_top:
                    keep[name] = torch.load(spath).float() / 127.5 - 1
                continue
            blocks, secs_total, top_images = [], 0.0, None
            for b in args.seeds:
                log(f"{name} {c['solver']:>9} NFE {c['target_nfe']:>4} ({c['steps']} steps) "
                    f"[{i + 1}/{len(combos)}]: sampling {args.num_samples} images"
                    + (f" (seed block {b})" if len(args.seeds) > 1 else ""))
                images, secs, nfe = sample_all(model, c["solver"], c["steps"], args.num_samples, args.eval_batch_size,
                                               args.seed, device, offset=b)
                secs_total += secs
                blocks.append({"seed": b, **score(images.split(args.eval_batch_size), extractor, ref, device)})
                top_images = images if top_images is None else top_images
            row = {**base, "skip": None, "nfe": nfe, "sec_per_image": secs_total / (args.num_samples * len(blocks)),
                   "extractor": extractor.name, **aggregate_blocks(blocks), "blocks": blocks}
            log(f"  -> FID {fmt_pm(row, 'fid', '.3f')}  KID {fmt_pm(row, 'kid_mean', '.4f')}  "
                f"P {fmt_pm(row, 'precision', '.3f')}  R {fmt_pm(row, 'recall', '.3f')}  "
                f"{row['sec_per_image'] * 1e3:.2f} ms/image")
            rows.append(row)
            images = top_images  # block 0 (the first of --seeds) for the grids and frequency bands
            if is_top:
                u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
                torch.save(u8, spath)
                keep[name] = u8.float() / 127.5 - 1
            # save after every row: an interrupted evaluation resumes from here
            done = {(r["method"], r["solver"], r["target_nfe"]) for r in rows}
            cache["rows"] = rows + [r for k, r in cached.items() if k not in done]
            write_json(args.out / "results.json", cache)
        keep.setdefault("_top", {})[name] = (default, top_nfe)
        del model
    return rows, keep


def floor_row(args: argparse.Namespace, dm, extractor, ref, ref_id: str, cached: dict, device) -> dict:
    """The floor: ``--num-samples`` real training images (dataset order, block offsets as for samples) in place
    of generated ones, against the same reference with the same metric code: what a perfect model would score."""
    key = (FLOOR, "real", 0)
    old = cached.get(key)
    if old and old.get("num_samples") == args.num_samples and old.get("reference") == ref_id \
            and old.get("seeds", [0]) == args.seeds:
        log("floor (real train images vs the reference): cached")
        return old
    train_set = dm.dataset("train")
    blocks = []
    for b in args.seeds:
        log(f"floor: {args.num_samples} real train images (offset {b}) vs {ref_id}")
        idx = list(range(b, b + args.num_samples))
        batches = (torch.stack([train_set[i % len(train_set)][0] for i in idx[lo:lo + args.eval_batch_size]])
                   for lo in range(0, len(idx), args.eval_batch_size))
        blocks.append({"seed": b, **score(batches, extractor, ref, device)})
    row = {"method": FLOOR, "solver": "real", "target_nfe": 0, "steps": 0, "nfe": 0, "note": "train split, dataset order",
           "train_step": 0, "num_samples": args.num_samples, "seed": args.seed, "seeds": args.seeds, "unet_params": 0,
           "reference": ref_id, "skip": None, "sec_per_image": float("nan"), "extractor": extractor.name,
           **aggregate_blocks(blocks), "blocks": blocks}
    log(f"  -> floor FID {fmt_pm(row, 'fid', '.3f')}  P {fmt(row['precision'], '.3f')}  R {fmt(row['recall'], '.3f')}")
    return row


FLOOR = "floor: real train vs reference"


def seed_summary(rows: list[dict], groups: dict[str, list[str]]) -> str:
    """Mean ± std (ddof=1) over training seeds of every (method, solver, NFE) measured for all of its seeds."""
    import statistics

    by = {(r["method"], r["solver"], r["target_nfe"]): r for r in rows if not r.get("skip")}
    lines = ["| method | solver | NFE | training seeds | FID | KID | precision | recall |", "|---|---|---|---|---|---|---|---|"]
    floor = next((r for r in rows if r["method"] == FLOOR), None)
    if floor:
        lines.append(f"| {FLOOR} | — | — | — | {floor['fid']:.3f} | {floor['kid_mean']:.4f} | {floor['precision']:.3f} | "
                     f"{floor['recall']:.3f} |")
    for method, names in groups.items():
        combos = dict.fromkeys((r["solver"], r["target_nfe"]) for r in rows if r["method"] in names and not r.get("skip"))
        for solver, nfe in combos:
            got = [by[(n, solver, nfe)] for n in names if (n, solver, nfe) in by]
            cells = []
            for key, spec in (("fid", ".3f"), ("kid_mean", ".4f"), ("precision", ".3f"), ("recall", ".3f")):
                vals = [r[key] for r in got]
                sd = f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else ""
                cells.append(f"{statistics.fmean(vals):{spec}}{sd}")
            lines.append(f"| {method} | {solver} | {got[0]['nfe']} | {len(got)} of {len(names)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- outputs
def fmt(v, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_pm(row: dict, key: str, spec: str) -> str:
    """``mean ± std`` over seed blocks when the row has several, else the value."""
    std = row.get("std", {}).get(key)
    return fmt(row.get(key), spec) + (f" ± {fmt(std, spec)}" if std is not None else "")


def results_table(rows: list[dict], train: dict[str, dict]) -> str:
    """One row per (method, solver, NFE). Rows measured on several seed blocks show mean ± std (ddof=1) over
    the blocks and the minimum FID; single-block rows show the value (and KID ± its std over subsets)."""
    multi = any("std" in r for r in rows if not r.get("skip"))
    if multi:
        nb = max(len(r.get("blocks", [])) for r in rows if not r.get("skip"))
        lines = [f"| method | solver | NFE | steps | FID (mean ± std, {nb} seed blocks) | FID min | KID (mean ± std) | "
                 f"precision | recall | s / train step | s / image | note |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["| method | solver | NFE | steps | FID | KID | precision | recall | s / train step | s / image | note |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = train.get(r["method"], {})
        sps = fmt(t.get("sec_per_step"), ".4f") + ("*" if t.get("sec_per_step_source") == "wall" else "")
        if r.get("skip"):
            dashes = "— | — | — | — |" if multi else "— | — | — |"
            lines.append(f"| {r['method']} | {r['solver']} | {r['target_nfe']} | — | skipped | {dashes} {sps} | — | "
                         f"{r['skip']} |")
            continue
        if multi:
            lines.append(f"| {r['method']} | {r['solver']} | {r['nfe']} | {r['steps']} | {fmt_pm(r, 'fid', '.3f')} | "
                         f"{fmt(r.get('min', {}).get('fid', r['fid']), '.3f')} | {fmt_pm(r, 'kid_mean', '.4f')} | "
                         f"{fmt_pm(r, 'precision', '.3f')} | {fmt_pm(r, 'recall', '.3f')} | {sps} | "
                         f"{fmt(r['sec_per_image'], '.5f')} | {r['note']} |")
            continue
        lines.append(f"| {r['method']} | {r['solver']} | {r['nfe']} | {r['steps']} | {fmt(r['fid'], '.3f')} | "
                     f"{fmt(r['kid_mean'], '.4f')} ± {fmt(r['kid_std'], '.4f')} | {fmt(r['precision'], '.3f')} | "
                     f"{fmt(r['recall'], '.3f')} | {sps} | {fmt(r['sec_per_image'], '.5f')} | {r['note']} |")
    return "\n".join(lines)


def plot_metrics(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("skip") and r["method"] != FLOOR]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, (key, label) in zip(axes, [("fid", "FID"), ("kid_mean", "KID"), ("precision", "precision"),
                                       ("recall", "recall")]):
        for (m, s) in dict.fromkeys((r["method"], r["solver"]) for r in ok):
            pts = sorted((r["nfe"], r[key], r.get("std", {}).get(key, 0.0)) for r in ok
                         if r["method"] == m and r["solver"] == s)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=f"{m} / {s}")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(f"{label} vs NFE ({ok[0]['extractor'] if ok else ''} features)")
        ax.grid(alpha=0.3)
    if ok:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="." if len(pts) < 20 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("train/loss (each method's own objective)")
    ax.set_title("training loss (scales differ between objectives)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile(images: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` images in [-1, 1] as one square grid in [0, 1]; small images nearest-upsampled to >= 64 px."""
    from torchvision.utils import make_grid

    x = images[:n].float().clamp(-1, 1)
    scale = max(1, math.ceil(64 / x.shape[-1]))
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x
    return make_grid((x + 1) / 2, nrow=math.ceil(math.sqrt(x.shape[0])), padding=2, pad_value=1.0)


def save_grid(images: torch.Tensor, path: Path, n: int) -> None:
    from torchvision.utils import save_image

    save_image(tile(images, n), path)


def frequency_outputs(args: argparse.Namespace, keep: dict) -> dict:
    """freq_bands.md / .png: default-solver samples at the largest NFE vs real test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffproc.metrics.frequency import BAND_NAMES, DEFAULT_EDGES, compare_bands, radial_profile
    from diffproc.metrics.reference import iter_split_images

    dm = keep["_real_dm"]
    n_real = args.freq_real or args.num_samples
    batches, _ = iter_split_images(dm, "test", args.eval_batch_size, n_real)
    real = torch.cat([b.float() if b.is_floating_point() else b.float() / 127.5 - 1 for b in batches])
    gen = {n: x for n, x in keep.items() if not n.startswith("_")}
    res = compare_bands(real, gen)
    top = keep.get("_top", {})
    e1, e2 = DEFAULT_EDGES
    lines = [f"Power per band of the gray (channel-mean) spectrum, mean removed (DC excluded); bands in "
             f"fractions of Nyquist: low [0, {e1:.3f}), mid [{e1:.3f}, {e2:.3f}), high [{e2:.3f}, √2]. "
             f"Generated: each method's default solver at its largest NFE; real: {real.shape[0]} test images.", "",
             "| images | solver @ NFE | low | mid | high | power low / real | mid / real | high / real | L1(fractions, real) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        where = "—" if name == "real" else f"{top.get(name, ('?', '?'))[0]} @ {top.get(name, ('?', '?'))[1]}"
        f, p = r["fractions"], r["power_ratio"]
        lines.append(f"| {name} | {where} | {f[0]:.4f} | {f[1]:.4f} | {f[2]:.4f} | {p[0]:.3f} | {p[1]:.3f} | "
                     f"{p[2]:.3f} | {r['l1_to_real']:.4f} |")
    (args.out / "freq_bands.md").write_text("\n".join(lines) + "\n")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    rho, pr = radial_profile(real, remove_dc=True)
    a1.plot(rho, pr, "k-", lw=2.5, label="real")
    for name, x in gen.items():
        _, pg = radial_profile(x, remove_dc=True)
        a1.plot(rho, pg, label=name)
        a2.plot(rho, pg / pr, label=name)
    for a in (a1, a2):
        for e in DEFAULT_EDGES:
            a.axvline(e, color="gray", ls="--", lw=0.8)
        a.set_xlabel("radial frequency / Nyquist")
        a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_title("radially averaged power spectrum (mean removed)")
    a2.axhline(1.0, color="k", lw=1)
    a2.set_title("generated / real power (1 = matches the data)")
    fig.tight_layout()
    fig.savefig(args.out / "freq_bands.png", dpi=110)
    plt.close(fig)
    return {"bands": list(BAND_NAMES), "edges": list(DEFAULT_EDGES), "results": res}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stems = [method_name(c) for c in args.configs]
    if len(set(stems)) != len(stems):
        raise SystemExit(f"error: two configs share a file name {stems}; the method name is the file stem")
    seeds = args.train_seeds or [None]
    runs = [(cfg, stem if s is None else f"{stem}_s{s}", s) for cfg, stem in zip(args.configs, stems) for s in seeds]
    names = [name for _, name, _ in runs]
    groups = {stem: [n for _, n, _ in runs if n == stem or n.startswith(stem + "_s")] for stem in stems}
    cache_path = args.out / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log(f"{len(names)} methods, {args.steps} steps each, NFE {args.nfe}, {args.num_samples} samples; out {args.out}")

    train_info = {}
    for i, (cfg, name, seed) in enumerate(runs):
        log(f"[train {i + 1}/{len(names)}] {name} ({cfg})")
        info = train(cfg, name, args, seed)
        sps, src = seconds_per_train_step(run_dir(args.out, name), info)
        train_info[name] = {**info, "sec_per_step": sps, "sec_per_step_source": src}
    if args.fit_only:
        log(f"--fit-only: {len(names)} runs trained under {args.out / 'runs'}; nothing evaluated")
        return {"settings": settings, "train": train_info}

    rows, keep = evaluate(args, names, cache)

    grids = args.out / "grids"
    grids.mkdir(exist_ok=True)
    for name in names:
        if name in keep:
            save_grid(keep[name], grids / f"{name}.png", args.grid_images)
    curves = {n: read_scalars(run_dir(args.out, n), "train/loss") for n in names}
    plot_loss(curves, args.out / "loss_vs_step.png")
    plot_metrics(rows, args.out / "fid_vs_nfe.png")
    freq = frequency_outputs(args, keep)

    extractor = next((r["extractor"] for r in rows if not r.get("skip")), args.extractor)
    header = (f"# Method comparison\n\n`{' '.join(['python', 'benchmarks/compare.py', *sys.argv[1:]]) if argv is None else 'compare.main(' + repr(argv) + ')'}`\n\n"
              f"{args.steps} training steps per method (training seeds {args.train_seeds or [args.seed]}); {args.num_samples} samples per row from "
              f"fixed seeds with the EMA weights"
              + (f", measured on each of {len(args.seeds)} seed blocks {args.seeds} (block s = samples s .. "
                 f"s+{args.num_samples - 1}); values are mean ± std (ddof=1) over the blocks" if len(args.seeds) > 1 else "")
              + f"; metrics on `{extractor}` features against `{rows[0]['reference'] if rows else '?'}`. "
              f"NFE = network evaluations actually spent; steps = NFE // NFE-per-step of the solver. "
              f"s / train step from the logged throughput (`*`: fit wall time / steps, start-up included). "
              f"Manual: docs/compare.md.\n")
    summary = ""
    if args.train_seeds and len(args.train_seeds) > 1 or args.floor:
        summary = ("\n## Over training seeds\n\n" + seed_summary(rows, groups) + "\n\n## Every run\n\n")
    (args.out / "results.md").write_text(header + "\n" + summary + results_table(rows, train_info) + "\n")
    planned = {(r["method"], r["solver"], r["target_nfe"]) for r in rows}
    # rows cached by earlier calls with other methods / solvers / NFEs stay in results.json (not in results.md)
    kept = [r for r in cache.get("rows", []) if (r["method"], r["solver"], r["target_nfe"]) not in planned]
    cache = {"settings": settings, "train": train_info, "rows": rows + kept, "freq_bands": freq,
             "loss_curves": {n: [(s, v) for s, v, _ in c] for n, c in curves.items()}}
    write_json(cache_path, cache)
    log(f"done: {args.out / 'results.md'}")
    print((args.out / "results.md").read_text(), flush=True)
    return cache


if __name__ == "__main__":
    main()
