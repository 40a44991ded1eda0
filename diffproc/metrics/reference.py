"""Reference (real-data) statistics, computed once and cached as ``.npz``.

File layout (pytorch-fid compatible: ``np.load(f)["mu"]``, ``["sigma"]``):

- ``mu`` (D,), ``sigma`` (D, D): float64 mean / unbiased covariance of the pooled features (FID);
- ``features`` (M, D) float32, optional: a seeded random subset of real pooled features in random
  order (KID, precision/recall);
- ``spatial_mu``, ``spatial_sigma``, optional: the same for sFID spatial features (inception);
- ``meta``: a JSON string (dataset, split, image size, extractor, counts, ...).

A user-supplied ``.npz`` with only ``mu``/``sigma`` (e.g. from pytorch-fid or another framework)
supports ``fid`` (and ``is``, which needs no reference); ``kid``, ``precision`` and ``recall`` need
``features`` and ``sfid`` needs ``spatial_mu``/``spatial_sigma``.

Cache: ``$DIFFPROC_CACHE/ref_stats`` if set, else ``~/.cache/diffproc/ref_stats``; the file name keys
dataset name (which includes the crop convention, e.g. ``celeba64_ddim``), split, image size,
extractor (with a weights hash: sha256 prefix for ``inception``, sha1 prefix for ``shapes``) and the
number of reference images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffproc.metrics.features import FeatureExtractor, weights_sha8


def default_cache_dir() -> Path:
    env = os.environ.get("DIFFPROC_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "diffproc") / "ref_stats"


def extractor_tag(extractor: FeatureExtractor) -> str:
    """Extractor name + short weights hash (retrained shapes weights never reuse stale stats).

    Inception weights are named by their content, ``inception-<first 8 hex of the file's sha256>``: the
    standard ``weights-inception-2015-12-05-6726825d.pth`` gives ``inception-6726825d`` (torch.hub's naming
    convention), any other file (e.g. ``get_inception``'s conversion) its own hash, never ``6726825d``."""
    if extractor.name == "inception":
        sha8 = getattr(extractor, "weights_sha8", None)
        return f"inception-{sha8 or weights_sha8(extractor.weights_path)}"
    path = getattr(extractor, "weights_path", None)
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:8] if path else "none"
    return f"{extractor.name}-{digest}"


def reference_key(dataset: str, split: str, image_size: int, extractor: FeatureExtractor, num: int | None) -> str:
    return f"{dataset}_{split}_{image_size}px_{extractor_tag(extractor)}_n{num if num else 'all'}"


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    spatial_mu: np.ndarray | None = None
    spatial_sigma: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def available(self) -> set[str]:
        """Metric names this reference supports."""
        out = {"fid", "is"}
        if self.features is not None:
            out |= {"kid", "precision", "recall"}
        if self.spatial_mu is not None:
            out.add("sfid")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        for k in ("features", "spatial_mu", "spatial_sigma"):
            if getattr(self, k) is not None:
                arrays[k] = getattr(self, k)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: ranks/jobs sharing the cache never read half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference statistics file {path} does not exist.")
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(f.keys())}); not a FID statistics file.")
            get = lambda k: f[k] if k in f else None  # noqa: E731
            meta = json.loads(str(f["meta"])) if "meta" in f else {"source": str(path)}
            return cls(f["mu"], f["sigma"], get("features"), get("spatial_mu"), get("spatial_sigma"), meta)


