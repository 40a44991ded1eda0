"""Tests for diffproc.data: the embedded shapes dataset and the DataModules on real on-disk formats.

Every file-based DataModule reads a tiny fixture written here in its dataset's native format.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffproc.data.base import CorruptImageError, DatasetNotFoundError, ImageDataModule
from diffproc.data.shapes import SHAPE_CLASSES, ShapesDataModule, generate_shapes


def _check_batch(x: torch.Tensor, y: torch.Tensor, n: int, size: int) -> None:
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------

def test_shapes_deterministic_and_subset_consistent():
    a, la = generate_shapes(20, 16, seed=3)
    b, lb = generate_shapes(20, 16, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 16, 16) and la.dtype == torch.int64
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, lc = generate_shapes(5, 16, seed=3, start=10)
    assert torch.equal(c, a[10:15]) and torch.equal(lc, la[10:15])
    d, _ = generate_shapes(20, 16, seed=4)
    assert (d != a).flatten(1).any(1).all()  # every image differs under another seed


def test_shapes_labels_cover_all_classes():
    _, labels = generate_shapes(600, 8)
    assert labels.min() == 0 and labels.max() == len(SHAPE_CLASSES) - 1
    counts = torch.bincount(labels, minlength=len(SHAPE_CLASSES)).float()
    assert counts.min() > 0.6 * counts.mean()  # roughly balanced


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_shapes_sharp_edges_and_colourful(size):
    x, _ = generate_shapes(300, size)
    xi = x.int()
    dx = (xi[..., 1:] - xi[..., :-1]).abs().amax(1)
    dy = (xi[..., 1:, :] - xi[..., :-1, :]).abs().amax(1)
    d = torch.cat([dx.flatten(), dy.flatten()]).float()
    assert (d == 0).float().mean() > 0.4       # flat regions (solid backgrounds, shape interiors)
    assert (d >= 100).float().mean() > 0.01    # hard shape edges, no antialiasing ramps
    # every image has a saturated palette colour somewhere (max - min channel >= 150 at some pixel)
    sat = (xi.amax(1) - xi.amin(1)).flatten(1).amax(1)
    white = (xi.amin(1) >= 245).flatten(1).any(1)
    assert ((sat >= 150) | white).all()


def test_shapes_main_shape_covers_a_good_part():
    """The main shape's palette colour covers 5-65 % of the image (median > 15 %)."""
    x, _ = generate_shapes(100, 32)
    from diffproc.data.shapes import PALETTE
    pal = torch.tensor(PALETTE, dtype=torch.int32)
    px = x.int().permute(0, 2, 3, 1).reshape(100, -1, 1, 3)
    is_pal = (px == pal).all(-1)  # (100, HW, 8)
    frac = is_pal.float().mean(1).amax(1)
    assert frac.min() > 0.05 and frac.max() < 0.65 and frac.median() > 0.15


def test_shapes_fast():
    import time
    t = time.perf_counter()
    generate_shapes(2000, 32)
    assert time.perf_counter() - t < 5.0  # 10k images take ~2.5 s on one core


def test_shapes_datamodule_splits_and_loaders():
    dm = ShapesDataModule(image_size=16, batch_size=8, eval_batch_size=5, num_train=40, num_val=12, num_test=7)
    assert isinstance(dm, ImageDataModule) and dm.name == "shapes" and dm.channels == 3 and dm.image_size == 16
    dm.setup("fit")
    tr = dm.train_dataloader()
    batches = list(tr)
    assert len(batches) == 10  # 40 images and their 40 mirror images, batches of 8 (drop_last)
    _check_batch(*batches[0], 8, 16)
    val = list(dm.val_dataloader())
    assert [b[0].shape[0] for b in val] == [5, 5, 2]
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 7
    # splits are disjoint index ranges: no val image equals a train image
    train = dm.dataset("train").images.flatten(1)
    v = dm.dataset("val").images.flatten(1)
    assert not (train[:, None] == v[None]).all(-1).any()
    # the val loader is not flipped and matches the generator exactly
    ref, _ = generate_shapes(12, 16, start=1_000_000_000)
    got = torch.cat([b[0] for b in val])
    assert torch.allclose(got, ref.float() / 127.5 - 1)


