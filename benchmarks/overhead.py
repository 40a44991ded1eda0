"""Framework overhead: training throughput through the Lightning Trainer vs a bare PyTorch loop.

Both loops train the same module (two copies with the same initial weights) on the same data with AdamW,
gradient clipping (1.0) and the EMA update. They run side by side in one process, alternating step by step: a
callback times each Lightning step (one batch start to the next) and, after it, one step of the bare loop,
whose time it takes out of the Lightning step's. A slow phase of a shared machine then falls on both loops
alike (interleaving whole runs left ±5 % between runs of 10 s on 2 cores). A run's throughput is the batch
size over its **median step time**; the ratio Lightning / bare of a run is one sample, and the report gives
the median and the spread of ≥ 7 runs, and the same on the mean step time, which also counts costs that come
only every N steps (logging).

Setups:
  core  the module with a plain DataLoader, ``Trainer(logger=False, no callbacks, no progress bar)``: what
        the Lightning loop and the module's own per-step hooks (reseed, logging, finiteness check) cost.
  cli   what ``cli.py fit --config configs/quickstart.yaml`` runs: the module, data module, logger,
        progress bar and every default callback (checkpoint, sample grid, LR monitor, throughput monitor,
        non-finite guard, ...) built by ``DiffprocCLI``; the bare loop trains the same module on the same
        data module's loader. Once-per-run work (sample grid, checkpoint at the end of fit) is outside the
        timed steps.

    python benchmarks/overhead.py                      # core setup, CPU, 16x16, 9 repeats
    python benchmarks/overhead.py --setup cli
    python benchmarks/overhead.py --setup cli --profile   # what each per-step hook and callback costs
    python benchmarks/overhead.py --device cuda --image-size 64 --batch-size 64 --precision bf16-mixed \
        --widths 128 256 256 256 --steps 100

Prints images/s of each and the ratio Lightning / bare (goal >= 0.97).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, TensorDataset

from diffproc.cli import DiffprocCLI
from diffproc.data.shapes import generate_shapes
from diffproc.methods.base import DiffusionModule, images_of
from diffproc.processes.ddpm import DDPMProcess
from sizes import add_size_args

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Wall time at the start of every step; ``durations`` are the steps after ``warmup``."""

    def __init__(self, device: str) -> None:
        self.device, self.stamps = device, []

    def tick(self) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def durations(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[warmup:], self.stamps[warmup + 1:])]


class _ClockCallback(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.tick()

    def on_train_end(self, *args: Any) -> None:
        self.clock.tick()  # closes the last step (before any on_train_end work of the other callbacks)


# --- the two setups: (module, loader) for the bare loop, a fit function for Lightning -----------------
def core_module(args: argparse.Namespace) -> DiffusionModule:
    unet = {"block_out_channels": args.widths, "layers_per_block": args.layers,
            "attention_resolutions": args.attention}
    return DiffusionModule(process=DDPMProcess(), image_size=args.image_size, unet=unet, lr=2e-4, warmup_steps=10,
                           ema_decay=0.999)


def core_loader(args: argparse.Namespace) -> DataLoader:
    x, y = generate_shapes(args.batch_size * 8, args.image_size)
    ds = TensorDataset(x.float() / 127.5 - 1, y)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      pin_memory=args.device == "cuda")


def build_cli(args: argparse.Namespace, log_dir: str) -> DiffprocCLI:
    """``cli.py fit --config configs/quickstart.yaml`` with this benchmark's size, steps and device."""
    argv = ["--config", str(QUICKSTART), "--trainer.max_steps", str(args.warmup + args.steps + 1),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger.init_args.save_dir", log_dir, "--checkpoint.dirpath", f"{log_dir}/ckpt",
            "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.precision",
            args.precision, "--data.init_args.image_size", str(args.image_size), "--data.init_args.batch_size",
            str(args.batch_size), "--data.init_args.num_train", str(args.batch_size * 8),
            "--model.init_args.unet", json.dumps({"block_out_channels": args.widths, "layers_per_block": args.layers,
                                                  "attention_resolutions": args.attention})]
    argv0, sys.argv = sys.argv, sys.argv[:1]  # this script's own options are not the CLI's
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return DiffprocCLI(args=argv, run=False)
    finally:
        sys.argv = argv0


def setup(args: argparse.Namespace, log_dir: str) -> tuple[DiffusionModule, Any, Callable[[list], L.Trainer]]:
    """The module, its training loader, and ``fit(callbacks) -> trainer`` running the Lightning side."""
    torch.manual_seed(0)
    if args.setup == "core":
        module, dl = core_module(args), core_loader(args)

        def fit(callbacks: list, profiler: Any = None) -> L.Trainer:
            trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                                max_steps=args.warmup + args.steps + 1, precision=args.precision,
                                gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                                num_sanity_val_steps=0, limit_val_batches=0, profiler=profiler)
            trainer.fit(module, train_dataloaders=dl)
            return trainer
        return module, dl, fit

    cli = build_cli(args, log_dir)
    cli.datamodule.setup("fit")

    def fit(callbacks: list, profiler: Any = None) -> L.Trainer:
        trainer = cli.trainer
        trainer.callbacks.extend(callbacks)
        if profiler is not None:
            trainer.profiler = profiler
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar runs, unseen
            trainer.fit(cli.model, datamodule=cli.datamodule)
        return trainer
    return cli.model, cli.datamodule.train_dataloader(), fit


