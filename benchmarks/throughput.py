r"""Speed options (issue 20): eager vs each option vs all together, for DDPM and every paper method.

Options (``DiffusionModule`` arguments, in every method's config): ``compile_train`` / ``compile_sample``
(``torch.compile`` of the UNet call), ``channels_last``, ``fused_optimizer``. Variants timed here:

    eager           no option (the default)
    channels_last   channels_last=true
    fused           fused_optimizer=true
    compile         compile_train=--compile-train, compile_sample=--compile-sample
    all             all of the above

Every (config, variant) model is built through the CLI parser (what ``cli.py fit`` trains) with the SAME UNet,
image size and batch forced on all (as ``step_time.py``), from the same seed. One warm-up pass compiles and
measures peak memory; then the (config, variant) pairs are timed round-robin, ``--repeats`` times, so machine
load affects all alike. ``--stat`` picks the estimator over the repeats: ``min`` (default: on a shared machine the
fastest repeat is the one least disturbed by other jobs; the work is deterministic) or ``median``. On a CPU that
other jobs share, use one thread per process: with as many OpenMP threads as cores, a descheduled thread stalls
every barrier (measured on 2 shared cores: 2 threads took 0.5-5 s per step where 1 thread steadily took 0.3 s).

* training images/s: one full step = ``compute_loss`` (process + UNet + loss), backward, grad-norm clipping,
  the module's own AdamW (``configure_optimizers``: fused or not) and the EMA update;
* sampling images/s per NFE: images / (wall time per network evaluation) of ``model.sample`` with each method's
  default solver (``--sample-steps`` steps) -- the rate at which one NFE is spent on every image;
* peak memory of one training step / one sampling call above what was allocated before it (activations,
  gradients, workspaces): CUDA ``max_memory_allocated``; CPU: the C heap in use (glibc ``mallinfo2``), sampled
  every millisecond (a short spike between two reads can be missed);
* warm-up: seconds of the first two steps and the first sampling call (compilation included);
* ratios: each variant / eager of the same method, and each method / DDPM within the variant (goal <= 1.05);
  on CUDA also TFLOP/s and MFU of the training step (UNet FLOPs by torch's FlopCounterMode, ``--peak-tflops``).

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --steps 2 --repeats 5 --sample-steps 3 \
        --out docs/results/throughput_cpu.md                               # CPU, 16x16, the quickstart UNet
    python benchmarks/throughput.py --device cuda --image-size 64 --widths 128 256 256 256 --attention 16 \
        --layers 2 --precision bf16 --batch-size 64 --steps 20 --sample-steps 20 --sample-batch 256 \
        --out docs/results/throughput_gpu_b64.md                           # then --batch-size 256
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from diffproc.cli import DiffprocCLI
from diffproc.data.shapes import generate_shapes
from diffproc.samplers import SamplingSpec
from sizes import add_size_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import sync, train_flops, train_step_fn  # noqa: E402  (shared with step_time.py)

DEFAULT_CONFIGS = ["configs/quickstart.yaml", "configs/ddpm_shapes.yaml", "configs/gddm_shapes.yaml",
                   "configs/lddm_shapes.yaml", "configs/epdm_shapes.yaml", "configs/blur_shapes.yaml",
                   "configs/sie_shapes.yaml"]
VARIANTS = ["eager", "channels_last", "fused", "compile", "all"]


def variant_options(variant: str, args: argparse.Namespace) -> dict:
    compiled = {"compile_train": args.compile_train, "compile_sample": args.compile_sample}
    return {"eager": {}, "channels_last": {"channels_last": True}, "fused": {"fused_optimizer": True},
            "compile": compiled,
            "all": {**compiled, "channels_last": True, "fused_optimizer": True}}[variant]


def build(config: str, options: dict, args: argparse.Namespace):
    unet = {"block_out_channels": args.widths, "layers_per_block": args.layers,
            "attention_resolutions": args.attention}
    cli_args = ["--config", config, "--data.init_args.image_size", str(args.image_size),
                "--model.init_args.unet", json.dumps(unet), "--trainer.logger", "false"]
    for k, v in options.items():
        cli_args += [f"--model.init_args.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    torch.manual_seed(0)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI(args=...) warns when sys.argv has arguments too
    try:
        model = DiffprocCLI(args=cli_args, run=False).model.to(args.device)
    finally:
        sys.argv = argv
    model.hparams.lr_schedule = "constant"  # a cosine factor needs a Trainer; it does not change the step's cost
    return model


def sample_fn(model, n: int, steps: int, device: str, precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else None

    def run(seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return model.sample(n, SamplingSpec(num_steps=steps), generator=g, progress=False)

    return run


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], int]:
    """Bytes the C heap has handed out and not freed (glibc ``mallinfo2``: all arenas + mmapped blocks):
    what torch's CPU tensors hold, without the allocator's cached free memory that RSS would count."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def in_use() -> int:
            m = libc.mallinfo2()
            return m.uordblks + m.hblkhd

        in_use()
        return in_use
    except (OSError, AttributeError):  # not glibc: resident set size
        return lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a phase above its start, in MiB (activations, gradients, workspaces: the weights, EMA and
    optimiser state of the many models this script holds are not counted). CUDA: the allocator's peak; CPU: the
    C heap in use (:func:`_heap_in_use`), read every millisecond by a background thread."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.read = _heap_in_use()
            self.base = self.high = self.read()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.001):
            self.high = max(self.high, self.read())

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = (max(self.high, self.read()) - self.base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    add_size_args(p)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile-train", default=None, help="compile_train of the compile variants "
                   "(default: 'default')")
    p.add_argument("--compile-sample", default=None, help="compile_sample of the compile variants "
                   "(default: 'reduce-overhead' on CUDA -- CUDA graphs for the fixed-shape loop --, else 'default')")
    p.add_argument("--steps", type=int, default=1, help="timed training steps per repeat")
    p.add_argument("--sample-steps", type=int, default=3, help="sampling steps per timed call")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default: batch)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--stat", choices=["min", "median"], default="min", help="estimator over the repeats")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--out", type=Path, default=None, help="write the tables (markdown) to this file")
    p.add_argument("--json", type=Path, default=None, help="write every number (JSON) to this file")
    p.add_argument("--from-json", type=Path, default=None, help="measure nothing: redo the tables from the raw "
                   "times of a --json file (with its recorded settings; --stat, --out, --json from here)")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        for k, v in saved["args"].items():
            if k not in ("stat", "out", "json", "from_json"):
                setattr(args, k, json.loads(v) if v[:1] and v[:1] in "[0123456789" else v)
        return report(saved["raw"], args)
    args.compile_train = args.compile_train or "default"
    args.compile_sample = args.compile_sample or ("reduce-overhead" if args.device == "cuda" else "default")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # every (config, variant) is its own module: more graphs of the one compiled UNet call than the default 8
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096

    torch.manual_seed(0)
    imgs, _ = generate_shapes(args.batch_size, args.image_size)
    x = (imgs.float() / 127.5 - 1).to(args.device)
    nb = args.sample_batch or args.batch_size
    keys = [(Path(c).stem, v) for c in args.configs for v in args.variants]
    models, steps, samplers, warm, mem_train, mem_sample, nfe = {}, {}, {}, {}, {}, {}, {}
    for (name, variant), config in zip(keys, [c for c in args.configs for _ in args.variants]):
        key = (name, variant)
        t0 = time.perf_counter()
        models[key] = m = build(config, variant_options(variant, args), args)
        # AdamW as fit builds it (fused when fused_optimizer)
        steps[key] = train_step_fn(m, x, args.precision, m.configure_optimizers()["optimizer"])
        samplers[key] = sample_fn(m, nb, args.sample_steps, args.device, args.precision)
        steps[key](), steps[key]()
        samplers[key]()
        sync(args.device)
        warm[key] = time.perf_counter() - t0
        with PeakMemory(args.device) as mt:
            steps[key]()
        with PeakMemory(args.device) as ms:
            nfe[key] = samplers[key]().nfe
        mem_train[key], mem_sample[key] = mt.peak, ms.peak
        print(f"warm-up {name}/{variant}: {warm[key]:.1f} s", flush=True)

    train_t = {k: [] for k in keys}
    sample_t = {k: [] for k in keys}
    for r in range(args.repeats):
        for key in keys:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[key]()
            sync(args.device)
            train_t[key].append((time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            res = samplers[key](r)
            sync(args.device)
            sample_t[key].append((time.perf_counter() - t0) / res.nfe)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    flops: dict[str, float] = {}
    if args.device == "cuda":
        for (name, _), m in models.items():
            if name not in flops:
                flops[name] = train_flops(m, x)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    argv = sys.argv[1:]
    if "--json" in argv:  # where the raw numbers went is not part of the recipe
        del argv[argv.index("--json"):argv.index("--json") + 2]
    threads = os.environ.get("OMP_NUM_THREADS", "")
    command = f"OMP_NUM_THREADS={threads} python benchmarks/throughput.py " + " ".join(argv)
    raw = {"command": command, "device_name": device_name, "torch": torch.__version__, "sample_batch": nb,
           "keys": [list(k) for k in keys], "train_times": [train_t[k] for k in keys],
           "sample_times": [sample_t[k] for k in keys], "train_peak_mib": [mem_train[k] for k in keys],
           "sample_peak_mib": [mem_sample[k] for k in keys], "warmup_s": [warm[k] for k in keys],
           "nfe": [nfe[k] for k in keys], "flops": flops}
    report(raw, args)


def summarize(raw: dict, stat, ref: str) -> tuple[dict, dict]:
    """Per (method, variant): times by the estimator ``stat`` and the ratios; per variant: their summary."""
    keys = [tuple(k) for k in raw["keys"]]
    tt = {k: stat(v) for k, v in zip(keys, raw["train_times"])}
    st = {k: stat(v) for k, v in zip(keys, raw["sample_times"])}
    ratios = {}
    for name, variant in keys:
        k, eager, base = (name, variant), (name, "eager"), (ref, variant)
        eager, base = (eager if eager in tt else k), (base if base in tt else k)
        ratios[k] = dict(train_s=tt[k], sample_s_per_nfe=st[k], train_vs_eager=tt[eager] / tt[k],
                         train_vs_ddpm=tt[k] / tt[base], sample_vs_eager=st[eager] / st[k])
    summary = {}
    for variant in dict.fromkeys(k[1] for k in keys):
        vr = {k[0]: r for k, r in ratios.items() if k[1] == variant}
        tr, sr = [r["train_vs_eager"] for r in vr.values()], [r["sample_vs_eager"] for r in vr.values()]
        summary[variant] = dict(train_geo=math.exp(statistics.fmean(map(math.log, tr))), train_min=min(tr),
                                train_max=max(tr), sample_geo=math.exp(statistics.fmean(map(math.log, sr))),
                                sample_min=min(sr), sample_max=max(sr),
                                vs_ddpm={n: r["train_vs_ddpm"] for n, r in vr.items()})
    return ratios, summary


def report(raw: dict, args: argparse.Namespace) -> None:
    """Markdown tables (printed, ``--out``) and every number (``--json``) from the measured ``raw`` times."""
    keys = [tuple(k) for k in raw["keys"]]
    names = list(dict.fromkeys(k[0] for k in keys))
    ref = next((n for n in names if n.startswith("ddpm")), names[0])
    nb = raw["sample_batch"]
    stats = {"min": min, "median": statistics.median}
    ratios, summary = summarize(raw, stats[args.stat], ref)
    header = (f"device={args.device} ({raw['device_name']}), torch {raw['torch']}, image={args.image_size}, "
              f"train batch={args.batch_size}, sample batch={nb}, widths={args.widths}, layers={args.layers}, "
              f"attention={args.attention}, precision={args.precision}, compile_train={args.compile_train}, "
              f"compile_sample={args.compile_sample}, {args.steps} train steps and {args.sample_steps} sampling "
              f"steps per repeat, {args.stat} of {args.repeats} interleaved repeats")
    lines = [header, "",
             f"| method | variant | train ms | train img/s | × eager | × {ref} | sample ms/NFE "
             "| sample img/s per NFE | × eager | train peak +MiB | sample peak +MiB | warm-up s | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for i, key in enumerate(keys):
        name, variant = key
        r = ratios[key]
        tflops = mfu = ""
        if name in raw["flops"]:
            fl = raw["flops"][name] / r["train_s"] / 1e12
            tflops, mfu = f"{fl:.1f}", f"{100 * fl / args.peak_tflops:.1f}%"
        row = dict(method=name, variant=variant, train_ms=1e3 * r["train_s"],
                   train_images_per_s=args.batch_size / r["train_s"], train_vs_eager=r["train_vs_eager"],
                   train_vs_ddpm=r["train_vs_ddpm"], sample_ms_per_nfe=1e3 * r["sample_s_per_nfe"],
                   sample_images_per_s_per_nfe=nb / r["sample_s_per_nfe"], sample_vs_eager=r["sample_vs_eager"],
                   train_peak_mib=raw["train_peak_mib"][i], sample_peak_mib=raw["sample_peak_mib"][i],
                   warmup_s=raw["warmup_s"][i], nfe=raw["nfe"][i], tflops=tflops, mfu=mfu)
        rows.append(row)
        lines.append(f"| {name} | {variant} | {row['train_ms']:.1f} | {row['train_images_per_s']:.0f} | "
                     f"{row['train_vs_eager']:.2f} | {row['train_vs_ddpm']:.2f} | {row['sample_ms_per_nfe']:.2f} | "
                     f"{row['sample_images_per_s_per_nfe']:.0f} | {row['sample_vs_eager']:.2f} | "
                     f"{row['train_peak_mib']:.0f} | {row['sample_peak_mib']:.0f} | {row['warmup_s']:.0f} | "
                     f"{tflops} | {mfu} |")
    # summaries: per variant, the geometric mean over methods of the speed-up and each method's step / DDPM's,
    # by both estimators (where they disagree, the difference is the machine's noise)
    lines += ["", "× eager: throughput of the variant / eager (> 1 is faster); "
              f"× {ref}: training step time / {ref}'s in the same variant (goal ≤ 1.05).", ""]
    summaries = {}
    for stat_name, stat in stats.items():
        summaries[stat_name] = summary if stat_name == args.stat else summarize(raw, stat, ref)[1]
        lines += [f"Summary by the {stat_name} of the repeats:", "",
                  "| variant | train × eager (geo. mean) | train × eager (min..max) | sample × eager (geo. mean) "
                  "| sample × eager (min..max) | train step × " + ref + ": " + ", ".join(names) + " |",
                  "|---|---|---|---|---|---|"]
        for variant, s in summaries[stat_name].items():
            lines.append(f"| {variant} | {s['train_geo']:.2f} | {s['train_min']:.2f}..{s['train_max']:.2f} | "
                         f"{s['sample_geo']:.2f} | {s['sample_min']:.2f}..{s['sample_max']:.2f} | "
                         + " ".join(f"{s['vs_ddpm'][n]:.2f}" for n in names) + " |")
        lines.append("")
    text = "\n".join(lines).rstrip()
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Speed options: eager vs each option vs all ({args.device})\n\n"
                            f"```bash\n{raw['command']}\n```\n\n" + text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        saved_args = {k: json.dumps(v) if isinstance(v, (int, float, list)) else str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"header": header, "args": saved_args, "raw": raw, "rows": rows,
                                         "summaries": summaries}, indent=1))


if __name__ == "__main__":
    main()
