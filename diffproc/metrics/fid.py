"""FID / sFID, KID, Inception Score and improved precision/recall on precomputed features.

All metrics are torchmetrics ``Metric`` subclasses: their states are synced across DDP ranks at
``compute()`` (every rank must call it; torchmetrics#2684). The reference (real-data) side is
*not* a state: it is set identically on every rank with ``set_reference``. States that keep
per-sample features also keep each sample's global index and are sorted by it after the sync, so
2 ranks give exactly the numbers 1 rank gives over the same samples (KID subsets and IS splits
depend on the order).
"""

from __future__ import annotations

import math
from typing import Sequence

import scipy.linalg
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------
def _eigh(a: Tensor, vectors: bool = True):
    """Symmetric eigendecomposition. LAPACK's divide-and-conquer driver behind ``torch.linalg.eigh`` can
    fail to converge on rank-deficient covariances with many repeated (zero) eigenvalues (N < D features,
    e.g. sFID's 2023-d spatial features); then the relatively robust ``evr`` driver of scipy is used."""
    try:
        return torch.linalg.eigh(a) if vectors else torch.linalg.eigvalsh(a)
    except torch.linalg.LinAlgError:
        out = scipy.linalg.eigh(a.detach().cpu().numpy(), eigvals_only=not vectors, driver="evr")
        if not vectors:
            return torch.from_numpy(out).to(a)
        return torch.from_numpy(out[0]).to(a), torch.from_numpy(out[1]).to(a)


