"""``MetricSuite``: one extractor forward feeds every requested metric (DDP-synced states).

Result keys: ``fid``, ``sfid``, ``kid_mean``/``kid_std``, ``is_mean``/``is_std``, ``precision``,
``recall``. For any extractor other than ``inception`` they carry its name as a prefix
(``shapes_fid``, ``shapes_is_mean``, ...) so they can never be mistaken for Inception numbers.

A requested metric the extractor cannot give (``is`` with Inception weights that have no logits, e.g.
``python -m diffproc.metrics.get_inception``'s) is not computed: it is listed in ``unavailable`` with the
reason, and :meth:`MetricSuite.null_results` gives its keys as ``None`` (``null`` in metrics.json).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from diffproc.metrics.features import FeatureExtractor
from diffproc.metrics.fid import (
    FeatureStore,
    FrechetDistance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from diffproc.metrics.reference import ReferenceStats

METRICS = ("fid", "kid", "is", "precision", "recall", "sfid")


class MetricSuite(nn.Module):
    """Holds the extractor and the metric states; lives in a callback, never in the LightningModule."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        metrics: Sequence[str] = ("fid", "kid", "is", "precision", "recall"),
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        pr_k: int = 3,
    ):
        super().__init__()
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"Unknown metrics {bad}; choose from {METRICS}.")
        if "sfid" in metrics and "spatial" not in extractor.provides:
            raise ValueError(f"sfid needs spatial features, which the {extractor.name!r} extractor does not provide; "
                             f"drop 'sfid' from the metrics list or use extractor='inception'.")
        self.metrics = tuple(dict.fromkeys(metrics))
        self.extractor = extractor
        #: metric -> why it is not computed (requested, but the extractor cannot give it)
        self.unavailable: dict[str, str] = {}
        if "is" in self.metrics and "logits" not in extractor.provides:
            reason = getattr(extractor, "no_logits_reason", lambda: "")()
            self.unavailable["is"] = reason or f"the {extractor.name!r} extractor provides no logits"
        self.kid_subsets, self.kid_subset_size, self.is_splits, self.pr_k = kid_subsets, kid_subset_size, is_splits, pr_k
        self.prefix = "" if extractor.name == "inception" else f"{extractor.name}_"
        self.fid = FrechetDistance(extractor.num_features) if "fid" in self.metrics else None
        self.sfid = FrechetDistance(InceptionSpatialDim) if "sfid" in self.metrics else None
        needs_pool = any(m in self.metrics for m in ("kid", "precision", "recall"))
        self.pool = FeatureStore() if needs_pool else None
        self.logits = FeatureStore() if "is" in self.metrics and "is" not in self.unavailable else None
        self.reference: ReferenceStats | None = None

    def set_reference(self, ref: ReferenceStats) -> None:
        missing = [m for m in self.metrics if m not in ref.available()]
        if missing:
            raise ValueError(
                f"The reference statistics ({ref.meta.get('key') or ref.meta.get('source', '?')}) cannot give {missing}: "
                f"a .npz with only mu/sigma supports fid (+ is); kid/precision/recall need 'features' and sfid "
                f"needs 'spatial_mu'/'spatial_sigma'. Use reference=<split> (computed and cached by diffproc) or "
                f"drop {missing} from the metrics list."
            )
        if ref.mu.shape[0] != self.extractor.num_features:
            raise ValueError(f"Reference features have dimension {ref.mu.shape[0]} but the {self.extractor.name!r} "
                             f"extractor gives {self.extractor.num_features}: the reference was made with another extractor.")
        self.reference = ref
        if self.fid is not None:
            self.fid.set_reference(torch.from_numpy(ref.mu), torch.from_numpy(ref.sigma))
        if self.sfid is not None:
            self.sfid.set_reference(torch.from_numpy(ref.spatial_mu), torch.from_numpy(ref.spatial_sigma))

    @torch.no_grad()
    def update(self, images: Tensor, index: Tensor | None = None) -> dict[str, Tensor]:
        """Add generated images (float [-1,1] or uint8) with their global sample indices."""
        out = self.extractor(images)
        self.update_features(out, index)
        return out

    def update_features(self, out: dict[str, Tensor], index: Tensor | None = None) -> None:
        if index is None:
            n = self.num_samples_local()
            index = torch.arange(n, n + out["pool"].shape[0])
        if self.fid is not None:
            self.fid.update(out["pool"])
        if self.sfid is not None:
            self.sfid.update(out["spatial"])
        if self.pool is not None:
            self.pool.update(out["pool"], index)
        if self.logits is not None:
            self.logits.update(out["logits"], index)
        self._local_n = self.num_samples_local() + out["pool"].shape[0]

    def protocol(self) -> dict:
        """The metrics' own settings, recorded in every metrics row (``metric_params``)."""
        out: dict = {}
        if self.fid is not None or self.sfid is not None:
            out["fd"] = {"dtype": "float64", "sqrt": "eigh of S1^(1/2) S2 S1^(1/2), eigenvalues < D*eps*max as 0"}
        if self.sfid is not None:
            out["sfid_features"] = "mixed_6/conv[:7] (Mixed_6d.branch1x1), 17x17, NHWC flatten, 2023-d"
        if "kid" in self.metrics:
            out["kid"] = {"subsets": self.kid_subsets, "subset_size": self.kid_subset_size, "kernel": "(x.y/d + 1)^3",
                          "subset_seed": 0, "std": "population, over subsets"}
        if self.logits is not None:
            out["is"] = {"splits": self.is_splits, "split_bounds": "i*N//splits (original IS code)", "shuffle": False,
                         "std": "population, over splits"}
        if "precision" in self.metrics or "recall" in self.metrics:
            out["precision_recall"] = {"k": self.pr_k, "points": "min(#generated, #reference features) each side",
                                       "distance": "float64 euclidean (differences)"}
        return out

    def null_results(self) -> dict[str, None]:
        """The result keys of the unavailable metrics, as ``None`` (``null`` in metrics.json)."""
        keys = {"is": ("is_mean", "is_std")}
        return {self.prefix + k: None for m in self.unavailable for k in keys.get(m, (m,))}

    def num_samples_local(self) -> int:
        return getattr(self, "_local_n", 0)

    def compute(self) -> dict[str, float]:
        """Sync states across ranks and compute every metric (call on ALL ranks)."""
        if self.reference is None and any(m != "is" for m in self.metrics):
            raise RuntimeError("MetricSuite: call set_reference() before compute().")
        res: dict[str, float] = {}
        if self.fid is not None:
            res["fid"] = float(self.fid.compute())
        if self.sfid is not None:
            res["sfid"] = float(self.sfid.compute())
        if self.pool is not None:
            fake = self.pool.compute()
            real = torch.from_numpy(self.reference.features).to(fake.device)
            if "kid" in self.metrics:
                res["kid_mean"], res["kid_std"] = kernel_inception_distance(fake, real, self.kid_subsets, self.kid_subset_size)
            if "precision" in self.metrics or "recall" in self.metrics:
                n = min(fake.shape[0], real.shape[0])  # equal sizes: k-NN radii depend on the set size
                p, r = precision_recall(real[:n], fake[:n], self.pr_k)
                if "precision" in self.metrics:
                    res["precision"] = p
                if "recall" in self.metrics:
                    res["recall"] = r
        if self.logits is not None:
            logits = self.logits.compute()
            res["is_mean"], res["is_std"] = inception_score(logits, min(self.is_splits, logits.shape[0]))
        return {self.prefix + k: v for k, v in res.items()}

    def reset(self) -> None:
        for m in (self.fid, self.sfid, self.pool, self.logits):
            if m is not None:
                m.reset()
        self._local_n = 0


InceptionSpatialDim = 7 * 17 * 17
