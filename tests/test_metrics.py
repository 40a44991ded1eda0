"""Tests of diffproc.metrics (issue 5): closed forms, extractors, reference statistics, DDP sharding, and
``benchmarks/compare.py``'s seed blocks. The metric callbacks (``diffproc.callbacks.metrics``) are tested in
``tests/test_callbacks.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from diffproc.metrics.features import INCEPTION_FILE, INCEPTION_URL, ShapesExtractor, build_extractor, images_to_uint8
from diffproc.metrics.fid import (
    FrechetDistance,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    mean_cov,
    precision_recall,
)
from diffproc.metrics.reference import ReferenceStats, compute_reference, load_or_compute_reference
from diffproc.metrics.suite import MetricSuite


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: pytorch-fid's formula with numpy moments and scipy.linalg.sqrtm."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------
def test_frechet_self_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g) @ torch.randn(32, 32, generator=g)
    mu, sigma = mean_cov(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * float(torch.trace(sigma))


@pytest.mark.parametrize("shift,scale", [(0.5, 1.0), (0.0, 1.7), (2.0, 0.3)])
def test_frechet_matches_scipy_on_shifted_scaled_features(shift, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 24, generator=g) @ (0.4 * torch.randn(24, 24, generator=g))
    a = torch.eye(24) * scale + 0.1 * torch.randn(24, 24, generator=g)
    y = x @ a + shift
    metric = FrechetDistance(24)
    mu, sigma = mean_cov(x)
    metric.set_reference(mu, sigma)
    for chunk in y.split(128):  # streaming float64 sums
        metric.update(chunk)
    ours = float(metric.compute())
    ref = scipy_fd(x.double().numpy(), y.double().numpy())
    assert ours == pytest.approx(ref, rel=1e-4)
    assert ref > 1.0


def test_frechet_diagonal_gaussians_analytic():
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expect = float(((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())  # 5 + 4 + 1 + 0
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expect, rel=1e-10)


def test_frechet_falls_back_when_eigh_fails(monkeypatch):
    """Rank-deficient covariances (N < D) can make LAPACK's eigh fail to converge; the scipy 'evr'
    fallback then gives the same distance."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 40, generator=g).double(), torch.randn(6, 40, generator=g).double() + 0.3
    (m1, s1), (m2, s2) = mean_cov(x), mean_cov(y)
    expect = frechet_distance(m1, s1, m2, s2)

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    monkeypatch.setattr(torch.linalg, "eigvalsh", fail)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-7)


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(s):
        d = np.linalg.norm(s[:, None] - s[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def cover(q, s, r):
        return float(np.mean([any(np.linalg.norm(qi - sj) <= rj for sj, rj in zip(s, r)) for qi in q]))

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_sanity_and_brute_force():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    half = torch.cat([real[:150], torch.randn(150, 8, generator=g) + 100.0])
    assert precision_recall(real, half)[0] == 0.5
    r2, f2 = torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g) * 1.5 + 0.5
    ours = precision_recall(r2, f2)
    assert ours == pytest.approx(brute_precision_recall(r2.numpy(), f2.numpy()), abs=1e-12)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0
    assert torch.allclose(knn_radii(r2, 3, batch=7), knn_radii(r2, 3))


def test_kid_matches_torchmetrics_poly_mmd_and_separates():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g) + 0.5
    ours, _ = kernel_inception_distance(x, y, subsets=1, subset_size=200)  # full sets: order-free
    assert ours == pytest.approx(float(poly_mmd(x.double(), y.double())), rel=1e-9)
    same = kernel_inception_distance(x, torch.randn(200, 16, generator=g), subsets=20, subset_size=100)
    shifted = kernel_inception_distance(x, y, subsets=20, subset_size=100)
    assert abs(same[0]) < 0.05 < shifted[0]