def test_train_epoch_shows_each_image_in_both_orientations_in_seeded_order(monkeypatch):
    """random_flip = EDM's xflip: an epoch is every image once as is and once mirrored, shuffled by
    (seed, epoch) only — the same order in a new process, a new order each epoch (issue 16)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = ShapesDataModule(image_size=16, batch_size=8, num_train=24)
    ref = dm.dataset("train").images.float() / 127.5 - 1
    expected = torch.cat([ref, ref.flip(-1)])

    def epoch(loader, e):
        loader.sampler.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    first = epoch(dm.train_dataloader(), 0)
    assert first.shape == expected.shape
    # a permutation of the originals and their mirror images
    match = (first.flatten(1)[:, None] == expected.flatten(1)[None]).all(-1)
    assert (match.sum(0) >= 1).all() and (match.sum(1) >= 1).all()
    assert not torch.equal(first, expected)  # shuffled
    again = ShapesDataModule(image_size=16, batch_size=8, num_train=24)
    assert torch.equal(epoch(again.train_dataloader(), 0), first)  # seed and epoch fix the order
    assert not torch.equal(epoch(again.train_dataloader(), 1), first)
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not torch.equal(epoch(ShapesDataModule(image_size=16, batch_size=8, num_train=24).train_dataloader(), 0),
                           first)


@pytest.mark.parametrize("stop", [3, 6], ids=["mid-epoch", "end-of-epoch"])
def test_train_loader_state_resumes_the_order(monkeypatch, stop):
    """The training loader's state (what Lightning puts in checkpoints) continues the batch sequence of an
    uninterrupted loader: mid-epoch with the next batch, after an epoch's last batch with the next epoch."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")

    def loader():
        return ShapesDataModule(image_size=8, batch_size=4, num_train=12).train_dataloader()  # 6 batches/epoch

    def run(dl, epochs, start_epoch=0, state_after=None):
        out, state = [], None
        for e in range(start_epoch, epochs):
            dl.sampler.set_epoch(e)
            for x, _ in dl:
                out.append(x)
                if len(out) == state_after:
                    state = dl.state_dict()
        return out, state

    straight, state = run(loader(), 3, state_after=stop)
    assert state["sampler_epoch"] == 0
    resumed = loader()
    resumed.load_state_dict(state)  # Lightning: load, then iterate (before it calls set_epoch)
    rest = list(x for x, _ in resumed)
    if stop == 6:
        assert len(rest) == 6  # a fresh iterator over epoch 1
    following = rest + run(resumed, 3, start_epoch=2 if stop == 6 else 1)[0]
    assert len(following) == len(straight) - stop
    assert all(torch.equal(a, b) for a, b in zip(following, straight[stop:]))


def test_real_images_helper():
    dm = ShapesDataModule(image_size=8, num_train=30)
    batches = list(dm.real_images("train", num=25, batch_size=10))
    assert [b.shape[0] for b in batches] == [10, 10, 5]
    ref, _ = generate_shapes(25, 8)
    assert torch.allclose(torch.cat(batches), ref.float() / 127.5 - 1)


# --------------------------------------------------------------------------------------------------
# fixtures in the datasets' native on-disk formats
# --------------------------------------------------------------------------------------------------