class _RunningMoments:
    """float64 running sum and outer-product sum -> mean and unbiased covariance."""

    def __init__(self) -> None:
        self.s: Tensor | None = None
        self.ss: Tensor | None = None
        self.n = 0

    def update(self, f: Tensor) -> None:
        f = f.double()
        if self.s is None:
            self.s, self.ss = f.sum(0), f.T @ f
        else:
            self.s += f.sum(0)
            self.ss += f.T @ f
        self.n += f.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s / self.n
        sigma = (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


@torch.no_grad()
def compute_reference(
    batches: Iterable[Tensor],
    extractor: FeatureExtractor,
    total: int,
    num_features_kept: int = 10_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    meta: dict | None = None,
) -> ReferenceStats:
    """Reference stats from ``total`` real images given as batches (float in [-1,1] or uint8).

    Keeps a seeded random subset of ``num_features_kept`` pooled features (in random order) for
    KID and precision/recall.
    """
    if total < 2:
        raise ValueError(f"Reference statistics need at least 2 real images, got {total}.")
    keep_n = min(num_features_kept, total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    slot = torch.full((total,), -1, dtype=torch.long)
    slot[perm[:keep_n]] = torch.arange(keep_n)  # image i -> position in the kept (shuffled) set
    kept: np.ndarray | None = None
    pool, spatial = _RunningMoments(), _RunningMoments()
    extractor = extractor.to(device)
    bar = tqdm(total=total, desc=f"reference stats ({extractor.name})", disable=not progress, unit="img")
    seen = 0
    for images in batches:
        images = images[: total - seen]
        if images.shape[0] == 0:
            break
        out = extractor(images.to(device))
        pool.update(out["pool"])
        if "spatial" in out:
            spatial.update(out["spatial"])
        if kept is None:
            kept = np.zeros((keep_n, out["pool"].shape[1]), dtype=np.float32)
        s = slot[seen : seen + images.shape[0]]
        m = s >= 0
        kept[s[m].numpy()] = out["pool"][m.to(out["pool"].device)].float().cpu().numpy()
        seen += images.shape[0]
        bar.update(images.shape[0])
        if seen >= total:
            break
    bar.close()
    if seen < total:
        raise ValueError(f"Reference images ran out: expected {total}, got {seen}.")
    mu, sigma = pool.result()
    stats = ReferenceStats(mu, sigma, kept, meta=dict(meta or {}, num_images=total, num_features_kept=keep_n,
                                                      extractor=extractor.name, resize=extractor.resize))
    if spatial.n:
        stats.spatial_mu, stats.spatial_sigma = spatial.result()
    return stats


def iter_split_images(datamodule, split: str, batch_size: int = 250, num: int | None = None) -> tuple[Iterator[Tensor], int]:
    """Real images of ``split`` (no random flip, dataset order) as float [-1,1] batches, and their count."""
    dataset = datamodule.dataset(split) if hasattr(datamodule, "dataset") else datamodule.build_dataset(split)
    total = len(dataset) if num is None else min(int(num), len(dataset))
    if hasattr(datamodule, "real_images"):  # ImageDataModule helper (uses the loader workers)
        return datamodule.real_images(split, num=total, batch_size=batch_size), total
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(total)), batch_size=batch_size)
    return (b[0] if isinstance(b, (list, tuple)) else b for b in loader), total


def load_or_compute_reference(
    datamodule,
    split_or_path: str,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike | None = None,
    num: int | None = None,
    num_features_kept: int = 10_000,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    progress: bool = True,
    compute: bool = True,
) -> tuple[ReferenceStats, str]:
    """Load ``split_or_path`` if it is an ``.npz`` file, else the cached stats of that split, else
    compute and cache them (when ``compute``). Returns the stats and a protocol string."""
    if split_or_path.endswith(".npz") or os.path.sep in split_or_path:
        stats = ReferenceStats.load(split_or_path)
        return stats, f"file:{Path(split_or_path).resolve()}"
    name = getattr(datamodule, "name", None) or type(datamodule).__name__
    size = int(getattr(datamodule, "image_size"))
    key_num = num
    if key_num is None and hasattr(datamodule, "dataset"):
        # "all images of the split" is keyed by their count, so that e.g. a 64-image shapes split and
        # the 10k one never share a cache file
        key_num = len(datamodule.dataset(split_or_path))
    key = reference_key(name, split_or_path, size, extractor, key_num)
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = path / f"{key}.npz"
    if path.is_file():
        return ReferenceStats.load(path), key
    if not compute:
        raise FileNotFoundError(path)
    batches, total = iter_split_images(datamodule, split_or_path, batch_size, num)
    meta = {"dataset": name, "split": split_or_path, "image_size": size, "key": key}
    stats = compute_reference(batches, extractor, total, num_features_kept, device=device, progress=progress, meta=meta)
    stats.save(path)
    return stats, key
