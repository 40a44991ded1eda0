"""Guide images for stroke-guided generation (SDEdit, ``cli.py predict``).

:class:`StrokesDataModule` feeds ``predict`` with guide batches ``{"image", "name"[, "real"]}`` instead
of sample indices; :class:`~diffproc.methods.base.DiffusionModule` then runs
:func:`diffproc.methods.sdedit.sdedit_predict_step`. Two sources:

* ``guide_dir``: a folder of users' paintings (any image files; resized + center-cropped);
* ``strokes_from``: a dataset (short name ``shapes|celeba|afhq|lsun|cifar10|folder`` or a DataModule
  class path) whose real images become stroke paintings by per-image k-means colour clustering
  (EPDM §1.8: k-means on the RGB pixels, every pixel replaced by its centroid; [recon] k = 6).
"""

from __future__ import annotations

import importlib
from typing import Any, Literal, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffproc.data.base import (IMAGE_EXTENSIONS, DatasetNotFoundError, ImageDataModule, ImageFileDataset,
                                default_root, list_images, resize_shorter_center_crop)

SHORT_NAMES = {
    "shapes": "diffproc.data.shapes.ShapesDataModule",
    "celeba": "diffproc.data.celeba.CelebADataModule",
    "afhq": "diffproc.data.afhq.AFHQDataModule",
    "lsun": "diffproc.data.lsun.LSUNDataModule",
    "cifar10": "diffproc.data.cifar10.CIFAR10DataModule",
    "folder": "diffproc.data.folder.ImageFolderDataModule",
}


