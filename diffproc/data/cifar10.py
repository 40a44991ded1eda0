"""CIFAR-10 from the official python-pickle release (``cifar-10-batches-py/``): train 50k, test 10k.

The pickles are read directly (the format torchvision's ``CIFAR10`` reads: dicts with ``data`` uint8
``(N, 3072)`` in CHW order and ``labels``), so checksums do not have to match a download and a
read-only copy works. ``download: true`` uses torchvision to fetch and unpack the release into ``root``.
Validation: the test set by default, or with ``val_holdout: N`` the last N training images (taken out
of train).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from diffproc.data.base import ImageDataModule, TensorImageDataset, missing_dataset_error, resize_uint8

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LAYOUT = """<root>/cifar-10-batches-py/
    data_batch_1 ... data_batch_5   (python pickles, 10000 images each)
    test_batch                      (10000 images)
    batches.meta"""


def read_cifar_batches(folder: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 3, 32, 32)`` images and int64 labels from CIFAR-10 pickle batch files."""
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except FileNotFoundError:
            raise
        except Exception as err:
            raise RuntimeError(f"cannot read CIFAR-10 batch {path} ({type(err).__name__}: {err}); the file is "
                               f"corrupt or not a CIFAR-10 python pickle. Re-download cifar-10-python.tar.gz.") from err
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.as_tensor(lab, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 at 32x32 (``image_size`` other than 32 resizes with antialiasing), labels 0..9."""

    name = "cifar10"

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 val_holdout: int = 0, download: bool = False) -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        self.val_holdout, self.download = int(val_holdout), bool(download)
        self.classes = CLASSES
        if self.image_size != 32:
            self.name = f"cifar10_{self.image_size}"

    @property
    def folder(self) -> Path:
        return self.root / "cifar-10-batches-py"

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10(str(self.root), train=True, download=True)

    def _check(self) -> None:
        missing = [f for f in TRAIN_FILES + TEST_FILES if not (self.folder / f).is_file()]
        if missing:
            raise missing_dataset_error(
                "CIFAR-10", self.folder / missing[0], LAYOUT,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack into <root>), "
                "or set download: true (--data.init_args.download true).")

    def build_dataset(self, split: str) -> Dataset:
        if self.download and not self.folder.is_dir():
            self.prepare_data()
        self._check()
        if split == "train" or (split == "val" and self.val_holdout > 0):
            images, labels = read_cifar_batches(self.folder, TRAIN_FILES)
            n = self.val_holdout
            if n >= len(images):
                raise ValueError(f"val_holdout={n} leaves no CIFAR-10 training images")
            sl = slice(len(images) - n, None) if split == "val" else slice(0, len(images) - n)
            images, labels = images[sl], labels[sl]
        else:
            images, labels = read_cifar_batches(self.folder, TEST_FILES)
        if self.image_size != 32:
            images = resize_uint8(images, self.image_size)
        return TensorImageDataset(images.contiguous(), labels)
