"""Training step time and sampling time per network evaluation of every method, relative to DDPM.

Each method is built from its config through the CLI parser (so exactly what `cli.py fit` trains), with
the SAME UNet widths, image size and batch forced on all of them; methods are timed round-robin in one
process (DDPM, GDDM, ..., DDPM, GDDM, ...) so machine load affects all alike, and medians are reported.

    python benchmarks/step_time.py                                   # CPU, 16x16, shapes configs
    python benchmarks/step_time.py --device cuda --image-size 64 --batch-size 64 \
        --widths 128 256 256 256 --attention 16 --layers 2 --precision bf16 --steps 30

A training step = the method's objective (``compute_loss``: forward process, UNet, loss), backward,
grad-norm clipping, AdamW step and EMA update. Sampling time is per network evaluation (NFE), with
each method's default solver. On CUDA it also reports the UNet's FLOPs (torch's FlopCounterMode, one
training step = forward + backward) and the model FLOP utilisation against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffproc.cli import DiffprocCLI
from diffproc.data.shapes import generate_shapes
from diffproc.samplers import SamplingSpec
from sizes import add_size_args

DEFAULT_CONFIGS = ["configs/ddpm_shapes.yaml", "configs/gddm_shapes.yaml", "configs/lddm_shapes.yaml",
                   "configs/epdm_shapes.yaml", "configs/blur_shapes.yaml", "configs/sie_shapes.yaml"]


def build(config: str, args: argparse.Namespace):
    unet = {"block_out_channels": args.widths, "layers_per_block": args.layers,
            "attention_resolutions": args.attention}
    cli = DiffprocCLI(args=["--config", config, "--data.init_args.image_size", str(args.image_size),
                            "--model.init_args.unet", json.dumps(unet), "--trainer.logger", "false"],
                      run=False)
    return cli.model.to(args.device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, x: torch.Tensor, precision: str, opt: torch.optim.Optimizer | None = None):
    """One training step (loss, backward, clip, optimiser, EMA) as a closure; ``opt`` defaults to a plain
    AdamW. With a CUDA-graph compile mode each step is marked as a new graph replay."""
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = torch.bfloat16 if precision == "bf16" else None
    device = x.device.type
    graphs = getattr(model, "compile_train", "none") in ("reduce-overhead", "max-autotune") and device == "cuda"

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model.compute_loss(x, model.unet)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_ema()

    return step


def time_it(fn, n: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def train_flops(model, x: torch.Tensor) -> int:
    """FLOPs of one training step of the UNet (forward + backward), counted by torch."""
    z = model.process.to_domain(x)
    t = torch.full((x.shape[0],), 10.0, device=x.device)
    with FlopCounterMode(display=False) as counter:
        model.unet(z, t).sample.float().square().mean().backward()
    model.unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    add_size_args(p)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per repeat")
    p.add_argument("--sample-steps", type=int, default=10, help="sampling steps timed per repeat")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) and JSON here")
    args = p.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    imgs, _ = generate_shapes(args.batch_size, args.image_size)
    x = (imgs.float() / 127.5 - 1).to(args.device)
    models = {Path(c).stem: build(c, args) for c in args.configs}
    steps = {k: train_step_fn(m, x, args.precision) for k, m in models.items()}
    nb = args.sample_batch or args.batch_size
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    for fn in steps.values():  # warm-up (allocator, cuDNN autotune, caches)
        fn(), fn()

    train_t: dict[str, list[float]] = {k: [] for k in models}
    sample_t: dict[str, list[float]] = {k: [] for k in models}
    nfe: dict[str, int] = {}
    for r in range(args.repeats):
        for name, model in models.items():
            train_t[name].append(time_it(steps[name], args.steps, args.device))
            g = torch.Generator(device=args.device).manual_seed(r)
            sync(args.device)
            t0 = time.perf_counter()
            with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
                res = model.sample(nb, SamplingSpec(num_steps=args.sample_steps), generator=g, progress=False)
            sync(args.device)
            nfe[name] = res.nfe
            sample_t[name].append((time.perf_counter() - t0) / res.nfe)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    ref = next((k for k in models if k.startswith("ddpm")), next(iter(models)))
    med_train = {k: statistics.median(v) for k, v in train_t.items()}
    med_sample = {k: statistics.median(v) for k, v in sample_t.items()}
    rows = []
    header = (f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
              f"image={args.image_size}, batch={args.batch_size}, widths={args.widths}, layers={args.layers}, "
              f"attention={args.attention}, precision={args.precision}, medians of {args.repeats} repeats")
    lines = [header, "",
             "| method | params (UNet) | train step (ms) | images/s | train / DDPM | sample ms per NFE | sample / DDPM | NFE | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in models.items():
        tflops = mfu = ""
        if args.device == "cuda":
            fl = train_flops(model, x) / med_train[name] / 1e12
            tflops, mfu = f"{fl:.1f}", f"{100 * fl / args.peak_tflops:.1f}%"
        n_params = sum(p.numel() for p in model.unet.parameters())
        row = dict(method=name, params=n_params, train_ms=1e3 * med_train[name],
                   images_per_s=args.batch_size / med_train[name], train_ratio=med_train[name] / med_train[ref],
                   sample_ms_per_nfe=1e3 * med_sample[name], sample_ratio=med_sample[name] / med_sample[ref],
                   nfe=nfe[name], tflops=tflops, mfu=mfu)
        rows.append(row)
        lines.append(f"| {name} | {n_params / 1e6:.2f}M | {row['train_ms']:.1f} | {row['images_per_s']:.0f} | "
                     f"{row['train_ratio']:.3f} | {row['sample_ms_per_nfe']:.2f} | {row['sample_ratio']:.3f} | "
                     f"{row['nfe']} | {tflops} | {mfu} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_time.md").write_text(text + "\n")
        (args.out / "step_time.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