def kmeans_colors(image: Tensor, k: int = 6, iters: int = 20,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Quantise one image ``(C, H, W)`` to at most ``k`` colours: k-means++ seeding (drawn from
    ``generator``) + Lloyd iterations on its pixels (float64); each pixel becomes its centroid."""
    if image.ndim != 3:
        raise ValueError(f"kmeans_colors expects one (C, H, W) image, got {tuple(image.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    c, h, w = image.shape
    px = image.reshape(c, -1).T.to(torch.float64)  # (P, C)
    first = torch.randint(px.shape[0], (1,), generator=generator)
    centers = px[first]
    for _ in range(1, k):  # k-means++: next centre with probability ∝ squared distance
        d2 = torch.cdist(px, centers).pow(2).amin(1)
        if float(d2.sum()) <= 0:
            break  # fewer distinct colours than k
        nxt = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centers = torch.cat([centers, px[nxt]])
    for _ in range(iters):
        assign = torch.cdist(px, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, px)
        counts = torch.bincount(assign, minlength=len(centers)).unsqueeze(1)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)  # empty cluster: keep centre
        if torch.equal(new, centers):
            break
        centers = new
    assign = torch.cdist(px, centers).argmin(1)
    return centers[assign].T.reshape(c, h, w).to(image.dtype)


class StrokesDataset(Dataset):
    """``source`` items ``(image, label)`` -> ``{"image": k-means strokes, "real": image, "name"}``;
    image ``i`` is clustered with a generator seeded by ``seed + i`` (reproducible in any order)."""

    def __init__(self, source: Dataset, num: int, k: int, iters: int, seed: int, prefix: str) -> None:
        self.source, self.num, self.k, self.iters, self.seed, self.prefix = source, num, k, iters, seed, prefix

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict[str, Any]:
        real = self.source[i][0]
        g = torch.Generator().manual_seed(self.seed + i)
        return {"image": kmeans_colors(real, self.k, self.iters, g), "real": real, "name": f"{self.prefix}{i:06d}",
                "index": i}


class GuideFolderDataset(Dataset):
    """Users' paintings: ``{"image", "name"}`` from image files (optionally k-means quantised)."""

    def __init__(self, files: list, image_size: int, k: int, iters: int, seed: int, quantize: bool) -> None:
        self.files = ImageFileDataset(files, None, lambda img: resize_shorter_center_crop(img, image_size))
        self.names = [f.stem for f in files]
        self.k, self.iters, self.seed, self.quantize = k, iters, seed, quantize

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.files[i][0]
        if self.quantize:
            img = kmeans_colors(img, self.k, self.iters, torch.Generator().manual_seed(self.seed + i))
        return {"image": img, "name": self.names[i], "index": i}


class StrokesDataModule(ImageDataModule):
    """Guide images for ``cli.py predict`` (SDEdit). Set exactly one of ``guide_dir`` / ``strokes_from``.

    How SDEdit samples (hijack ``strength``, ``num_steps``, ``solver``, ``time_grid``, ``ddim_eta``, noise ``seed``)
    is the model's sampling spec, not a data option: ``--model.init_args.sampling.strength 0.4``.

    Args:
        guide_dir: folder of guide paintings (searched recursively; names = file stems).
        strokes_from: dataset to turn into strokes: a short name (``shapes``, ``celeba``, ``afhq``,
            ``lsun``, ``cifar10``, ``folder``) or a DataModule class path. It is built with this module's
            ``root`` and ``image_size`` plus ``strokes_init_args`` (e.g. ``{crop: ddim}``, ``{classes: [cat]}``).
        strokes_init_args: extra init args of the ``strokes_from`` DataModule.
        split: split of ``strokes_from`` to use (``test`` by default). num: number of guides (first
            ``num`` of the split; ``null`` = all; paper: 1000).
        k, kmeans_iters: colours per stroke painting ([recon] 6) and Lloyd iterations.
        quantize_guides: also k-means the ``guide_dir`` images (default: use them as painted).
        kmeans_seed: base seed of the per-image k-means (image ``i``: ``kmeans_seed + i``).
        root, image_size, batch_size, num_workers, ...: as :class:`ImageDataModule` (``batch_size``
            is the predict batch size; ``image_size`` must match the checkpoint).
    """

    name = "strokes"

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 16,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = False,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 guide_dir: Optional[str] = None, strokes_from: Optional[str] = None,
                 strokes_init_args: Optional[dict] = None,
                 split: Literal["train", "val", "test"] = "test", num: Optional[int] = 1000,
                 k: int = 6, kmeans_iters: int = 20, quantize_guides: bool = False, kmeans_seed: int = 0) -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        if (guide_dir is None) == (strokes_from is None):
            raise ValueError("StrokesDataModule needs exactly one guide source: set data.init_args.guide_dir "
                             "(a folder of paintings) or data.init_args.strokes_from (e.g. shapes, celeba, afhq).")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.guide_dir, self.strokes_from = guide_dir, strokes_from
        self.strokes_init_args = dict(strokes_init_args or {})
        self.split, self.num, self.k, self.kmeans_iters = split, num, int(k), int(kmeans_iters)
        self.quantize_guides = bool(quantize_guides)
        self.kmeans_seed = int(kmeans_seed)
        self._guides: Optional[Dataset] = None

    def source_datamodule(self) -> ImageDataModule:
        """The ``strokes_from`` DataModule, built at this module's root and image size."""
        path = SHORT_NAMES.get(str(self.strokes_from).lower(), str(self.strokes_from))
        module_name, _, cls_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name) if module_name else None
        except ImportError:
            cls = None
        if cls is None or not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
            raise ValueError(f"strokes_from={self.strokes_from!r} is not a dataset: use one of "
                             f"{sorted(SHORT_NAMES)} or a DataModule class path like diffproc.data.afhq.AFHQDataModule")
        args = {"root": str(self.root), "image_size": self.image_size, **self.strokes_init_args}
        return cls(**args)

    def guides(self) -> Dataset:
        if self._guides is None:
            seed = self.kmeans_seed
            if self.guide_dir is not None:
                folder = default_root(self.guide_dir)
                files = list_images(folder) if folder.is_dir() else []
                if not files:
                    raise DatasetNotFoundError(f"no guide images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}; "
                                            f"set data.init_args.guide_dir to a folder of paintings")
                files = files[: self.num] if self.num else files
                self._guides = GuideFolderDataset(files, self.image_size, self.k, self.kmeans_iters, seed,
                                                  self.quantize_guides)
            else:
                src = self.source_datamodule().dataset(self.split)
                n = len(src) if self.num is None else min(int(self.num), len(src))  # type: ignore[arg-type]
                self._guides = StrokesDataset(src, n, self.k, self.kmeans_iters, seed, f"{self.split}_")
        return self._guides

    def setup(self, stage: str | None = None) -> None:
        if stage in ("predict", None):
            self.guides()

    def build_dataset(self, split: str) -> Dataset:
        raise ValueError("StrokesDataModule only provides guide images for `cli.py predict`; "
                         "train/validate/test with the dataset's own DataModule.")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.guides(), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)