def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish random RGB image (compresses well, survives JPEG)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def write(name, n, offset):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(offset, offset + n)  # R channel, pixel (0, 0) = global index
        entry = {"batch_label": name, "labels": [(offset + i) % 10 for i in range(n)], "data": data,
                 "filenames": [f"img_{offset + i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for b in range(5):
        write(f"data_batch_{b + 1}", 4, 4 * b)
    write("test_batch", 6, 100)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane"] * 10, "num_cases_per_batch": 4, "num_vis": 3072}, f, protocol=2)
    return tmp_path


def test_cifar10_reads_pickles(cifar_root):
    from diffproc.data.cifar10 import CIFAR10DataModule
    dm = CIFAR10DataModule(root=str(cifar_root), batch_size=4)
    assert dm.name == "cifar10" and dm.image_size == 32
    dm.setup("fit")
    assert len(dm.dataset("train")) == 20 and len(dm.dataset("val")) == 6  # val = test set by default
    x, y = next(iter(dm.val_dataloader()))
    _check_batch(x, y, 4, 32)
    # pixel (0,0) red channel carries the global index; labels as written; CHW order preserved
    assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), torch.arange(100, 104))
    assert torch.equal(y, torch.arange(100, 104) % 10)
    train = dm.dataset("train")
    assert torch.equal(train.labels, torch.arange(20) % 10)
    held = CIFAR10DataModule(root=str(cifar_root), val_holdout=5)
    assert len(held.dataset("train")) == 15 and len(held.dataset("val")) == 5
    assert torch.equal(held.dataset("val").labels, torch.arange(15, 20) % 10)
    assert len(held.dataset("test")) == 6
    small = CIFAR10DataModule(root=str(cifar_root), image_size=16)
    assert small.dataset("test")[0][0].shape == (3, 16, 16) and small.name == "cifar10_16"


