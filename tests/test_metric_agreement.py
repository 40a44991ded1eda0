"""Agreement of diffproc.metrics with the reference implementations (issue 18).

Each test names its reference, its tolerance and prints the measured figure (``pytest -s`` shows them;
they are also in the assertion messages). docs/metrics.md's table lists them. Every comparison has an
independent in-test reference written from the published formula; the packages themselves
(pytorch-fid, a dev dependency; torch-fidelity and torchmetrics, which torchmetrics[image] installs) are compared
as well.

Inputs: synthetic features (full rank, rank-deficient with N > D, and N < D) and real images of the
embedded ``shapes`` dataset through the offline ``shapes`` extractor; the Inception path runs on an
Inception weights file in the published format whose weights are random (no real weights offline).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from diffproc.metrics.features import INCEPTION_FILE, ShapesExtractor
from diffproc.metrics.fid import (
    FrechetDistance,
    inception_score,
    kernel_inception_distance,
    mean_cov,
    precision_recall,
    split_bounds,
)
from diffproc.metrics.reference import compute_reference
from diffproc.metrics.suite import MetricSuite


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def is_err(ours: tuple[float, float], ref: tuple[float, float]) -> float:
    """Inception Score disagreement: max of the mean's and the std's difference, both relative to the reference
    mean (the std is on the mean's scale and can be exactly 0, e.g. one sample per split)."""
    return max(abs(ours[0] - ref[0]), abs(ours[1] - ref[1])) / abs(ref[0])


# ------------------------------------------------------------------------------------------------
# independent references, from the published formulas
# ------------------------------------------------------------------------------------------------
def fd_sqrtm(mu1, s1, mu2, s2, eps: float = 1e-6) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` (Heusel et al. 2017 via pytorch-fid 0.3): scipy ``sqrtm``
    of ``S1 S2``, ``eps*I`` retry when not finite, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fd_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Fréchet distance of the two sample Gaussians for any N (also N < D): with
    ``S1 = A A^T``, ``S2 = B B^T`` (``A = Xc^T / sqrt(n1-1)``), ``eig(S1 S2) \\ {0} = eig((B^T A)^T (B^T A))``, so
    ``tr (S1 S2)^(1/2)`` is the nuclear norm of ``Yc Xc^T / sqrt((n1-1)(n2-1))``, an n2 x n1 SVD without
    any square root of a singular matrix."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuc = np.linalg.svd(yc @ xc.T, compute_uv=False).sum() / math.sqrt((len(x) - 1) * (len(y) - 1))
    d = x.mean(0) - y.mean(0)
    return float(d @ d + (xc**2).sum() / (len(x) - 1) + (yc**2).sum() / (len(y) - 1) - 2 * nuc)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the KID kernel k(a, b) = (a.b/d + 1)^3 (Bińkowski et al. 2018, eq. 3 / their
    ``polynomial_mmd``): off-diagonal means of K_xx and K_yy minus twice the mean of K_xy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + coef0) ** degree  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def is_original(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """The original Inception Score code (Salimans et al. 2016, openai/improved-gan inception_score/model.py)
    on softmax(logits): split i = preds[i*N//splits : (i+1)*N//splits]; mean and np.std of exp(mean KL)."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) by brute force in numpy float64: radius of a point
    = distance to its k-th nearest other point of its set; a query counts when it lies in at least one
    closed ball. Returns the exact fractions count / n."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(s):
        return np.concatenate([np.sort(dist(s[i:i + 64], s), axis=1)[:, k] for i in range(0, len(s), 64)])

    def coverage(q, s, r):
        hits = sum(int((dist(q[i:i + 64], s) <= r[None, :]).any(1).sum()) for i in range(0, len(q), 64))
        return hits / len(q)

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def synthetic(d: int, n1: int, n2: int, rank: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32-valued features (as extractors give), correlated, the second set shifted and scaled;
    ``rank`` < d makes both covariances rank-deficient whatever N."""
    rng = np.random.default_rng(seed)
    r = rank or d
    a = rng.standard_normal((r, d)) / math.sqrt(d)
    x = rng.standard_normal((n1, r)) @ a
    y = rng.standard_normal((n2, r)) @ (1.3 * a) + 0.2
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def shapes_features():
    """Shapes-extractor features (128-d pool, 6 logits) of real train and test images of the embedded dataset."""
    from diffproc.data.shapes import SPLIT_START, generate_shapes

    ex = ShapesExtractor()
    train, _ = generate_shapes(400, 32, start=SPLIT_START["train"])
    test, _ = generate_shapes(400, 16, start=SPLIT_START["test"])  # 16 px: resized to 32 like generated images
    a, b = ex(train), ex(test)
    return {"train": a["pool"].double().numpy(), "test": b["pool"].double().numpy(),
            "train_logits": a["logits"].double().numpy(), "test_logits": b["logits"].double().numpy()}


def _ours_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The metric as FID and sFID use it: reference (mu, sigma) + streaming float64 sums of the generated side."""
    m = FrechetDistance(x.shape[1])
    m.set_reference(*mean_cov(torch.from_numpy(x)))
    for chunk in torch.from_numpy(y).float().split(97):
        m.update(chunk)
    return float(m.compute())


# ------------------------------------------------------------------------------------------------
# FID / sFID vs the pytorch-fid formula
# ------------------------------------------------------------------------------------------------
FD_CASES = {  # name: (D, n1, n2, rank, tolerance vs pytorch-fid's sqrtm formula)
    "full_rank_64d": (64, 1000, 800, None, 1e-9),
    "rank10_of_64d_N>D": (64, 1000, 800, 10, 1e-5),
    "N<D_256d": (256, 100, 120, None, 1e-5),
    "N<D_128d_40_vs_300": (128, 40, 300, None, 1e-5),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_frechet_distance_vs_pytorch_fid_formula(case):
    """Tolerance: 1e-9 relative vs scipy ``sqrtm`` (pytorch-fid's formula) on full-rank covariances, 1e-5 where a
    covariance is singular (sqrtm of a singular matrix is itself that inaccurate: compare its error vs the exact
    Gram form); 1e-10 relative vs the exact Gram-matrix form in every case."""
    d, n1, n2, rank, tol = FD_CASES[case]
    x, y = synthetic(d, n1, n2, rank)
    ours = _ours_fd(x, y)
    (m1, s1), (m2, s2) = (mean_cov(torch.from_numpy(v)) for v in (x, y))
    ref = fd_sqrtm(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    exact = fd_gram(x, y)
    print(f"\nFD {case}: ours {ours:.12g}  sqrtm {ref:.12g} (rel {rel(ours, ref):.1e}, tol {tol:.0e})  "
          f"exact {exact:.12g} (rel {rel(ours, exact):.1e}, tol 1e-10; sqrtm vs exact {rel(ref, exact):.1e})")
    assert rel(ours, ref) <= tol, f"FD {case}: rel diff vs sqrtm formula {rel(ours, ref):.2e} > {tol:.0e}"
    assert rel(ours, exact) <= 1e-10, f"FD {case}: rel diff vs exact Gram form {rel(ours, exact):.2e} > 1e-10"


@pytest.mark.parametrize("case", list(FD_CASES))
def test_frechet_distance_vs_pytorch_fid_package(case):
    """The same cases against the pytorch-fid package itself (a dev dependency); same tolerances."""
    import pytorch_fid.fid_score as pfid
    d, n1, n2, rank, tol = FD_CASES[case]
    x, y = synthetic(d, n1, n2, rank)
    ours = _ours_fd(x, y)
    (m1, s1), (m2, s2) = (mean_cov(torch.from_numpy(v)) for v in (x, y))
    pkg = float(pfid.calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy()))
    print(f"FD {case}: pytorch_fid.calculate_frechet_distance {pkg:.12g} (rel {rel(ours, pkg):.1e}, tol {tol:.0e})")
    assert rel(ours, pkg) <= tol, f"FD {case}: rel diff vs pytorch-fid {rel(ours, pkg):.2e} > {tol:.0e}"


def ill_conditioned(d: int, n1: int, n2: int, rank: int, noise_std: float, dead: int, seed: int = 0):
    """Full-rank but ill-conditioned features, like real Inception features: a rank-``rank`` signal plus
    isotropic noise of std ``noise_std`` (N > D, so both covariances are full rank apart from ``dead``
    dimensions that are constant 0, like ReLU features that never fire)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, d)) / math.sqrt(rank)
    x = rng.standard_normal((n1, rank)) @ a + noise_std * rng.standard_normal((n1, d))
    y = rng.standard_normal((n2, rank)) @ (1.3 * a) + 0.2 + noise_std * rng.standard_normal((n2, d))
    x[:, :dead] = 0
    y[:, :dead] = 0
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("d, n1, n2, rank", [pytest.param(512, 800, 700, 64, id="512d"),
                                             pytest.param(2048, 3000, 2500, 256, id="2048d", marks=pytest.mark.slow)])
def test_frechet_distance_on_ill_conditioned_full_rank_covariances(d, n1, n2, rank):
    """Most eigenvalues of S1 S2 lie below 1e-12 of the largest (noise^2 against signal^2) and are real: a cut at
    the rounding level of ``eigvalsh(S1^1/2 S2 S1^1/2)`` drops them (7e-6 relative before the nuclear-norm form).
    <= 1e-6 relative to pytorch-fid's sqrtm formula (which itself is only ~4e-9 from the truth here) and <= 1e-10
    to the exact Gram-matrix form."""
    x, y = ill_conditioned(d, n1, n2, rank, noise_std=1e-3, dead=d // 64)
    (m1, s1), (m2, s2) = (mean_cov(torch.from_numpy(v)) for v in (x, y))
    w, v = np.linalg.eigh(s1.numpy())
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    small = np.linalg.eigvalsh(r1 @ s2.numpy() @ r1)
    n_small = int((small < 1e-12 * small.max()).sum())
    assert n_small > d // 2, f"the case is not ill-conditioned: {n_small} of {d} eigenvalues below 1e-12 of the max"
    ours = _ours_fd(x, y)
    ref = fd_sqrtm(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    exact = fd_gram(x, y)
    print(f"\nFD ill-conditioned {d}d ({n_small} eigenvalues of S1 S2 below 1e-12 of the max): ours {ours:.12g}  "
          f"sqrtm {ref:.12g} (rel {rel(ours, ref):.1e}, tol 1e-6)  exact {exact:.12g} (rel {rel(ours, exact):.1e}, tol 1e-10)")
    assert rel(ours, ref) <= 1e-6
    assert rel(ours, exact) <= 1e-10
    import pytorch_fid.fid_score as pfid

    pkg = float(pfid.calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy()))
    assert rel(ours, pkg) <= 1e-6, f"vs pytorch-fid {pkg:.12g}: rel {rel(ours, pkg):.2e}"


@pytest.mark.parametrize("n", [400, 60])
def test_fid_on_shapes_images_vs_pytorch_fid_formula(shapes_features, n):
    """Real train vs test images of the embedded dataset through the shapes extractor, via MetricSuite
    (reference stats from compute_reference). n=400 > D=128 (full rank): tolerance 1e-9 vs sqrtm; n=60 < D:
    1e-5 vs sqrtm. Always 1e-10 vs the exact Gram form."""
    from diffproc.data.shapes import SPLIT_START, generate_shapes

    ex = ShapesExtractor()
    train, _ = generate_shapes(n, 32, start=SPLIT_START["train"])
    test, _ = generate_shapes(n, 16, start=SPLIT_START["test"])
    ref = compute_reference([train[i:i + 128] for i in range(0, n, 128)], ex, total=n, progress=False)
    suite = MetricSuite(ex, ["fid"])
    suite.set_reference(ref)
    for i in range(0, n, 50):
        suite.update(test[i:i + 50])
    ours = suite.compute()["shapes_fid"]
    x, y = shapes_features["train"][:n], shapes_features["test"][:n]
    assert np.array_equal(ref.mu, x.mean(0)) or np.allclose(ref.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    (m1, s1), (m2, s2) = (mean_cov(torch.from_numpy(v)) for v in (x, y))
    sq = fd_sqrtm(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    exact = fd_gram(x, y)
    tol = 1e-9 if n > x.shape[1] else 1e-5
    print(f"\nshapes FID n={n}: ours {ours:.12g}  sqrtm rel {rel(ours, sq):.1e} (tol {tol:.0e})  "
          f"exact rel {rel(ours, exact):.1e} (tol 1e-10)")
    assert rel(ours, sq) <= tol, f"shapes FID n={n}: rel diff vs sqrtm formula {rel(ours, sq):.2e} > {tol:.0e}"
    assert rel(ours, exact) <= 1e-10, f"shapes FID n={n}: rel diff vs exact {rel(ours, exact):.2e} > 1e-10"


# ------------------------------------------------------------------------------------------------
# KID vs torchmetrics on the same subsets
# ------------------------------------------------------------------------------------------------
def _torchmetrics_kid(fake: np.ndarray, real: np.ndarray, subsets: int, subset_size: int, seed: int):
    """torchmetrics' KernelInceptionDistance on the features themselves (an identity 'extractor', float64), and
    the subsets it draws: it calls randperm(real) then randperm(fake) per subset on the global RNG."""
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=subset_size)
    kid.update(torch.from_numpy(real), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(seed)
    mean, std = kid.compute()
    torch.manual_seed(seed)
    drawn = []
    for _ in range(subsets):
        r = torch.randperm(len(real))[:subset_size]
        f = torch.randperm(len(fake))[:subset_size]
        drawn.append((f, r))
    return float(mean), float(std), drawn


@pytest.mark.parametrize("source", ["synthetic", "shapes"])
def test_kid_vs_torchmetrics_same_subsets(shapes_features, source):
    """Tolerance: 1e-10 relative on the mean and the std over subsets, vs torchmetrics' KID and vs the in-test
    unbiased-MMD reference, on the subsets torchmetrics drew (both in float64)."""
    if source == "synthetic":
        fake, real = synthetic(32, 300, 350, seed=3)
    else:
        fake, real = shapes_features["test"], shapes_features["train"]
    subsets, m = 20, 100
    tm_mean, tm_std, drawn = _torchmetrics_kid(fake, real, subsets, m, seed=7)
    ours_mean, ours_std = kernel_inception_distance(torch.from_numpy(fake), torch.from_numpy(real), subset_indices=drawn)
    vals = [mmd2_unbiased(fake[f.numpy()], real[r.numpy()]) for f, r in drawn]
    ref_mean, ref_std = float(np.mean(vals)), float(np.std(vals))
    e = max(rel(ours_mean, tm_mean), rel(ours_std, tm_std))
    e_ref = max(rel(ours_mean, ref_mean), rel(ours_std, ref_std))
    print(f"\nKID {source}: ours {ours_mean:.10g} ± {ours_std:.4g}  torchmetrics {tm_mean:.10g} ± {tm_std:.4g} "
          f"(rel {e:.1e}, tol 1e-10)  reference rel {e_ref:.1e}")
    assert e <= 1e-10, f"KID {source}: rel diff vs torchmetrics {e:.2e} > 1e-10"
    assert e_ref <= 1e-10, f"KID {source}: rel diff vs in-test MMD reference {e_ref:.2e} > 1e-10"
    # the default path (its own seeded subsets) agrees with the reference on those subsets too
    from diffproc.metrics.fid import kid_subsets

    own = kid_subsets(len(fake), len(real), subsets, m, seed=0)
    d_mean, _ = kernel_inception_distance(torch.from_numpy(fake), torch.from_numpy(real), subsets, m, seed=0)
    assert rel(d_mean, float(np.mean([mmd2_unbiased(fake[f.numpy()], real[r.numpy()]) for f, r in own]))) <= 1e-10


# ------------------------------------------------------------------------------------------------
# Inception Score vs torch-fidelity's isc
# ------------------------------------------------------------------------------------------------
IS_CASES = [(100, 10), (25, 10), (37, 10), (1003, 10), (50, 7), (9, 4), (10, 10)]


def _is_logits(n: int, splits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 31 + splits)
    return torch.randn(n, 20, generator=g, dtype=torch.float64) * 3 + torch.randn(1, 20, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n,splits", IS_CASES)
def test_inception_score_vs_original_code_any_n(n, splits):
    """Tolerance 1e-12 (mean and std, relative to the mean) vs the original IS code (in-test port), for N
    divisible by the splits or not: the split boundaries are i*N//splits."""
    logits = _is_logits(n, splits)
    ours = inception_score(logits, splits)
    ref = is_original(logits.numpy(), splits)
    e = is_err(ours, ref)
    print(f"\nIS N={n} splits={splits}: ours {ours[0]:.12g} ± {ours[1]:.6g}  original {ref[0]:.12g} ± {ref[1]:.6g} "
          f"(rel {e:.1e}, tol 1e-12)")
    assert e <= 1e-12, f"IS N={n} splits={splits}: rel diff vs original code {e:.2e} > 1e-12"
    assert split_bounds(n, splits) == [i * n // splits for i in range(splits + 1)]


@pytest.mark.parametrize("n,splits", IS_CASES)
def test_inception_score_vs_torch_fidelity_any_n(n, splits):
    """Tolerance 1e-12 (mean and std, relative to the mean) vs torch-fidelity's ``isc_features_to_metric``
    (no shuffle; torch-fidelity's default shuffles with seed 2020, the original code does not)."""
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = _is_logits(n, splits)
    ours = inception_score(logits, splits)
    tf = isc.isc_features_to_metric(logits, splits=splits, shuffle=False)
    tf = (tf["inception_score_mean"], tf["inception_score_std"])
    e_tf = is_err(ours, tf)
    print(f"IS N={n} splits={splits}: torch-fidelity isc {tf[0]:.12g} ± {tf[1]:.6g} (rel {e_tf:.1e}, tol 1e-12)")
    assert e_tf <= 1e-12, f"IS N={n} splits={splits}: rel diff vs torch-fidelity {e_tf:.2e} > 1e-12"


def test_inception_score_splits_are_the_original_ones_not_tensor_split():
    """Sensitivity check: with N=25 and 10 splits, splitting like torch.tensor_split (3,3,3,3,3,2,2,2,2,2) gives
    another score; ours uses 2,3,2,3,... like the original code."""
    assert [b - a for a, b in zip(split_bounds(25, 10)[:-1], split_bounds(25, 10)[1:])] == [2, 3] * 5
    logits = torch.randn(25, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    logp = torch.log_softmax(logits, 1)
    chunked = []
    for c in torch.tensor_split(logp, 10):
        logpy = torch.logsumexp(c, 0) - math.log(c.shape[0])
        chunked.append(float(torch.exp((c.exp() * (c - logpy)).sum(1).mean())))
    assert abs(np.mean(chunked) - inception_score(logits, 10)[0]) > 1e-6


def test_inception_score_on_shapes_logits(shapes_features):
    """Real test images through the shapes classifier (an IS-like score on 6 classes), N=400 and 397 (not
    divisible by 10): tolerance 1e-12 relative to the mean vs the original code."""
    for n in (400, 397):
        logits = torch.from_numpy(shapes_features["test_logits"][:n])
        ours = inception_score(logits, 10)
        ref = is_original(logits.numpy(), 10)
        e = is_err(ours, ref)
        print(f"\nIS shapes N={n}: ours {ours[0]:.12g} ± {ours[1]:.6g} (rel vs original {e:.1e}, tol 1e-12)")
        assert e <= 1e-12, f"IS shapes N={n}: rel diff {e:.2e} > 1e-12"


def test_inception_score_on_shapes_logits_vs_torch_fidelity(shapes_features):
    """The same against torch-fidelity's isc (no shuffle): tolerance 1e-12 relative to the mean."""
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    for n in (400, 397):
        logits = torch.from_numpy(shapes_features["test_logits"][:n])
        ours = inception_score(logits, 10)
        tf = isc.isc_features_to_metric(logits, splits=10, shuffle=False)
        e_tf = is_err(ours, (tf["inception_score_mean"], tf["inception_score_std"]))
        print(f"IS shapes N={n}: torch-fidelity isc rel {e_tf:.1e} (tol 1e-12)")
        assert e_tf <= 1e-12, f"IS shapes N={n}: rel diff vs torch-fidelity {e_tf:.2e} > 1e-12"


# ------------------------------------------------------------------------------------------------
# precision / recall vs an independent k-NN implementation
# ------------------------------------------------------------------------------------------------
def test_precision_recall_exactly_equal_to_knn_reference(shapes_features):
    """Exact equality of the fractions (tolerance 0) vs a numpy brute-force k-NN (k=3) on: synthetic Gaussians,
    integer-lattice features (many exact distance ties: the closed-ball rule must be applied identically),
    a fake set that contains copies of real points, and real shapes train vs test features."""
    rng = np.random.default_rng(5)
    cases = {
        "gaussian": (rng.standard_normal((300, 16)), rng.standard_normal((250, 16)) * 1.3 + 0.3),
        "lattice_ties": (rng.integers(0, 4, (200, 3)).astype(np.float64), rng.integers(0, 5, (220, 3)).astype(np.float64)),
        "duplicates": None,
        "shapes": (shapes_features["train"], shapes_features["test"]),
    }
    real = rng.standard_normal((150, 8))
    cases["duplicates"] = (real, np.concatenate([real[:60], rng.standard_normal((90, 8)) * 1.2]))
    for name, (r, f) in cases.items():
        ours = precision_recall(torch.from_numpy(r).float(), torch.from_numpy(f).float())
        ref = knn_precision_recall(np.float32(r), np.float32(f))
        print(f"\nprecision/recall {name}: ours {ours}  k-NN reference {ref} (tolerance: exact)")
        assert ours == ref, f"precision/recall {name}: {ours} != reference {ref}"
        assert 0.0 < ours[0] <= 1.0 and 0.0 < ours[1] <= 1.0


# ------------------------------------------------------------------------------------------------
# the Inception path: diffproc FID == torchmetrics FrechetInceptionDistance on a random-weights file
# ------------------------------------------------------------------------------------------------
def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """An Inception weights file in the published format (torch-fidelity's FeatureExtractorInceptionV3
    ``state_dict`` saved with ``torch.save``) with random weights: He-normal convolutions, BatchNorm with unit
    running variance and near-identity affine, so activations keep their scale through the 94 layers."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("bn.weight"):
            v = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.bias") or k == "fc.bias":
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_mean"):
            v = torch.zeros_like(v)
        elif k.endswith("running_var"):
            v = torch.ones_like(v)
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1])
        sd[k] = v
    path = path / INCEPTION_FILE
    torch.save(sd, path)
    return path


def test_inception_fid_equals_torchmetrics_with_random_weights_file(tmp_path):
    """diffproc's Inception FID (compute_reference on the real images + MetricSuite on the generated ones) vs
    torchmetrics' FrechetInceptionDistance(feature=2048, antialias=False) given the same weights file and the
    same uint8 images: 10 real shapes images vs 10 uniform-noise images. Tolerance 1e-6 relative. The pool
    features must be equal to rounding (same resize, same uint8 input, same layer). With N=10 < D=2048 both
    covariances have rank 9; torchmetrics' eigvals(S1 S2) turns the 2039 zero eigenvalues into rounding
    noise (its own error vs the exact Gram form is printed); the noise images make the distance large
    against that noise. sFID (2023-d spatial features, N < D) is checked against the exact Gram form
    (1e-10; pytorch-fid's formula at 2023 d is too slow for the default suite and covered at 256 d above)."""
    pytest.importorskip("torch_fidelity")
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    from diffproc.data.shapes import SPLIT_START, generate_shapes
    from diffproc.metrics.features import InceptionExtractor

    weights = random_inception_weights(tmp_path)
    real, _ = generate_shapes(10, 32, start=SPLIT_START["train"])
    fake = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    ex = InceptionExtractor(weights, download=False)
    seen = {}
    ex.register_forward_hook(lambda m, i, o: seen.setdefault("ours", []).append({k: v.clone() for k, v in o.items()}))
    ref = compute_reference([real], ex, total=10, progress=False)
    suite = MetricSuite(ex, ["fid", "sfid"])
    suite.set_reference(ref)
    suite.update(fake)
    ours = suite.compute()

    fid = tm_fid.FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), antialias=False)
    fid.inception.register_forward_hook(lambda m, i, o: seen.setdefault("tm", []).append(o.clone()))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    theirs = float(fid.compute())

    (o_real, o_fake), (t_real, t_fake) = seen["ours"], seen["tm"]
    # same resize, uint8 input and layer; ours runs the convolutions channels-last (1.4x on CPU), so the sums
    # are reordered: equal to rounding, not bitwise
    for o, t in ((o_real["pool"], t_real), (o_fake["pool"], t_fake)):
        err = float(((o.double() - t.double()).abs().amax(1) / t.double().abs().amax(1)).max())
        assert err <= 1e-5, f"pool features differ: max rel {err:.2e}"
    exact = fd_gram(o_real["pool"].double().numpy(), o_fake["pool"].double().numpy())  # on our features
    tm_exact = fd_gram(t_real.double().numpy(), t_fake.double().numpy())
    e = rel(ours["fid"], theirs)
    print(f"\nInception FID (random weights, 10 vs 10): diffproc {ours['fid']:.10g}  torchmetrics {theirs:.10g} "
          f"(rel {e:.1e}, tol 1e-6)  exact {exact:.10g} (diffproc rel {rel(ours['fid'], exact):.1e}; "
          f"torchmetrics rel {rel(theirs, tm_exact):.1e} to the exact value on its features)")
    assert e <= 1e-6, f"Inception FID: rel diff vs torchmetrics {e:.2e} > 1e-6"
    assert rel(ours["fid"], exact) <= 1e-10
    s_exact = fd_gram(o_real["spatial"].double().numpy(), o_fake["spatial"].double().numpy())
    print(f"Inception sFID (2023-d, 10 vs 10): diffproc {ours['sfid']:.10g}  exact {s_exact:.10g} "
          f"(rel {rel(ours['sfid'], s_exact):.1e}, tol 1e-10)")
    assert rel(ours["sfid"], s_exact) <= 1e-10, f"sFID: rel diff vs exact {rel(ours['sfid'], s_exact):.2e} > 1e-10"
