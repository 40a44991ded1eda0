"""LSUN scene categories from the official lmdb folders ``<category>_train_lmdb`` / ``<category>_val_lmdb``.

Each database maps an image id (key) to encoded image bytes (WebP in the official release; JPEG/PNG
also decode). Images are resized so the shorter side is ``image_size`` (bicubic, antialiased) and
center-cropped (the DDPM/ADM convention). Splits: train = ``_train_lmdb``; val and test = ``_val_lmdb``
(300 images per category). Labels -1.

lmdb is an optional extra (``pip install diffproc[lsun]``). Databases are opened ``readonly=True,
lock=False`` (read-only data folders work) lazily in each process that reads them — DataLoader workers
and DDP ranks each open their own handle; a handle is never pickled. The key list is read once in
``build_dataset`` (a few seconds for the 3M-image bedroom set) and shared with workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from diffproc.data.base import (CorruptImageError, ImageDataModule, OnCorrupt, SkippingDataset, decode_image,
                                missing_dataset_error, pil_to_tensor, resize_shorter_center_crop)

try:  # the optional extra ``lsun``: without it the module imports, and reading LSUN says what to install (_lmdb)
    import lmdb
    _LMDB_MISSING: ImportError | None = None
except ImportError as err:
    lmdb = None
    _LMDB_MISSING = err

LAYOUT = """<root>/lsun/                     (or <root>/ directly)
    <category>_train_lmdb/data.mdb      e.g. church_outdoor_train_lmdb/, bedroom_train_lmdb/
    <category>_val_lmdb/data.mdb"""


def _lmdb():
    if lmdb is None:
        raise ImportError("LSUN needs the lmdb package: pip install diffproc[lsun]  (or: pip install lmdb)") \
            from _LMDB_MISSING
    return lmdb


_ENVS: dict[str, object] = {}  # this process's open handles, by database path


def _close_envs() -> None:
    """Close every handle before ``fork``: lmdb handles must not cross a fork (py-lmdb even refuses to
    reopen a database in a child whose parent holds it open). Handles reopen lazily on next use."""
    while _ENVS:
        _ENVS.popitem()[1].close()  # type: ignore[attr-defined]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_envs)


def open_lmdb(path: str | os.PathLike):
    """This process's read-only, lock-free handle on ``path`` (safe on read-only folders).

    One handle per database and process: lmdb forbids opening an environment twice in one process; every
    DataLoader worker / DDP rank opens its own, and handles are closed before any fork.
    """
    key = os.path.realpath(path)
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = _lmdb().open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                                        max_readers=1024)
    return env


def read_lmdb_keys(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """All keys of an lmdb database (sorted, as lmdb stores them) as a numpy bytes array."""
    keys = []
    with open_lmdb(path).begin(write=False) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            keys.append(bytes(key))
            if limit is not None and len(keys) >= limit:
                break
    return np.array(keys, dtype=object)


class LMDBImageDataset(SkippingDataset):
    """Images stored as encoded bytes in an lmdb database; it holds only the path and the keys (cheap to
    pickle to workers), the handle comes from :func:`open_lmdb` in whichever process reads."""

    def __init__(self, path: str | os.PathLike, keys: np.ndarray, image_size: int,
                 on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(on_corrupt)
        self.path, self.keys, self.image_size = str(path), keys, int(image_size)

    def __len__(self) -> int:
        return len(self.keys)

    def _txn_get(self, key: bytes) -> bytes | None:
        with open_lmdb(self.path).begin(write=False, buffers=False) as txn:  # handle looked up per call
            return txn.get(key)

    def load(self, i: int) -> tuple[Tensor, int]:
        key = self.keys[i]
        name = f"{self.path} key {key.decode(errors='replace')}"
        buf = self._txn_get(key)
        if buf is None:
            raise CorruptImageError(f"cannot decode image {name} (record missing)", path=name)
        img = decode_image(bytes(buf), name=name)
        return pil_to_tensor(resize_shorter_center_crop(img, self.image_size)), -1


class LSUNDataModule(ImageDataModule):
    """LSUN ``category`` (``church_outdoor``, ``bedroom``, ``tower``, ...), 64x64 or larger in the papers.

    ``max_images`` keeps the first N training keys (e.g. a subset of the 3M bedrooms); ``None`` = all.
    """

    def __init__(self, root: str | None = None, image_size: int = 64, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 category: str = "church_outdoor", max_images: int | None = None,
                 on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        self.category, self.max_images, self.on_corrupt = category, max_images, on_corrupt
        self.name = f"lsun_{category}{self.image_size}"

    def lmdb_path(self, split: str) -> Path:
        sub = "train" if split == "train" else "val"
        folder = f"{self.category}_{sub}_lmdb"
        for cand in (self.root / "lsun" / folder, self.root / folder):
            if cand.is_dir():
                return cand
        return self.root / "lsun" / folder

    def build_dataset(self, split: str) -> Dataset:
        path = self.lmdb_path(split)
        if not (path / "data.mdb").is_file():
            raise missing_dataset_error(
                f"LSUN {self.category}", path, LAYOUT,
                f"{self.category}_train_lmdb.zip / {self.category}_val_lmdb.zip with LSUN's download.py "
                f"(https://github.com/fyu/lsun: python download.py -c {self.category}); unzip into <root>/lsun/.")
        _lmdb()
        keys = read_lmdb_keys(path, self.max_images if split == "train" else None)
        if len(keys) == 0:
            raise ValueError(f"LSUN database {path} is empty")
        return LMDBImageDataset(path, keys, self.image_size, self.on_corrupt)
