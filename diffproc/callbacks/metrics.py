"""Generative metrics as Lightning callbacks (metric objects live here, never in the LightningModule:
Lightning's weight averaging deep-copies the module, and checkpoints would carry Inception).

- :class:`TestMetricsCallback`: ``cli.py test`` generates ``num_samples`` images (EMA weights, the
  model's sampling spec under the callback's ``sampling`` override), computes FID/KID/IS/precision/recall/sFID against cached reference stats,
  logs ``test/<metric>`` and writes ``metrics.json`` + ``samples.png`` in the run's log dir.
- :class:`FIDCallback`: during ``fit``, every N steps/epochs, a few thousand samples on all ranks,
  logged as ``gen/<metric>``.

Sampling is split disjointly across ranks: batch ``b`` covers global sample indices
``[b*batch_size, (b+1)*batch_size)`` and runs on rank ``b % world_size``; sample ``i`` draws all its
noise from ``(seed, i)`` (:class:`~diffproc.processes.rng.PerSampleGenerator`; ``seed`` is the sampling spec's:
``--metrics.sampling.seed``, else ``model.init_args.sampling.seed``). So the samples (and,
since the metric states are synced and sorted by index, the numbers) depend neither on the batch size
nor on the number of ranks.

Seed blocks (EDM's protocol: report the mean, spread and minimum over seeds 0-49999, 50000-99999,
100000-149999): with ``seeds=[s_1, s_2, ...]`` block ``b`` generates ``num_samples`` images with the global
sample indices ``s_b .. s_b + num_samples - 1``, i.e. sample ``j`` of the block draws its noise from
``(seed, s_b + j)``. Block 0 (``seeds=[0]``, the default) is exactly the single-block run. Every metric is
computed per block; ``test/<metric>`` is the mean over blocks, ``test/<metric>_std`` the sample std (ddof=1)
and ``test/<metric>_min`` the minimum.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchvision.utils import save_image
from tqdm.auto import tqdm

from diffproc.callbacks.sample_grid import check_sampling
from diffproc.metrics.features import build_extractor
from diffproc.metrics.reference import load_or_compute_reference
from diffproc.metrics.suite import METRICS, MetricSuite
from diffproc.samplers import SamplingSpec

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


def parse_seeds(seeds: Union[list[int], str, int]) -> list[int]:
    """Seed blocks from a list, or a string ``"0,50000,100000"`` / ``"0 50000 100000"`` (command line)."""
    if isinstance(seeds, str):
        seeds = seeds.replace(",", " ").replace("[", " ").replace("]", " ").split()
    elif isinstance(seeds, int):
        seeds = [seeds]
    try:
        out = [int(b) for b in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be integers, e.g. [0, 50000, 100000] or '0,50000,100000'; got {seeds!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise ValueError(f"seeds must be a non-empty list of distinct sample offsets >= 0, got {out}")
    return out


def aggregate_blocks(rows: list[dict[str, float]]) -> dict:
    """Mean over seed blocks (``metrics``) and, with 2 or more blocks, the sample std (ddof=1, ``std``) and
    the minimum (``min``) of every key. One block: ``metrics`` is that block's values, no ``std``/``min``."""
    keys = list(rows[0])
    out: dict = {"metrics": {k: sum(r[k] for r in rows) / len(rows) for k in keys}}
    if len(rows) > 1:
        out["std"] = {k: math.sqrt(sum((r[k] - out["metrics"][k]) ** 2 for r in rows) / (len(rows) - 1)) for k in keys}
        out["min"] = {k: min(r[k] for r in rows) for k in keys}
    return out


def format_blocks(agg: dict, num_blocks: int) -> str:
    """``fid=12.3`` (one block) or ``fid=12.3 ± 0.1 (min 12.2, 3 seed blocks)``."""
    if num_blocks < 2:
        return ", ".join(f"{k}={v:.4g}" for k, v in agg["metrics"].items())
    return ", ".join(f"{k}={v:.4g} ± {agg['std'][k]:.2g} (min {agg['min'][k]:.4g})" for k, v in agg["metrics"].items()) \
        + f" over {num_blocks} seed blocks"



