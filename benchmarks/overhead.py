"""Framework overhead: training throughput through the Lightning Trainer vs a bare PyTorch loop.

Same DDPM module, UNet, batch, data loader, AdamW, gradient clipping (1.0) and EMA update in both; the
two are interleaved (bare, Lightning, bare, Lightning, ...) in one process so machine load affects both
alike, and the median over repeats is reported.

    python benchmarks/overhead.py                       # CPU, 16x16, small UNet
    python benchmarks/overhead.py --device cuda --image-size 64 --batch-size 64 --precision bf16-mixed \
        --widths 128 256 256 256 --steps 100

Prints images/s of each and the ratio Lightning / bare (goal >= 0.97).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffproc.data.shapes import generate_shapes
from diffproc.methods.base import DiffusionModule
from diffproc.processes.ddpm import DDPMProcess


def make_module(args: argparse.Namespace) -> DiffusionModule:
    unet = {"block_out_channels": args.widths, "layers_per_block": args.layers,
            "attention_resolutions": args.attention}
    return DiffusionModule(process=DDPMProcess(), image_size=args.image_size, unet=unet, lr=2e-4, warmup_steps=10,
                           ema_decay=0.999)


def loader(args: argparse.Namespace) -> DataLoader:
    x, y = generate_shapes(args.batch_size * 8, args.image_size)
    ds = TensorDataset(x.float() / 127.5 - 1, y)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      pin_memory=args.device == "cuda")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_loop(args: argparse.Namespace) -> float:
    """Images/s of a hand-written loop doing what the Trainer does for DiffusionModule."""
    torch.manual_seed(0)
    module = make_module(args).to(args.device)
    opt = module.configure_optimizers()["optimizer"]
    dl = loader(args)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    step, t0 = 0, None
    while step < args.warmup + args.steps:
        for x, _ in dl:
            if step == args.warmup:
                _sync(args.device)
                t0 = time.perf_counter()
            if step == args.warmup + args.steps:
                break
            x = x.to(args.device, non_blocking=True)
            with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
                loss = module.compute_loss(x, module.unet)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.unet.parameters(), 1.0)
            opt.step()
            module.update_ema()
            step += 1
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


class _Timer(L.Callback):
    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.t0, self.t1 = warmup, device, None, None

    def on_train_batch_start(self, trainer, *a) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            _sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, *a) -> None:
        _sync(self.device)
        self.t1 = time.perf_counter()


def lightning_loop(args: argparse.Namespace) -> float:
    """Images/s through ``L.Trainer.fit`` (no logger/checkpoint/progress bar: pure loop overhead)."""
    torch.manual_seed(0)
    module = make_module(args)
    timer = _Timer(args.warmup, args.device)
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        max_steps=args.warmup + args.steps, precision=args.precision,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader(args))
    return args.steps * args.batch_size / (timer.t1 - timer.t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--attention", type=int, nargs="*", default=[])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    bare, light = [], []
    for r in range(args.repeats):
        bare.append(bare_loop(args))
        light.append(lightning_loop(args))
        print(f"repeat {r}: bare {bare[-1]:.1f} img/s, lightning {light[-1]:.1f} img/s", flush=True)
    b, l = statistics.median(bare), statistics.median(light)
    print(f"\ndevice={args.device} image={args.image_size} batch={args.batch_size} widths={args.widths} "
          f"precision={args.precision} steps={args.steps}x{args.repeats}")
    print(f"bare PyTorch loop : {b:10.1f} images/s")
    print(f"Lightning Trainer : {l:10.1f} images/s")
    print(f"ratio Lightning / bare = {l / b:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
