"""Any folder tree of images (recursive; jpg/jpeg/png/webp/bmp, case-insensitive) for users' own data.

``root`` is the folder itself. Files are resized (shorter side, bicubic, antialiased) and center-cropped
to ``image_size``. Splits are deterministic: files are ordered by a hash of their path relative to
``root`` (CRC32, ties by path), the first ``ceil(val_fraction * N)`` are val, the next
``ceil(test_fraction * N)`` test, the rest train; adding files moves few others between splits.
With ``test_fraction: 0`` the test split is the val split. Labels: -1, or with ``class_subdirs: true``
the index of the first-level sub-folder (sorted names) — for class-conditional use.
"""

from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from diffproc.data.base import (IMAGE_EXTENSIONS, DatasetNotFoundError, ImageDataModule, ImageFileDataset, OnCorrupt,
                                list_images, missing_dataset_error, resize_shorter_center_crop, split_counts)


def split_files(files: list[Path], root: Path, val_fraction: float, test_fraction: float) -> dict[str, list[Path]]:
    """Deterministic hash-ordered split of ``files`` into train/val/test (see module docstring)."""
    rel = [f.relative_to(root).as_posix() for f in files]
    order = sorted(range(len(files)), key=lambda i: (zlib.crc32(rel[i].encode()), rel[i]))
    n_val, n_test = split_counts(len(files), (val_fraction, test_fraction))
    pick = lambda idx: sorted(files[i] for i in idx)  # noqa: E731 - keep dataset order = path order
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    return {"train": pick(train), "val": pick(val), "test": pick(test) if n_test else pick(val)}


class ImageFolderDataModule(ImageDataModule):
    """Images from any folder tree under ``root``."""

    def __init__(self, root: str | None = None, image_size: int = 64, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 val_fraction: float = 0.01, test_fraction: float = 0.0, class_subdirs: bool = False,
                 on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must lie in [0, 1), got {val_fraction}, {test_fraction}")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.class_subdirs, self.on_corrupt = bool(class_subdirs), on_corrupt
        self.name = f"folder_{self.root.resolve().name}{self.image_size}"
        self._splits: dict[str, list[Path]] | None = None
        self.classes: tuple[str, ...] = ()

    def _split(self) -> dict[str, list[Path]]:
        if self._splits is None:
            files = list_images(self.root) if self.root.is_dir() else []
            if not files and self.root.is_dir():
                n = sum(1 for p in self.root.rglob("*") if p.is_file())
                raise DatasetNotFoundError(
                    f"Image folder {self.root} exists but holds no images: {n} file(s), none ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)} (any depth). Put the images there, or point "
                    f"--data.init_args.root at the folder that holds them.")
            if not files:
                raise missing_dataset_error(
                    "Image folder", self.root,
                    f"<root>/**/*{{{','.join(IMAGE_EXTENSIONS)}}}  (any depth; with class_subdirs: "
                    f"<root>/<class>/**/*.jpg)", "your own images: point root at their folder.")
            self._splits = split_files(files, self.root, self.val_fraction, self.test_fraction)
            if self.class_subdirs:
                self.classes = tuple(sorted({f.relative_to(self.root).parts[0] for f in files
                                             if len(f.relative_to(self.root).parts) > 1}))
        return self._splits

    def build_dataset(self, split: str) -> Dataset:
        files = self._split()[split]
        labels = None
        if self.class_subdirs:
            index = {c: i for i, c in enumerate(self.classes)}
            labels = [index.get(f.relative_to(self.root).parts[0], -1) for f in files]
        return ImageFileDataset(files, labels, partial(resize_shorter_center_crop, size=self.image_size),
                                self.on_corrupt)