def test_cifar10_errors(cifar_root, tmp_path_factory):
    from diffproc.data.cifar10 import CIFAR10DataModule
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetNotFoundError) as e:
        CIFAR10DataModule(root=str(empty)).setup("fit")
    msg = str(e.value)
    assert str(empty / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "cifar-10-python.tar.gz" in msg and "download: true" in msg and "data_batch_5" in msg
    (cifar_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="test_batch"):
        CIFAR10DataModule(root=str(cifar_root)).setup("test")


def test_root_defaults_to_env(monkeypatch, cifar_root):
    from diffproc.data.cifar10 import CIFAR10DataModule
    monkeypatch.setenv("DIFFPROC_DATA", str(cifar_root))
    assert CIFAR10DataModule().root == cifar_root
    monkeypatch.delenv("DIFFPROC_DATA")
    assert CIFAR10DataModule().root == Path("./data")


def _celeba_face() -> np.ndarray:
    """178x218 image: black outside the DDIM box, white inside, a red top-left quadrant marker in the
    box, a green band just above the box (rows 40:57) that the DDIM crop must exclude."""
    img = np.zeros((218, 178, 3), np.uint8)
    img[57:185, 25:153] = 255
    img[57:121, 25:89] = (255, 0, 0)
    img[40:57, 25:153] = (0, 255, 0)
    return img


@pytest.fixture
def celeba_root(tmp_path) -> Path:
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    codes = [0, 0, 0, 0, 1, 2, 2]
    lines = []
    for i, code in enumerate(codes, 1):
        name = f"{i:06d}.jpg"
        arr = _celeba_face() if i == 1 else _rgb(218, 178, i)
        (folder / name).write_bytes(_encode(arr, "JPEG", quality=98))
        lines.append(f"{name} {code}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_celeba_splits_and_ddim_crop(celeba_root):
    from diffproc.data.celeba import CelebADataModule
    dm = CelebADataModule(root=str(celeba_root), image_size=32, batch_size=2)
    assert dm.name == "celeba32_ddim"
    dm.setup(None)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [4, 1, 2]
    x, y = next(iter(dm.test_dataloader()))
    _check_batch(x, y, 2, 32)
    assert (y == -1).all()
    img, _ = dm.dataset("train")[0]  # 000001.jpg, the marker face; box 128 px -> 32 px (factor 4)
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    white = torch.ones(3, 1, 1)
    tol = 0.2
    assert (img[:, 1:15, 1:15] - red).abs().max() < tol           # top-left quadrant of the box -> red
    assert (img[:, 1:15, 17:31] - white).abs().max() < tol        # top-right -> white
    assert (img[:, 17:31, 1:31] - white).abs().max() < tol        # bottom half -> white
    assert (img[1] > 0.5).logical_and(img[0] < -0.5).sum() == 0   # no green: the band above is outside


def test_celeba_center140_crop(celeba_root):
    from diffproc.data.celeba import CelebADataModule
    dm = CelebADataModule(root=str(celeba_root), image_size=28, crop="center140")  # 140 px -> 28 (factor 5)
    assert dm.name == "celeba28_center140"
    img, _ = dm.dataset("train")[0]
    # rows 39:179 / cols 19:159: row 0 = original rows 39..43 (black then green), rows 1..2 green band
    # (original rows 44..53), left columns 0..0 black (cols 19..23 < 25), box starts at col (25-19)/5 = 1.2
    assert img[1, 2, 10] > 0.8 and img[0, 2, 10] < -0.8           # green
    assert img[:, 12, 0].max() < -0.8                             # black margin left of the box
    assert (img[:, 25, 12:20] - 1).abs().max() < 0.2              # white lower box
    assert img[0, 8, 8] > 0.8 and img[1, 8, 8] < -0.8             # red quadrant


def test_celeba_missing_and_corrupt(celeba_root, tmp_path_factory):
    from diffproc.data.celeba import CelebADataModule
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetNotFoundError) as e:
        CelebADataModule(root=str(empty)).setup("fit")
    msg = str(e.value)
    assert "img_align_celeba" in msg and "list_eval_partition.txt" in msg and str(empty) in msg
    bad = celeba_root / "celeba" / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    dm = CelebADataModule(root=str(celeba_root), image_size=16)
    with pytest.raises(CorruptImageError, match="000003.jpg"):
        [dm.dataset("train")[i] for i in range(4)]
    skip = CelebADataModule(root=str(celeba_root), image_size=16, on_corrupt="skip", batch_size=4, random_flip=False)
    with pytest.warns(UserWarning, match="000003.jpg"):
        items = [skip.dataset("train")[i] for i in range(4)]
    assert all(img.shape == (3, 16, 16) for img, _ in items)
    assert torch.equal(items[2][0], items[3][0])  # the unreadable one was replaced by the next image
    assert skip.num_skipped("train") == 1
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        skip.teardown("fit")


@pytest.fixture
def afhq_root(tmp_path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("cat", "dog", "wild")):
            d = tmp_path / "afhq" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
                (d / f"flickr_{cls}_{i:06d}.{ext}").write_bytes(_encode(_rgb(40, 40, 10 * c + i), fmt))
    return tmp_path


def test_afhq_classes_and_splits(afhq_root):
    from diffproc.data.afhq import AFHQDataModule
    cat = AFHQDataModule(root=str(afhq_root), image_size=16, classes=["cat"], batch_size=3)
    assert cat.name == "afhq16_cat"
    cat.setup("fit")
    assert len(cat.dataset("train")) == 3 and len(cat.dataset("val")) == 2
    x, y = next(iter(cat.train_dataloader()))
    _check_batch(x, y, 3, 16)
    assert (y == 0).all()
    full = AFHQDataModule(root=str(afhq_root), image_size=16)
    tr = full.dataset("train")
    assert len(tr) == 9 and sorted(tr.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(full.dataset("test")) == 6
    assert all("/dog/" in f for f, lab in zip(tr.files, tr.labels) if lab == 1)
    with pytest.raises(ValueError, match="classes"):
        AFHQDataModule(root=str(afhq_root), classes=["horse"])


def test_afhq_missing(tmp_path):
    from diffproc.data.afhq import AFHQDataModule
    (tmp_path / "afhq" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as e:
        AFHQDataModule(root=str(tmp_path), classes=["cat"]).setup("fit")
    assert str(tmp_path / "afhq" / "train" / "cat") in str(e.value) and "stargan-v2" in str(e.value)


def test_image_folder_formats_and_deterministic_split(tmp_path):
    from diffproc.data.folder import ImageFolderDataModule
    files = []
    for i in range(30):
        sub = tmp_path / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("JPEG", "JPEG")][i % 5]
        arr = _rgb(24, 36, i)  # non-square: resize shorter side to 12, center crop
        (sub / f"im{i:02d}.{ext}").write_bytes(_encode(arr, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        files.append(sub / f"im{i:02d}.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    gray = tmp_path / "gray.png"  # grayscale + palette images become RGB
    Image.fromarray(np.full((12, 12), 77, np.uint8), "L").save(gray)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=12, val_fraction=0.1, test_fraction=0.2,
                               batch_size=4)
    dm.setup(None)
    splits = {s: dm.dataset(s).files for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 4, 7]  # 31 files: ceil(3.1)=4, ceil(6.2)=7
    assert sorted(sum(splits.values(), [])) == sorted(str(f) for f in files + [gray])
    again = ImageFolderDataModule(root=str(tmp_path), image_size=12, val_fraction=0.1, test_fraction=0.2)
    assert again.dataset("val").files == splits["val"]
    x, y = next(iter(dm.train_dataloader()))
    _check_batch(x, y, 4, 12)
    ds = dm.dataset("train") if str(gray) in splits["train"] else \
        (dm.dataset("val") if str(gray) in splits["val"] else dm.dataset("test"))
    g = ds[ds.files.index(str(gray))][0]
    assert g.shape == (3, 12, 12) and torch.allclose(g, torch.full_like(g, 77 / 127.5 - 1))
    # a lossless (PNG) non-square image is center-cropped: compare with PIL directly
    png = next(f for f in files if f.suffix == ".png")
    ref = Image.open(png).convert("RGB").resize((18, 12), Image.BICUBIC, reducing_gap=2.0).crop((3, 0, 15, 12))
    ds = next(dm.dataset(s) for s in ("train", "val", "test") if str(png) in dm.dataset(s).files)
    got = ds[ds.files.index(str(png))][0]
    assert torch.allclose(got, torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1)
    no_test = ImageFolderDataModule(root=str(tmp_path), val_fraction=0.1)
    assert no_test.dataset("test").files == no_test.dataset("val").files


def test_image_folder_class_subdirs_and_missing(tmp_path):
    from diffproc.data.folder import ImageFolderDataModule
    for cls in ("zebra", "ant"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(_encode(_rgb(8, 8, i), "PNG"))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0.0, class_subdirs=True)
    tr = dm.dataset("train")
    assert dm.classes == ("ant", "zebra") and len(tr) == 6
    assert [lab for f, lab in zip(tr.files, tr.labels)] == [0 if "/ant/" in f else 1 for f in tr.files]
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(root=str(tmp_path / "nope")).setup("fit")


# --------------------------------------------------------------------------------------------------
# LSUN: a real lmdb database (key -> encoded image bytes)
# --------------------------------------------------------------------------------------------------

def _write_lmdb(path: Path, images: list[bytes]) -> list[bytes]:
    import hashlib

    import lmdb
    env = lmdb.open(str(path), map_size=1 << 26)
    keys = []
    with env.begin(write=True) as txn:
        for i, data in enumerate(images):
            key = hashlib.sha1(str(i).encode()).hexdigest().encode()
            txn.put(key, data)
            keys.append(key)
    env.close()
    return sorted(keys)


def _lsun_image(i: int) -> np.ndarray:
    """48x64 (H x W): a blue 8-px band at each side (cropped away at 48x48), a colour per i inside."""
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[:, :8] = arr[:, 56:] = (0, 0, 255)
    arr[:, 8:56] = (20 * i % 256, 200, 30)
    return arr


@pytest.fixture
def lsun_root(tmp_path) -> Path:
    (tmp_path / "lsun").mkdir()
    _write_lmdb(tmp_path / "lsun" / "church_outdoor_train_lmdb",
                [_encode(_lsun_image(i), "WEBP", lossless=True) for i in range(10)])
    _write_lmdb(tmp_path / "lsun" / "church_outdoor_val_lmdb",
                [_encode(_lsun_image(i), "JPEG", quality=95) for i in range(3)])
    return tmp_path


def test_lsun_reads_lmdb_with_two_workers(lsun_root):
    from diffproc.data.lsun import LSUNDataModule
    dm = LSUNDataModule(root=str(lsun_root), image_size=48, batch_size=4, num_workers=2, persistent_workers=False)
    assert dm.name == "lsun_church_outdoor48"
    dm.setup("fit")
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("val")) == 3
    dm.dataset("train")[0]  # the main process holds a handle too: workers must still open theirs
    batches = list(dm.train_dataloader())
    assert len(batches) == 5  # (10 images + 10 mirror images) // 4, drop_last
    for x, y in batches:
        _check_batch(x, y, 4, 48)
        assert (y == -1).all()
        # center crop 48 of the 64-wide image: the blue side bands (8 px each side) are cut off
        assert (x[:, 1] > 0.5).all() and (x[:, 2] < -0.5).all()
    x, _ = next(iter(dm.val_dataloader()))  # JPEG values in the val db
    assert x.shape == (3, 3, 48, 48) and (x[:, 1, :, 3:-3] > 0.4).all()  # JPEG chroma bleeds at the cut
    assert pickle.loads(pickle.dumps(dm.dataset("train"))).keys.tolist() == dm.dataset("train").keys.tolist()
    small = LSUNDataModule(root=str(lsun_root), image_size=16)  # a second dataset on the same db
    img, _ = small.dataset("train")[0]
    # 64x48 -> 21x16, crop cols 2:18; the band (cols < 2.67) only touches the outermost column
    assert img.shape == (3, 16, 16) and img[2, :, 1:-1].max() < -0.5 and img[2, :, 0].min() > -0.5


def test_lsun_corrupt_record_and_missing(lsun_root, tmp_path_factory, monkeypatch):
    import lmdb

    from diffproc.data.lsun import LSUNDataModule
    path = lsun_root / "lsun" / "church_outdoor_train_lmdb"
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        first = next(iter(txn.cursor().iternext(values=False)))
        txn.put(first, b"\x00garbage, not an image")
    env.close()
    dm = LSUNDataModule(root=str(lsun_root), image_size=16)
    with pytest.raises(CorruptImageError) as e:
        dm.dataset("train")[0]
    assert str(path) in str(e.value) and first.decode() in str(e.value)
    skip = LSUNDataModule(root=str(lsun_root), image_size=16, on_corrupt="skip")
    with pytest.warns(UserWarning, match=first.decode()):
        imgs = [skip.dataset("train")[i][0] for i in range(10)]
    assert skip.num_skipped("train") == 1 and torch.equal(imgs[0], imgs[1])
    # skips in DataLoader workers are counted in the main process (process-shared counter)
    skip2 = LSUNDataModule(root=str(lsun_root), image_size=16, on_corrupt="skip", num_workers=2, batch_size=5,
                           persistent_workers=False)
    assert sum(x.shape[0] for x, _ in skip2.train_dataloader()) == 20  # each image and its mirror image
    assert skip2.num_skipped("train") == 2  # the bad record was read for both orientations

    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DatasetNotFoundError) as e:
        LSUNDataModule(root=str(empty), category="bedroom").setup("fit")
    assert "bedroom_train_lmdb" in str(e.value) and "download.py" in str(e.value)
    monkeypatch.setattr("diffproc.data.lsun.lmdb", None)  # as without the lsun extra
    with pytest.raises(ImportError, match=r"pip install diffproc\[lsun\]"):
        LSUNDataModule(root=str(lsun_root)).setup("fit")


def test_lazy_package_attributes():
    import diffproc.data as D
    assert D.ShapesDataModule is ShapesDataModule
    from diffproc.data.lsun import LSUNDataModule
    assert D.LSUNDataModule is LSUNDataModule
    with pytest.raises(AttributeError):
        D.NoSuchModule  # noqa: B018
