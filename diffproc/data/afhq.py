"""AFHQ (Animal Faces-HQ, 512x512) from ``afhq/{train,val}/{cat,dog,wild}/``; AFHQ-Cat = ``classes: [cat]``.

AFHQ has no separate test split: ``test`` reads ``val`` (1,500 images; 500 per class). Images are
resized to ``image_size`` (shorter side, bicubic, antialiased, then center crop; AFHQ is square).
Labels index ``classes``. ``name``: ``afhq_cat`` / ``afhq_cat_dog_wild`` + the size.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from diffproc.data.base import (ImageDataModule, ImageFileDataset, OnCorrupt, list_images, missing_dataset_error,
                                resize_shorter_center_crop)

AFHQ_CLASSES = ("cat", "dog", "wild")
LAYOUT = """<root>/afhq/
    train/cat/*.jpg|png  train/dog/  train/wild/
    val/cat/             val/dog/    val/wild/"""


class AFHQDataModule(ImageDataModule):
    """AFHQ; ``classes`` picks the subsets (AFHQ-Cat at 128x128 in the papers: ``classes: [cat]``)."""

    def __init__(self, root: str | None = None, image_size: int = 128, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 classes: list[str] | None = None, on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        self.classes = tuple(classes) if classes else AFHQ_CLASSES
        bad = [c for c in self.classes if c not in AFHQ_CLASSES]
        if bad or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names from {AFHQ_CLASSES}, got {list(self.classes)}")
        self.on_corrupt = on_corrupt
        self.name = f"afhq{self.image_size}_{'_'.join(self.classes)}"

    @property
    def folder(self) -> Path:
        return self.root / "afhq" if (self.root / "afhq").is_dir() or not (self.root / "train").is_dir() else self.root

    def build_dataset(self, split: str) -> Dataset:
        sub = "train" if split == "train" else "val"
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            folder = self.folder / sub / cls
            found = list_images(folder) if folder.is_dir() else []
            if not found:
                raise missing_dataset_error(
                    "AFHQ", folder, LAYOUT,
                    "AFHQ (v1 or v2) from https://github.com/clovaai/stargan-v2 (download.sh afhq-dataset / "
                    "afhq-v2-dataset); unzip into <root>/ so that <root>/afhq/train/cat exists.")
            files += found
            labels += [label] * len(found)
        return ImageFileDataset(files, labels, partial(resize_shorter_center_crop, size=self.image_size),
                                self.on_corrupt)