class _MetricsBase(L.Callback):
    """Shared: extractor + reference set-up (fail fast), disjoint generation, synced compute."""

    #: the CLI group of the callback (error messages name ``--<group>.sampling.<field>``)
    cli_group = "metrics"

    def __init__(self, num_samples: Optional[int], extractor: str, feature_extractor_weights_path: Optional[str],
                 reference: str, metrics: Optional[list[str]], batch_size: int,
                 num_reference: Optional[int], num_reference_features: int, cache_dir: Optional[str],
                 sampling: Optional[SamplingSpec], progress: bool) -> None:
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
        self.sampling = SamplingSpec.of(sampling)
        self.spec: Optional[SamplingSpec] = None  # the complete spec of the last generation
        self.batch_size = int(batch_size)
        self.num_reference = num_reference
        self.num_reference_features = int(num_reference_features)
        self.cache_dir = cache_dir
        self.progress = progress
        self.suite: Optional[MetricSuite] = None
        self.reference_id = ""
        self.block_seeds: list[int] = [0]

    # -- set-up ---------------------------------------------------------------------------------
    def _build(self, trainer: L.Trainer) -> None:
        """Extractor (fails at once if weights are missing), suite, reference stats (rank 0 computes
        and caches first; other ranks then load it, or compute it themselves on a non-shared FS)."""
        dm = trainer.datamodule
        name = resolve_extractor_name(self.extractor, dm)
        extractor = build_extractor(name, self.feature_extractor_weights_path)
        metrics = self.metrics if self.metrics is not None else default_metrics(name)
        suite = MetricSuite(extractor, metrics)
        for m, reason in suite.unavailable.items():
            if self.metrics is not None and m in self.metrics:  # asked for explicitly: say so loudly
                rank_zero_warn(f"metrics: {m!r} was requested but cannot be computed: {reason}. The other metrics "
                               f"run; {m} is reported as null with this reason under 'unavailable'.")
            else:
                rank_zero_info(f"metrics: {m!r} is unavailable ({reason}); reported as null.")
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
    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, num_samples: int, desc: str,
                  offset: int = 0) -> Optional[Tensor]:
        """Generate this rank's share of ``num_samples`` into the suite (global sample indices
        ``offset .. offset + num_samples - 1``); returns this rank's first batch."""
        suite = self.suite.to(pl_module.device)
        suite.reset()
        world, rank = trainer.world_size, trainer.global_rank
        starts = list(range(0, num_samples, self.batch_size))[rank::world]
        resolve = getattr(pl_module, "sampling_spec", None)  # a stand-in model may take the override as it is
        spec = self.spec = resolve(self.sampling, f"--{self.cli_group}.sampling") if resolve else self.sampling
        if self.progress and hasattr(pl_module, "planned_nfe"):
            rank_zero_info(f"{desc}: {num_samples} images x {pl_module.planned_nfe(spec)} "
                           f"network evaluations ({spec.solver}), batches of {self.batch_size} "
                           f"over {world} rank(s)")
        bar = tqdm(total=sum(min(self.batch_size, num_samples - s) for s in starts), unit="img",
                   desc=f"{desc} (rank {rank}/{world})", disable=not (self.progress and trainer.is_global_zero))
        first: Optional[Tensor] = None
        self.last_nfe = None
        for s in starts:
            n = min(self.batch_size, num_samples - s)
            res = pl_module.sample(n, spec, progress=False, indices=range(offset + s, offset + s + n))
            x, self.last_nfe = res.images, res.nfe
            suite.update(x, torch.arange(offset + s, offset + s + n, device=x.device))
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
            "reference_num_features": self._reference_meta.get("num_features_kept"),
            "metric_params": self.suite.protocol(),
            "dataset": getattr(trainer.datamodule, "name", None),
            "image_size": getattr(trainer.datamodule, "image_size", None),
            "solver": self.spec.solver,
            "steps": self.spec.num_steps,
            "time_grid": self.spec.time_grid,
            "ddim_eta": self.spec.ddim_eta,
            "nfe": self.last_nfe,
            "seed": self.spec.seed,
            "seeds": list(self.block_seeds),
            "sample_seeding": "per sample: sample i draws all its noise from torch.Generator(sample_seed(seed, i)) "
                              "(diffproc.processes.base); independent of batch size and world size. Seed block s "
                              "(EDM convention) = samples i = s .. s + num_samples - 1; num_samples is per block",
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
        sampling: override of the model's sampling spec (:class:`~diffproc.samplers.SamplingSpec`; unset fields
            inherit ``model.init_args.sampling``): ``--metrics.sampling.num_steps 100``, ``--metrics.sampling.seed 1``
            (sample ``i`` draws all its noise from ``(seed, i)``: any batch size, any rank count).
        seeds: seed blocks (EDM's convention, e.g. ``[0, 50000, 100000]``): block ``s`` generates
            ``num_samples`` images, the samples ``i = s .. s + num_samples - 1`` of ``seed``; every metric
            is computed per block and reported per block and as mean, std (ddof=1) and min. Default: one
            block ``[0]``. Blocks must not overlap. Not part of the sampling spec: it is a list of runs (sample
            offsets under the one spec seed), each evaluated on its own.
        batch_size: samples per ``sample()`` call (per rank).
        num_reference: real images for the reference stats (default: the whole split).
        num_reference_features: real features kept for KID / precision / recall.
        cache_dir: reference stats cache (default ``$DIFFPROC_CACHE/ref_stats`` or
            ``~/.cache/diffproc/ref_stats``).
        output: file name written in the run's log dir.
    """

    def __init__(self, num_samples: Optional[int] = None, extractor: str = "auto",
                 feature_extractor_weights_path: Optional[str] = None, reference: str = "train",
                 metrics: Optional[list[str]] = None, sampling: Optional[SamplingSpec] = None,
                 seeds: Union[list[int], str, None] = None,
                 batch_size: int = 250, num_reference: Optional[int] = None, num_reference_features: int = 10_000,
                 cache_dir: Optional[str] = None, progress: bool = True, output: str = "metrics.json") -> None:
        super().__init__(num_samples, extractor, feature_extractor_weights_path, reference, metrics, batch_size,
                         num_reference, num_reference_features, cache_dir, sampling, progress)
        self.output = output
        self.results: dict = {}
        if seeds is not None:
            self.block_seeds = parse_seeds(seeds)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "test" or self.num_samples == 0:
            return
        check_sampling(pl_module, self.sampling, self.cli_group)
        self._build(trainer)  # before any sampling: missing weights / bad reference fail here
        starts = sorted(self.block_seeds)
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a < self.num_samples:
                raise ValueError(
                    f"Seed blocks {a} and {b} overlap: each block has num_samples={self.num_samples} samples "
                    f"({a}..{a + self.num_samples - 1}); space the seeds at least num_samples apart "
                    f"(EDM: 0, 50000, 100000 with 50000 samples).")
        if self.suite.extractor.name == "inception" and self.num_samples < HEADLINE_NUM_SAMPLES:
            rank_zero_warn(
                f"\n{'!' * 100}\nInception metrics with num_samples={self.num_samples} < {HEADLINE_NUM_SAMPLES}: "
                f"FID is biased upwards at small n and NOT comparable with published 50k-sample numbers "
                f"(recorded as headline_protocol=false in {self.output}).\n{'!' * 100}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.suite is None or not self.num_samples:
            return
        blocks, first, total = [], None, 0.0
        for b in self.block_seeds:
            t0 = time.perf_counter()
            desc = "test metrics: sampling" + (f" seed block {b}" if len(self.block_seeds) > 1 else "")
            got = self._generate(trainer, pl_module, self.num_samples, desc, offset=b)
            seconds = time.perf_counter() - t0
            total += seconds
            first = got if first is None else first
            values = self.suite.compute()  # collective: every rank calls it
            blocks.append({"seed": b, "metrics": values, "sampling_seconds": round(seconds, 2)})
        agg = aggregate_blocks([blk["metrics"] for blk in blocks])
        nulls = self.suite.null_results()  # requested but unavailable (e.g. IS without logits): null + reason
        logged = {f"test/{k}": v for k, v in agg["metrics"].items()}
        if len(blocks) > 1:
            logged.update({f"test/{k}_std": v for k, v in agg["std"].items()})
            logged.update({f"test/{k}_min": v for k, v in agg["min"].items()})
            for blk in blocks:
                logged.update({f"test/seed{blk['seed']}/{k}": v for k, v in blk["metrics"].items()})
        pl_module.log_dict(logged, sync_dist=False)
        protocol = self._protocol(trainer, pl_module, self.num_samples)
        self.results = {"metrics": {**agg["metrics"], **nulls}, **{k: agg[k] for k in ("std", "min") if k in agg},
                        "blocks": [{**blk, "metrics": {**blk["metrics"], **nulls}} for blk in blocks],
                        "protocol": protocol, "sampling_seconds": round(total, 2)}
        if self.suite.unavailable:
            self.results["unavailable"] = dict(self.suite.unavailable)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: all ranks call it
        if trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / self.output).write_text(json.dumps(self.results, indent=2) + "\n")
            if first is not None:
                save_image((first + 1) / 2, out_dir / "samples.png", nrow=max(1, int(math.sqrt(len(first)))), padding=1)
            missing = "".join(f"; {m}: unavailable ({r})" for m, r in self.suite.unavailable.items())
            rank_zero_info(f"metrics -> {out_dir / self.output}: " + format_blocks(agg, len(blocks)) + missing)


class FIDCallback(_MetricsBase):
    """FID (and other cheap metrics) during ``fit`` every ``every_n_train_steps`` steps or
    ``every_n_epochs`` epochs, from ``num_samples`` samples split across all ranks, logged as
    ``gen/<metric>`` (e.g. ``gen/fid``, ``gen/shapes_fid``; usable as ``ModelCheckpoint`` monitor).
    The same seeds are used at every evaluation, so the curve is not sampling noise. Small-n FID is
    biased upwards: compare it only with itself (k-diffusion#51). Off by default: set
    ``every_n_train_steps`` or ``every_n_epochs`` to enable it (``--fid.every_n_train_steps 5000``).
    ``sampling`` overrides the model's sampling spec field by field (``--fid.sampling.num_steps 20``); the other
    options are :class:`TestMetricsCallback`'s.
    """

    cli_group = "fid"


    def __init__(self, every_n_train_steps: Optional[int] = None, every_n_epochs: Optional[int] = None,
                 num_samples: int = 2000, extractor: str = "auto", feature_extractor_weights_path: Optional[str] = None,
                 reference: str = "train", metrics: Optional[list[str]] = None,
                 sampling: Optional[SamplingSpec] = None, batch_size: int = 250,
                 num_reference: Optional[int] = None, num_reference_features: int = 10_000,
                 cache_dir: Optional[str] = None, progress: bool = False) -> None:
        super().__init__(num_samples, extractor, feature_extractor_weights_path, reference,
                         metrics if metrics is not None else ["fid"], batch_size, num_reference,
                         num_reference_features, cache_dir, sampling, progress)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self._last_step = -1
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.num_samples and (self.every_n_train_steps or self.every_n_epochs):
            check_sampling(pl_module, self.sampling, self.cli_group)
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