def test_inception_score_closed_forms():
    assert inception_score(torch.zeros(100, 10), splits=5)[0] == pytest.approx(1.0)
    confident = torch.full((100, 10), -1e4)
    confident[torch.arange(100), torch.arange(100) % 10] = 0.0
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_uint8_rounding_not_truncation():
    x = torch.tensor([-1.0, 1.0, 0.0, 2 * 100.6 / 255 - 1])
    assert images_to_uint8(x.view(1, 1, 1, 4)).flatten().tolist() == [0, 255, 128, 101]


# ------------------------------------------------------------------------------------------------
# extractors
# ------------------------------------------------------------------------------------------------
def test_inception_offline_error_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        build_extractor("inception")
    msg = str(err.value)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    for part in (INCEPTION_FILE, INCEPTION_URL, str(hub), "feature_extractor_weights_path"):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_extractor("inception", tmp_path / "nope.pth")


def test_shapes_extractor_metrics_train_vs_test_vs_noise():
    from diffproc.data.shapes import SPLIT_START, generate_shapes

    ex = build_extractor("shapes")
    assert ex.num_features == 128
    info = json.loads(Path(ex.weights_path).with_suffix(".json").read_text())
    assert info["test_accuracy"] > 0.95
    train, _ = generate_shapes(600, 32, start=SPLIT_START["train"])
    test, labels = generate_shapes(600, 32, start=SPLIT_START["test"])
    out = ex(test)
    assert (out["logits"].argmax(1) == labels).float().mean() > 0.95
    ref = compute_reference([train[i:i + 200] for i in range(0, 600, 200)], ex, total=600, progress=False)
    noise = torch.randint(0, 256, (600, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run(images):
        suite = MetricSuite(ex, ["fid", "kid", "is", "precision", "recall"], kid_subset_size=300)
        suite.set_reference(ref)
        for i in range(0, 600, 200):
            suite.update(images[i:i + 200])
        return suite.compute()

    real, fake = run(test), run(noise)
    print("shapes metrics test-vs-train:", real, "\nnoise-vs-train:", fake)
    assert set(real) == {"shapes_fid", "shapes_kid_mean", "shapes_kid_std", "shapes_is_mean", "shapes_is_std",
                         "shapes_precision", "shapes_recall"}
    assert real["shapes_fid"] * 20 < fake["shapes_fid"]
    assert real["shapes_kid_mean"] * 20 < fake["shapes_kid_mean"]
    assert real["shapes_precision"] > 0.6 and real["shapes_recall"] > 0.6
    assert fake["shapes_precision"] < 0.05 and fake["shapes_recall"] < 0.05
    assert real["shapes_is_mean"] > 4.0  # 6 balanced, well-classified shape kinds
    # other sizes are resized to 32 px: 64 px test images still match the 32 px train reference
    big, _ = generate_shapes(600, 64, start=SPLIT_START["test"])
    assert run(big)["shapes_fid"] < fake["shapes_fid"] / 5


def test_inception_extractor_plumbing_with_random_weights(tmp_path, monkeypatch):
    """No real weights offline: check shapes, the sFID hook (mixed_6/conv = Mixed_6d.branch1x1, first 7
    channels, NHWC flatten) and unprefixed keys on a randomly initialised network."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffproc.metrics.features import InceptionExtractor
    from diffproc.metrics.suite import InceptionSpatialDim

    fake = tmp_path / INCEPTION_FILE
    fake.write_bytes(b"x")
    monkeypatch.setattr(torch, "load", lambda *a, **k: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    ex = InceptionExtractor(fake)
    monkeypatch.undo()
    grabbed = {}
    ex.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.setdefault("o", o))
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = ex(images)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    assert out["spatial"].shape == (3, InceptionSpatialDim) and grabbed["o"].shape == (3, 192, 17, 17)
    torch.testing.assert_close(out["spatial"], grabbed["o"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    # logits are the unbiased ones (pool @ W^T, no bias), as in the original IS code
    torch.testing.assert_close(out["logits"], out["pool"] @ ex.net.fc.weight.T, rtol=1e-4, atol=1e-4)
    ref = ReferenceStats(*mean_cov(out["pool"]), features=out["pool"].numpy(),
                         spatial_mu=out["spatial"].double().mean(0).numpy(),
                         spatial_sigma=np.cov(out["spatial"].double().numpy(), rowvar=False))
    ref.mu, ref.sigma = ref.mu.numpy(), ref.sigma.numpy()
    suite = MetricSuite(ex, ["fid", "sfid", "is"])
    suite.set_reference(ref)
    suite.update_features(out)
    res = suite.compute()
    assert set(res) == {"fid", "sfid", "is_mean", "is_std"} and abs(res["fid"]) < 1e-4 and abs(res["sfid"]) < 1e-4


# ------------------------------------------------------------------------------------------------
# reference statistics
# ------------------------------------------------------------------------------------------------
def test_reference_npz_roundtrip_cache_and_mu_sigma_only(tmp_path):
    from diffproc.data.shapes import ShapesDataModule

    dm = ShapesDataModule(image_size=16, num_train=300, num_val=8, num_test=8)
    ex = ShapesExtractor()
    ref, key = load_or_compute_reference(dm, "train", ex, cache_dir=tmp_path, num_features_kept=100, progress=False)
    path = tmp_path / f"{key}.npz"
    assert path.is_file() and key.startswith("shapes_train_16px_shapes-")
    with np.load(path) as f:  # pytorch-fid reads exactly these
        assert f["mu"].shape == (128,) and f["sigma"].shape == (128, 128) and f["features"].shape == (100, 128)
    feats = torch.cat([ex(b)["pool"] for b in dm.real_images("train", batch_size=100)]).double().numpy()
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-8)
    mtime = path.stat().st_mtime_ns
    again, key2 = load_or_compute_reference(dm, "train", ex, cache_dir=tmp_path, compute=False)
    assert key2 == key and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.features, ref.features)
    # a foreign mu/sigma-only file: fid (and is) work, kid/precision/recall refuse clearly
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=ref.mu, sigma=ref.sigma)
    loaded, ident = load_or_compute_reference(dm, str(bare), ex)
    assert loaded.available() == {"fid", "is"} and ident.startswith("file:")
    MetricSuite(ex, ["fid", "is"]).set_reference(loaded)
    with pytest.raises(ValueError, match="kid"):
        MetricSuite(ex, ["fid", "kid"]).set_reference(loaded)


# ------------------------------------------------------------------------------------------------
# DDP: 2 ranks == 1 rank over the same samples
# ------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = _suite_on_shards(rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _suite_on_shards(rank: int, world: int) -> dict:
    from diffproc.data.shapes import SPLIT_START, generate_shapes

    ex = ShapesExtractor()
    train, _ = generate_shapes(256, 16, start=SPLIT_START["train"])
    ref = compute_reference([train], ex, total=256, progress=False)
    test, _ = generate_shapes(160, 16, start=SPLIT_START["test"])
    suite = MetricSuite(ex, ["fid", "kid", "is", "precision", "recall"], kid_subsets=10, kid_subset_size=64, is_splits=4)
    suite.set_reference(ref)
    bs = 24  # uneven: 7 batches of 24 over 160 samples -> ranks get 4 and 3 batches
    for b, s in enumerate(range(0, 160, bs)):
        if b % world == rank:
            suite.update(test[s:s + bs], torch.arange(s, min(s + bs, 160)))
    return suite.compute()


def test_ddp_two_ranks_equal_one_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    one = _suite_on_shards(0, 1)
    assert set(two) == set(one)
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k


# ------------------------------------------------------------------------------------------------
# benchmarks/compare.py: seed blocks (the evaluation path, with a stand-in model; no training)
# ------------------------------------------------------------------------------------------------
class _BlendModel(torch.nn.Module):
    """Stand-in for a trained DiffusionModule: sample i = train image blended with noise drawn from (seed, i)."""

    def __init__(self, dm):
        super().__init__()
        from types import SimpleNamespace

        from diffproc.samplers import SamplingSpec

        self.sampling = SamplingSpec(solver="ddim", num_steps=2)
        self.unet = torch.nn.Linear(1, 1)
        self.process = SimpleNamespace(solvers=("ddim",), default_solver="ddim", timesteps=lambda n: torch.arange(11))
        self.pool = dm.dataset("train").images[:64].float() / 127.5 - 1

    def sample(self, num, spec, progress=True, use_ema=True, indices=None, **kw):
        from diffproc.processes.rng import PerSampleGenerator, rand
        from diffproc.samplers import SampleResult

        g = PerSampleGenerator(spec.seed, indices)
        idx = (rand((num,), g) * 64).long()
        x = (0.7 * self.pool[idx] + 0.3 * (rand((num, 3, 16, 16), g) * 2 - 1)).clamp(-1, 1)
        return SampleResult(sample=x, nfe=spec.num_steps, images=x)


def test_compare_seed_blocks_rows_and_table(tmp_path, monkeypatch):
    """``compare.py --seeds 0 24``: each row is measured on both blocks (block s = samples s..s+23 of --seed),
    carries them, their mean (top level), std (ddof=1) and min; a block equals a one-block run at that seed;
    results.md shows mean ± std and the minimum FID."""
    import benchmarks.compare as compare
    import benchmarks.nfe_sweep as nfe_sweep
    from diffproc.data.shapes import ShapesDataModule

    monkeypatch.setenv("DIFFPROC_CACHE", str(tmp_path / "cache"))
    dm = ShapesDataModule(image_size=16, num_train=96, num_val=8, num_test=8)
    monkeypatch.setattr(nfe_sweep, "load", lambda config, ckpt, overrides: (_BlendModel(dm), dm))
    monkeypatch.setattr(compare, "checkpoint_step", lambda ckpt: 5)

    def rows_for(*seeds):
        argv = ["--steps", "5", "--out", str(tmp_path / "out"), "--nfe", "2", "--num-samples", "24",
                "--eval-batch-size", "10", "--device", "cpu", "--extractor", "shapes", "--reference-num", "96"]
        args = compare.parse_args(argv + (["--seeds", *map(str, seeds)] if seeds else []))
        rows, _ = compare.evaluate(args, ["blend"], {})
        return args, rows

    args, (multi,) = rows_for(0, 24)
    assert args.seeds == [0, 24] and [b["seed"] for b in multi["blocks"]] == [0, 24] and multi["seeds"] == [0, 24]
    a, b = multi["blocks"]
    assert a["fid"] != b["fid"]
    assert multi["fid"] == pytest.approx((a["fid"] + b["fid"]) / 2)
    assert multi["std"]["fid"] == pytest.approx(abs(a["fid"] - b["fid"]) / 2 ** 0.5)
    assert multi["min"]["fid"] == min(a["fid"], b["fid"])
    _, (one,) = rows_for()  # default: one block [0], the rows compare.py wrote before --seeds existed
    _, (second,) = rows_for(24)
    assert "std" not in one and one["seeds"] == [0] and one["fid"] == pytest.approx(a["fid"], rel=1e-12)
    assert second["fid"] == pytest.approx(b["fid"], rel=1e-12) and second["precision"] == b["precision"]
    table = compare.results_table([multi], {}).splitlines()
    assert "FID (mean ± std, 2 seed blocks)" in table[0] and "FID min" in table[0]
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[4] == f"{multi['fid']:.3f} ± {multi['std']['fid']:.3f}" and cells[5] == f"{multi['min']['fid']:.3f}"
    single = [c.strip() for c in compare.results_table([one], {}).splitlines()[2].split("|")[1:-1]]
    assert single[4] == f"{one['fid']:.3f}"
    compare.plot_metrics([multi, one], tmp_path / "fid_vs_nfe.png")  # error bars from the blocks' std
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # overlapping blocks
        compare.parse_args(["--steps", "1", "--out", str(tmp_path), "--num-samples", "24", "--seeds", "0", "10"])