def _numerical_rank_clip(vals: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix with the ones below ``D * eps * max|lambda|`` set to 0.

    That threshold is LAPACK's rounding level (the standard numerical-rank cut-off): an eigenvalue
    below it is indistinguishable from 0. Without the cut, each of the ``D - rank`` exact zeros of a
    rank-deficient covariance (N < D samples) comes back as +-1e-16*||S|| noise whose square root,
    ~1e-8*||S||^(1/2), adds up over thousands of dimensions to a 1e-5 relative error in FID.
    """
    tol = vals.shape[-1] * torch.finfo(vals.dtype).eps * vals.abs().max()
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def _sqrt_psd(a: Tensor) -> Tensor:
    vals, vecs = _eigh(a)
    return (vecs * _numerical_rank_clip(vals).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance of two Gaussians, ``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    Computed in float64. ``tr((S1 S2)^(1/2))`` is the nuclear norm of ``S2^(1/2) S1^(1/2)``: its
    singular values are the square roots of the eigenvalues of ``S1 S2`` (which equal those of the
    PSD ``S1^(1/2) S2 S1^(1/2)``). No complex arithmetic, no ``offset*I`` retry of pytorch-fid's
    ``scipy.linalg.sqrtm``, and no squared condition number: an SVD finds a small singular value
    to ``eps * ||A||`` absolute, where ``eigvalsh`` of the product would find its square only to
    ``eps * ||A||^2`` and lose every eigenvalue of ``S1 S2`` below ``D * eps`` of the largest (real,
    on ill-conditioned full-rank covariances: 1.7k of 2048 on rank-256 + noise 1e-3 features, a
    7e-6 relative error before this form). The two square roots take eigenvalues of each
    covariance below its numerical-rank cut-off (:func:`_numerical_rank_clip`) as 0, so
    rank-deficient covariances (fewer samples than dimensions, e.g. sFID's 2023-d features) give
    the exact value too. Both cases are tested against pytorch-fid's formula and the exact
    Gram-matrix form in tests/test_metric_agreement.py.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    r1, r2 = _sqrt_psd((s1 + s1.T) / 2), _sqrt_psd((s2 + s2.T) / 2)
    tr_covmean = torch.linalg.svdvals(r2 @ r1).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64), as pytorch-fid's ``np.cov(rowvar=False)``."""
    f = features.double()
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.T @ fc / (f.shape[0] - 1)


def polynomial_mmd(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """Unbiased MMD^2 with the KID kernel ``k(a,b) = (a.b / d + coef0)^degree`` (Bińkowski et al. 2018)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances in float64 from the differences (``sqrt(sum((a_i - b_i)^2))``), not from the
    ``|a|^2 + |b|^2 - 2 a.b`` expansion: no cancellation, and ``d(a, b)`` is bitwise the same number
    wherever the pair occurs, so precision/recall's ``d <= radius`` comparisons (including the ties of
    duplicated points) are decided exactly."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: Tensor, k: int = 3, batch: int = 1024) -> Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (self excluded), float64."""
    out = []
    for i in range(0, features.shape[0], batch):
        d = pairwise_distances(features[i : i + batch], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def manifold_coverage(query: Tensor, support: Tensor, radii: Tensor, batch: int = 1024) -> Tensor:
    """Fraction of ``query`` points inside at least one closed ball ``B(support_j, radii_j)``."""
    inside = []
    radii = radii.double().to(support.device)
    for i in range(0, query.shape[0], batch):
        d = pairwise_distances(query[i : i + batch], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside).double().mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = share of fakes inside
    the real manifold (k-NN balls around reals), recall = share of reals inside the fake manifold.
    Distances in float64 (:func:`pairwise_distances`), so the fractions are exact counts."""
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return float(precision), float(recall)


def kid_subsets(n_fake: int, n_real: int, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """The KID subsets: ``subsets`` pairs ``(fake indices, real indices)`` of ``m = min(subset_size,
    n_fake, n_real)`` each, drawn without replacement by ``randperm`` from ``torch.Generator(seed)``
    (fake first, then real, for each subset)."""
    m = min(subset_size, n_fake, n_real)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n_fake, generator=g)[:m], torch.randperm(n_real, generator=g)[:m]) for _ in range(subsets)]


def kernel_inception_distance(
    fake: Tensor, real: Tensor, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef0: float = 1.0,
    seed: int = 0, subset_indices: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> tuple[float, float]:
    """KID: polynomial MMD^2 averaged over ``subsets`` random subsets of ``subset_size`` (clipped to the
    smaller set) drawn with a fixed ``seed`` (:func:`kid_subsets`); returns (mean, population std).
    ``subset_indices`` gives the ``(fake, real)`` index pairs explicitly instead (e.g. the subsets
    another implementation drew)."""
    fake, real = fake.float(), real.float().to(fake.device)
    if subset_indices is None:
        if min(subset_size, fake.shape[0], real.shape[0]) < 2:
            raise ValueError(f"KID needs at least 2 samples on each side, got {fake.shape[0]} fake, {real.shape[0]} real.")
        subset_indices = kid_subsets(fake.shape[0], real.shape[0], subsets, subset_size, seed)
    vals = torch.stack([
        polynomial_mmd(fake[torch.as_tensor(fi).to(fake.device)], real[torch.as_tensor(ri).to(fake.device)], degree, coef0)
        for fi, ri in subset_indices
    ])
    return float(vals.mean()), float(vals.std(unbiased=False))


def split_bounds(n: int, splits: int) -> list[int]:
    """Boundaries of the Inception Score splits: split ``i`` is ``[i*n//splits, (i+1)*n//splits)``, as
    in the original Inception Score code (Salimans et al. 2016, ``inception_score.py``) and
    torch-fidelity's ``isc``; with ``n`` not divisible by ``splits`` the longer splits are spread out,
    not put first (``torch.tensor_split``/``chunk`` would give other splits and another score)."""
    return [i * n // splits for i in range(splits + 1)]


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and population std over ``splits`` consecutive splits
    (:func:`split_bounds`), in float64, without shuffling (the order is the sample index)."""
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"Inception Score needs 1 <= splits <= number of samples, got {splits} splits of {logits.shape[0]}.")
    logp = torch.log_softmax(logits.double(), dim=1)
    b = split_bounds(logp.shape[0], splits)
    scores = []
    for lo, hi in zip(b[:-1], b[1:]):
        chunk = logp[lo:hi]
        p = chunk.exp()
        logpy = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        scores.append(torch.exp((p * (chunk - logpy)).sum(1).mean()))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(scores) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Metrics (DDP-synced states)
# ---------------------------------------------------------------------------------------------
class FeatureStore(Metric):
    """Keeps every sample's features and global index; ``gathered()`` returns them index-sorted.
    Subclasses that compare against real data read ``ref_features`` (set with :meth:`set_reference`)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("feats", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.ref_features: Tensor | None = None

    def set_reference(self, features: Tensor) -> None:
        """Reference (real-data) features, identical on every rank; not a synced state."""
        self.ref_features = torch.as_tensor(features).float()

    def update(self, features: Tensor, index: Tensor | None = None) -> None:
        if index is None:  # without indices order is arrival order (fine for a single process)
            start = sum(int(t.shape[0]) for t in self.index) if isinstance(self.index, list) else 0
            index = torch.arange(start, start + features.shape[0])
        self.feats.append(features.detach().float())
        self.index.append(index.to(features.device, torch.long))

    def gathered(self) -> Tensor:
        """Local (or, inside ``compute``/``sync_context``, all ranks') features sorted by index."""
        feats, index = dim_zero_cat(self.feats), dim_zero_cat(self.index)
        return feats[torch.argsort(index)]

    def compute(self) -> Tensor:
        """All ranks' features, sorted by global sample index (synced)."""
        return self.gathered()


class FrechetDistance(Metric):
    """FID-type metric: running float64 sums of the fake features against a fixed reference
    ``(mu, sigma)``. Used for FID (pooled features) and sFID (spatial features)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.num_features = num_features
        self.add_state("sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cov_sum", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.ref_mu: Tensor | None = None
        self.ref_sigma: Tensor | None = None

    def set_reference(self, mu: Tensor, sigma: Tensor) -> None:
        self.ref_mu = torch.as_tensor(mu, dtype=torch.float64)
        self.ref_sigma = torch.as_tensor(sigma, dtype=torch.float64)

    def update(self, features: Tensor, index: Tensor | None = None) -> None:
        f = features.double()
        self.sum += f.sum(0)
        self.cov_sum += f.T @ f
        self.n += f.shape[0]

    def fake_stats(self) -> tuple[Tensor, Tensor]:
        n = int(self.n)
        if n < 2:
            raise ValueError(f"FID needs at least 2 generated samples, got {n}.")
        mu = self.sum / n
        sigma = (self.cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def compute(self) -> Tensor:
        if self.ref_mu is None:
            raise RuntimeError("FrechetDistance: call set_reference(mu, sigma) before compute().")
        mu, sigma = self.fake_stats()
        return torch.tensor(frechet_distance(mu.cpu(), sigma.cpu(), self.ref_mu, self.ref_sigma), dtype=torch.float64)


class KernelDistance(FeatureStore):
    """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets (mean, std).

    Subsets are drawn with a fixed seed over the index-sorted samples, so results do not depend on
    the number of ranks. ``subset_size`` is clipped to the smaller set.
    """

    higher_is_better = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef0: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.subsets, self.subset_size, self.degree, self.coef0, self.seed = subsets, subset_size, degree, coef0, seed

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.ref_features is None:
            raise RuntimeError("KernelDistance: call set_reference(features) before compute().")
        mean, std = kernel_inception_distance(
            self.gathered(), self.ref_features, self.subsets, self.subset_size, self.degree, self.coef0, self.seed
        )
        return torch.tensor(mean), torch.tensor(std)


class PrecisionRecall(FeatureStore):
    """Improved precision/recall (Kynkäänniemi et al. 2019, k=3) against reference features.

    With ``balance=True`` (default) both sides use the same number of points,
    ``n = min(#fake, #real)``: the first ``n`` generated samples by index and the first ``n``
    reference features (stored in random order), since k-NN radii shrink with the set size and
    unequal sizes bias precision against recall.
    """

    higher_is_better = True

    def __init__(self, k: int = 3, balance: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.k, self.balance = k, balance

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.ref_features is None:
            raise RuntimeError("PrecisionRecall: call set_reference(features) before compute().")
        fake = self.gathered()
        real = self.ref_features.to(fake.device)
        if self.balance:
            n = min(fake.shape[0], real.shape[0])
            fake, real = fake[:n], real[:n]
        if min(fake.shape[0], real.shape[0]) <= self.k:
            raise ValueError(f"precision/recall with k={self.k} needs more than {self.k} samples on each side.")
        p, r = precision_recall(real, fake, self.k)
        return torch.tensor(p), torch.tensor(r)


class InceptionScore(FeatureStore):
    """Inception Score on classifier logits (mean, std over ``splits`` chunks of index-sorted
    samples). With the ``shapes`` extractor it is an IS-like score on the shapes classifier."""

    higher_is_better = True

    def __init__(self, splits: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.splits = splits

    def compute(self) -> tuple[Tensor, Tensor]:
        logits = self.gathered()
        mean, std = inception_score(logits, min(self.splits, logits.shape[0]))
        return torch.tensor(mean), torch.tensor(std)
