"""CelebA from the official aligned release: ``img_align_celeba/`` + ``list_eval_partition.txt``.

Crops of the 178x218 (W x H) aligned faces, then an antialiased bicubic resize to ``image_size``:

* ``crop: ddim`` (default; DDIM / DDPM++ / most diffusion papers' 64x64 CelebA): the 128x128 box
  rows 57:185, cols 25:153, i.e. centred at (x=89, y=121); PIL box ``(25, 57, 153, 185)``.
* ``crop: center140``: the 140x140 center crop (rows 39:179, cols 19:159; GAN papers' convention).

Splits follow ``list_eval_partition.txt`` (0 train 162,770 / 1 val 19,867 / 2 test 19,962). Labels -1.
``name`` carries the crop (``celeba64_ddim``) since FID reference statistics depend on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

from diffproc.data.base import (ImageDataModule, ImageFileDataset, OnCorrupt, missing_dataset_error)

CROP_BOXES = {"ddim": (25, 57, 153, 185), "center140": (19, 39, 159, 179)}  # PIL (left, upper, right, lower)
ALIGNED_SIZE = (178, 218)
SPLIT_CODE = {"train": "0", "val": "1", "test": "2"}
LAYOUT = """<root>/celeba/                  (or <root>/ directly)
    img_align_celeba/000001.jpg ... 202599.jpg   (178x218 aligned faces)
    list_eval_partition.txt                      ("000001.jpg 0" per line; 0 train, 1 val, 2 test)"""


class CelebACrop:
    """Crop box (scaled if the image is not 178x218), then resize to ``size`` (bicubic, antialiased)."""

    def __init__(self, box: tuple[int, int, int, int], size: int) -> None:
        self.box, self.size = box, size

    def __call__(self, img: Image.Image) -> Image.Image:
        box = self.box
        if img.size != ALIGNED_SIZE:
            sx, sy = img.size[0] / ALIGNED_SIZE[0], img.size[1] / ALIGNED_SIZE[1]
            box = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
        img = img.crop(box)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC, reducing_gap=2.0)
        return img


class CelebADataModule(ImageDataModule):
    """CelebA aligned faces, DDIM-style crop by default (64x64 in the papers)."""

    def __init__(self, root: str | None = None, image_size: int = 64, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 crop: Literal["ddim", "center140"] = "ddim", on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        if crop not in CROP_BOXES:
            raise ValueError(f"crop must be one of {sorted(CROP_BOXES)}, got {crop!r}")
        self.crop, self.on_corrupt = crop, on_corrupt
        self.name = f"celeba{self.image_size}_{crop}"

    @property
    def folder(self) -> Path:
        for cand in (self.root / "celeba", self.root):
            if (cand / "img_align_celeba").is_dir():
                return cand
        return self.root / "celeba"

    def build_dataset(self, split: str) -> Dataset:
        folder = self.folder
        images, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
        for path in (images, partition):
            if not path.exists():
                raise missing_dataset_error(
                    "CelebA", path, LAYOUT,
                    "img_align_celeba.zip and list_eval_partition.txt from "
                    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive: 'Align&Cropped Images' "
                    "and 'Eval/'); unzip into <root>/celeba/.")
        files = []
        for n, line in enumerate(partition.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{partition}:{n}: expected '<image> <0|1|2>', got {line!r}")
            if parts[1] == SPLIT_CODE[split]:
                files.append(images / parts[0])
        if not files:
            raise ValueError(f"{partition} lists no images for split {split!r}")
        missing = next((f for f in files if not f.is_file()), None) if len(files) <= 1000 else \
            next((f for f in (files[0], files[-1]) if not f.is_file()), None)
        if missing is not None:
            raise missing_dataset_error("CelebA image", missing, LAYOUT,
                                        "the complete img_align_celeba.zip (202,599 images).")
        return ImageFileDataset(files, None, CelebACrop(CROP_BOXES[self.crop], self.image_size), self.on_corrupt)
