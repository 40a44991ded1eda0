"""Generative metrics as Lightning callbacks (metric objects live here, never in the LightningModule:
Lightning's weight averaging deep-copies the module, and checkpoints would carry Inception).

- :class:`TestMetricsCallback`: ``cli.py test`` generates ``num_samples`` images (EMA weights, the
  model's solver/steps), computes FID/KID/IS/precision/recall/sFID against cached reference stats,
  logs ``test/<metric>`` and writes ``metrics.json`` + ``samples.png`` in the run's log dir.
- :class:`FIDCallback`: during ``fit``, every N steps/epochs, a few thousand samples on all ranks,
  logged as ``gen/<metric>``.

Sampling is split disjointly across ranks: batch ``b`` covers global sample indices
``[b*batch_size, (b+1)*batch_size)`` and runs on rank ``b % world_size``; sample ``i`` draws all its
noise from ``(seed, i)`` (:class:`~diffproc.processes.base.PerSampleGenerator`). So the samples (and,
since the metric states are synced and sorted by index, the numbers) depend neither on the batch size
nor on the number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from diffproc.methods.base import resolve_renamed
from diffproc.metrics.features import build_extractor
from diffproc.metrics.reference import ReferenceStats, load_or_compute_reference
from diffproc.metrics.suite import METRICS, MetricSuite

HEADLINE_NUM_SAMPLES = 50_000
SHAPES_NUM_SAMPLES = 2_000


def resolve_extractor_name(extractor: str, datamodule) -> str:
    """``auto`` -> ``shapes`` for the embedded shapes dataset, ``inception`` for everything else."""
    if extractor != "auto":
        return extractor
    name = str(getattr(datamodule, "name", "") or "")
    return "shapes" if name.startswith("shapes") else "inception"


def default_metrics(extractor: str) -> list[str]:
    base = ["fid", "kid", "is", "precision", "recall"]
    return base + ["sfid"] if extractor == "inception" else base


class _MetricsBase(L.Callback):
    """Shared: extractor + reference set-up (fail fast), disjoint generation, synced compute."""

    def __init__(self, num_samples: Optional[int], extractor: str, feature_extractor_weights_path: Optional[str],
                 reference: str, metrics: Optional[list[str]], seed: int, batch_size: int,
                 num_reference: Optional[int], num_reference_features: int, cache_dir: Optional[str],
                 num_steps: Optional[int], solver: Optional[str], progress: bool) -> None:
        if metrics is not None:
            bad = [m for m in metrics if m not in METRICS]
            if bad:
                raise ValueError(f"Unknown metrics {bad}; choose from {list(METRICS)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = None if num_samples is None else int(num_samples)
        self.extractor = extractor
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.reference = reference
        self.metrics = metrics
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_reference = num_reference
        self.num_reference_features = int(num_reference_features)
        self.cache_dir = cache_dir
        self.num_steps = num_steps
        self.solver = solver
        self.progress = progress
        self.suite: Optional[MetricSuite] = None
        self.reference_id = ""

    # -- set-up ---------------------------------------------------------------------------------
    def _build(self, trainer: L.Trainer) -> None:
        """Extractor (fails at once if weights are missing), suite, reference stats (rank 0 computes
        and caches first; other ranks then load it, or compute it themselves on a non-shared FS)."""
        dm = trainer.datamodule
        name = resolve_extractor_name(self.extractor, dm)
        extractor = build_extractor(name, self.feature_extractor_weights_path)
        metrics = self.metrics if self.metrics is not None else default_metrics(name)
        suite = MetricSuite(extractor, metrics)
        if self.num_samples is None:
            self.num_samples = HEADLINE_NUM_SAMPLES if name == "inception" else SHAPES_NUM_SAMPLES
        device = trainer.strategy.root_device
        kwargs = dict(cache_dir=self.cache_dir, num=self.num_reference, num_features_kept=self.num_reference_features,
                      batch_size=self.batch_size, device=device)
        if trainer.is_global_zero:
            ref, self.reference_id = load_or_compute_reference(dm, self.reference, extractor, progress=self.progress, **kwargs)
        trainer.strategy.barrier("diffproc_reference_stats")
        if not trainer.is_global_zero:
            ref, self.reference_id = load_or_compute_reference(dm, self.reference, extractor, progress=False, **kwargs)
        suite.set_reference(ref)
        self.suite = suite.to(device)
        self._reference_meta = ref.meta

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, num_samples: int, desc: str) -> Optional[Tensor]:
        """Generate this rank's share of ``num_samples`` into the suite; returns rank 0's first batch."""
        suite = self.suite.to(pl_module.device)
        suite.reset()
        world, rank = trainer.world_size, trainer.global_rank
        starts = list(range(0, num_samples, self.batch_size))[rank::world]
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(self.batch_size, num_samples - s) for s in starts), unit="img",
                   desc=f"{desc} (rank {rank}/{world})", disable=not (self.progress and trainer.is_global_zero))
        first: Optional[Tensor] = None
        self.last_nfe = None
        for s in starts:
            n = min(self.batch_size, num_samples - s)
            res = pl_module.sample(n, num_steps=self.num_steps, solver=self.solver, progress=False,
                                   seed=self.seed, indices=range(s, s + n))
            x, self.last_nfe = res.images, res.nfe
            suite.update(x, torch.arange(s, s + n, device=x.device))
            if first is None:
                first = x[:64].detach().float().cpu()
            bar.update(n)
        bar.close()
        return first

    def _protocol(self, trainer: L.Trainer, pl_module: L.LightningModule, num_samples: int) -> dict:
        ex = self.suite.extractor
        return {
            **ex.protocol(),
            "metrics": list(self.suite.metrics),
            "num_samples": num_samples,
            "reference": self.reference_id,
            "reference_num_images": self._reference_meta.get("num_images"),
            "dataset": getattr(trainer.datamodule, "name", None),
            "image_size": getattr(trainer.datamodule, "image_size", None),
            "solver": self.solver or getattr(pl_module, "solver", None),
            "steps": self.num_steps or getattr(pl_module, "num_steps", None),
            "nfe": self.last_nfe,
            "seed": self.seed,
            "sample_seeding": "per sample: sample i draws all its noise from torch.Generator(sample_seed(seed, i)) "
                              "(diffproc.processes.base); independent of batch size and world size",
            "batch_size": self.batch_size,
            "world_size": trainer.world_size,
            "ema": getattr(pl_module, "ema_unet", None) is not None,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "model": type(pl_module).__name__,
            "uint8": "rounded (x*127.5+128, clamp, floor)",
            "headline_protocol": ex.name == "inception" and num_samples >= HEADLINE_NUM_SAMPLES
            and str(self.reference) == "train",
        }


class TestMetricsCallback(_MetricsBase):
    """Metrics of generated samples for ``cli.py test`` (``--metrics.*``).

    Args:
        num_samples: images to generate; default 50000 for ``inception`` (the headline protocol;
            fewer gives a loud warning) and 2000 for ``shapes``; 0 disables the callback.
        extractor: ``auto`` (``shapes`` for the embedded shapes dataset, else ``inception``),
            ``inception`` or ``shapes``. Shapes numbers are NOT comparable with Inception ones.
        feature_extractor_weights_path: Inception weights file (default: torch hub cache) or shapes weights.
        reference: split whose real images give the reference stats (``train`` = the published
            protocol), or a precomputed ``.npz`` (``mu``/``sigma`` only -> ``fid`` and ``is``).
        metrics: subset of ``fid, kid, is, precision, recall, sfid`` (default: all the extractor has).
        seed: base seed; sample ``i`` draws all its noise from ``(seed, i)`` (any batch size, any rank count).
        batch_size: samples per ``sample()`` call (per rank).
        num_reference: real images for the reference stats (default: the whole split).
        num_reference_features: real features kept for KID / precision / recall.
        cache_dir: reference stats cache (default ``$DIFFPROC_CACHE/ref_stats`` or
            ``~/.cache/diffproc/ref_stats``).
        num_steps, solver: override the model's (``--model.init_args.num_steps`` works too);
            ``sampling_steps``/``sampler``: their former, deprecated names.
        output: file name written in the run's log dir.
    """

    def __init__(self, num_samples: Optional[int] = None, extractor: str = "auto",
                 feature_extractor_weights_path: Optional[str] = None, reference: str = "train",
                 metrics: Optional[list[str]] = None, seed: int = 0, batch_size: int = 250,
                 num_reference: Optional[int] = None, num_reference_features: int = 10_000,
                 cache_dir: Optional[str] = None, num_steps: Optional[int] = None,
                 solver: Optional[str] = None, progress: bool = True, output: str = "metrics.json",
                 sampling_steps: Optional[int] = None, sampler: Optional[str] = None) -> None:
        solver, num_steps = resolve_renamed(solver=solver, sampler=sampler, num_steps=num_steps,
                                            sampling_steps=sampling_steps)
        super().__init__(num_samples, extractor, feature_extractor_weights_path, reference, metrics, seed, batch_size,
                         num_reference, num_reference_features, cache_dir, num_steps, solver, progress)
        self.output = output
        self.results: dict = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "test" or self.num_samples == 0:
            return
        self._build(trainer)  # before any sampling: missing weights / bad reference fail here
        if self.suite.extractor.name == "inception" and self.num_samples < HEADLINE_NUM_SAMPLES:
            rank_zero_warn(
                f"\n{'!' * 100}\nInception metrics with num_samples={self.num_samples} < {HEADLINE_NUM_SAMPLES}: "
                f"FID is biased upwards at small n and NOT comparable with published 50k-sample numbers "
                f"(recorded as headline_protocol=false in {self.output}).\n{'!' * 100}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.suite is None or not self.num_samples:
            return
        t0 = time.perf_counter()
        first = self._generate(trainer, pl_module, self.num_samples, "test metrics: sampling")
        seconds = time.perf_counter() - t0
        values = self.suite.compute()  # collective: every rank calls it
        pl_module.log_dict({f"test/{k}": v for k, v in values.items()}, sync_dist=False)
        protocol = self._protocol(trainer, pl_module, self.num_samples)
        self.results = {"metrics": values, "protocol": protocol, "sampling_seconds": round(seconds, 2)}
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: all ranks call it
        if trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / self.output).write_text(json.dumps(self.results, indent=2) + "\n")
            if first is not None:
                from torchvision.utils import save_image

                save_image((first + 1) / 2, out_dir / "samples.png", nrow=max(1, int(math.sqrt(len(first)))), padding=1)
            rank_zero_info(f"metrics -> {out_dir / self.output}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


class FIDCallback(_MetricsBase):
    """FID (and other cheap metrics) during ``fit`` every ``every_n_train_steps`` steps or
    ``every_n_epochs`` epochs, from ``num_samples`` samples split across all ranks, logged as
    ``gen/<metric>`` (e.g. ``gen/fid``, ``gen/shapes_fid``; usable as ``ModelCheckpoint`` monitor).
    The same seeds are used at every evaluation, so the curve is not sampling noise. Small-n FID is
    biased upwards: compare it only with itself (k-diffusion#51). Off by default: set
    ``every_n_train_steps`` or ``every_n_epochs`` to enable it (``--fid.every_n_train_steps 5000``).
    """

    def __init__(self, every_n_train_steps: Optional[int] = None, every_n_epochs: Optional[int] = None,
                 num_samples: int = 2000, extractor: str = "auto", feature_extractor_weights_path: Optional[str] = None,
                 reference: str = "train", metrics: Optional[list[str]] = None, seed: int = 0, batch_size: int = 250,
                 num_reference: Optional[int] = None, num_reference_features: int = 10_000,
                 cache_dir: Optional[str] = None, num_steps: Optional[int] = None,
                 solver: Optional[str] = None, progress: bool = False,
                 sampling_steps: Optional[int] = None, sampler: Optional[str] = None) -> None:
        solver, num_steps = resolve_renamed(solver=solver, sampler=sampler, num_steps=num_steps,
                                            sampling_steps=sampling_steps)
        super().__init__(num_samples, extractor, feature_extractor_weights_path, reference,
                         metrics if metrics is not None else ["fid"], seed, batch_size, num_reference,
                         num_reference_features, cache_dir, num_steps, solver, progress)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self._last_step = -1
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.num_samples and (self.every_n_train_steps or self.every_n_epochs):
            self._build(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.suite is not None and self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.suite is not None and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if trainer.global_step == self._last_step:
            return self.history[-1]["metrics"] if self.history else {}
        self._last_step = trainer.global_step
        self._generate(trainer, pl_module, self.num_samples, "FID: sampling")
        values = self.suite.compute()  # collective: every rank calls it
        logged = {f"gen/{k}": v for k, v in values.items()}
        # straight to the loggers: self.log at step level is throttled by log_every_n_steps
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        for k, v in logged.items():  # e.g. ModelCheckpoint(monitor="gen/fid")
            trainer.callback_metrics[k] = torch.tensor(v)
        self.history.append({"step": trainer.global_step, "metrics": values})
        self.suite.reset()
        return values