class BareLoop:
    """The hand-written loop doing what the Trainer does for DiffusionModule, one step per call."""

    def __init__(self, args: argparse.Namespace, module: DiffusionModule, loader: Any) -> None:
        self.device, self.module, self.loader = args.device, module.to(args.device), loader
        self.opt = module.configure_optimizers()["optimizer"]
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
        self.batches = iter(loader)

    @torch.enable_grad()
    def step(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        x = images_of(batch).to(self.device, non_blocking=True)
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.module.compute_loss(x, self.module.unet)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.unet.parameters(), 1.0)
        self.opt.step()
        self.module.update_ema()


class PairedSteps(L.Callback):
    """Times every Lightning step (one batch start to the next) and, after each, one step of the bare loop,
    whose time is taken out of the Lightning step's: the two alternate step by step, so a slow phase of the
    machine falls on both."""

    def __init__(self, bare: BareLoop) -> None:
        self.bare, self.clock, self.bare_times, self.inside = bare, StepClock(bare.device), [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.tick()
        self.clock.stamps[-1] -= self.inside  # Lightning's own time line, without the bare steps

    def on_train_batch_end(self, *args: Any) -> None:
        _sync(self.bare.device)
        t0 = time.perf_counter()
        self.bare.step()
        _sync(self.bare.device)
        self.bare_times.append(time.perf_counter() - t0)
        self.inside += self.bare_times[-1]

    def times(self, warmup: int, steps: int) -> tuple[list[float], list[float]]:
        """(bare, Lightning) step times after ``warmup``."""
        return self.bare_times[warmup:warmup + steps], self.clock.durations(warmup)[:steps]


def paired_run(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """One fit through Lightning with the bare loop stepping beside it on its own copy of module and data."""
    with tempfile.TemporaryDirectory() as log_dir:
        bare = BareLoop(args, *setup(args, f"{log_dir}/bare")[:2])
        _, _, fit = setup(args, f"{log_dir}/lightning")
        paired = PairedSteps(bare)
        fit([paired])
    return paired.times(args.warmup, args.steps)


def throughput(args: argparse.Namespace, steps: list[float]) -> tuple[float, float]:
    """Images/s at the median step time, and at the mean step time."""
    return args.batch_size / statistics.median(steps), args.batch_size / statistics.fmean(steps)


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (one run: no spread; use --repeats >= 7)"
    q = statistics.quantiles(values, n=4)
    return (f"median {statistics.median(values):.3f}  IQR [{q[0]:.3f}, {q[2]:.3f}]  "
            f"range [{min(values):.3f}, {max(values):.3f}]")


PER_STEP_IN_BARE_LOOP = ("configure_gradient_clipping", "optimizer_zero_grad", "train_dataloader_next")
COMPUTE = ("run_training_batch", "optimizer_step", "training_step", "backward")


def profile(args: argparse.Namespace) -> None:
    """One Lightning run under Lightning's ``SimpleProfiler``: every action called once per step, in ms per
    step and % of the median step; ``self.log`` inside ``training_step`` is timed separately."""
    with tempfile.TemporaryDirectory() as log_dir:
        module, _, fit = setup(args, log_dir)
        logged, log = [], module.log

        def timed_log(*a: Any, **k: Any) -> None:
            t0 = time.perf_counter()
            log(*a, **k)
            logged.append(time.perf_counter() - t0)
        module.log = timed_log
        clock, profiler = StepClock(args.device), SimpleProfiler()
        fit([_ClockCallback(clock)], profiler)
    step = statistics.median(clock.durations(args.warmup))
    total = args.warmup + args.steps
    rows = [(name, statistics.fmean(d[args.warmup:]), len(d)) for name, d in profiler.recorded_durations.items()
            if len(d) >= total]
    rows.append(("DiffusionModule.log (inside training_step)", sum(logged) / total, len(logged)))
    print(f"\nper-step actions ({args.setup} setup), median step {step * 1e3:.1f} ms:")
    print(f"{'action':<78} {'calls':>6} {'ms/step':>8} {'% step':>7}")
    extra = 0.0
    for name, mean, calls in sorted(rows, key=lambda r: -r[1] * r[2]):
        per_step = mean * calls / total
        tag = ""
        if any(c in name for c in PER_STEP_IN_BARE_LOOP):
            tag = "  (bare loop does it too)"
        elif name.rsplit(".", 1)[-1] in COMPUTE:
            tag = "  (contains the model's compute)"
        else:
            extra += per_step
        print(f"{name[:78]:<78} {calls:>6} {per_step * 1e3:8.3f} {100 * per_step / step:6.2f}%{tag}")
    print(f"{'sum of framework-only actions':<78} {'':>6} {extra * 1e3:8.3f} {100 * extra / step:6.2f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=("core", "cli"), default="core")
    add_size_args(p)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--profile", action="store_true", help="profile one Lightning run instead")
    args = p.parse_args()
    if args.profile:
        return profile(args)

    ratios_median, ratios_mean = [], []
    for r in range(args.repeats):
        bare, light = paired_run(args)
        (bm, bt), (lm, lt) = throughput(args, bare), throughput(args, light)
        ratios_median.append(lm / bm)
        ratios_mean.append(lt / bt)
        print(f"repeat {r}: bare {bm:7.1f} img/s, lightning {lm:7.1f} img/s (median step); ratio {lm / bm:.3f}"
              f"  | mean step: {bt:7.1f} / {lt:7.1f}, ratio {lt / bt:.3f}", flush=True)
    print(f"\nsetup={args.setup} device={args.device} image={args.image_size} batch={args.batch_size} "
          f"widths={args.widths} precision={args.precision} steps={args.steps} repeats={args.repeats}")
    print(f"ratio Lightning / bare, median step time: {spread(ratios_median)}  (goal >= 0.97)")
    print(f"ratio Lightning / bare, mean step time:   {spread(ratios_mean)}")


if __name__ == "__main__":
    main()
