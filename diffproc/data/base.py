"""``ImageDataModule``: the base every diffproc dataset derives from, plus the shared image plumbing.

Contract (DESIGN.md "Data"): items are ``(image, label)`` with ``image`` float32 ``(C, H, W)`` in
``[-1, 1]`` and ``label`` an int64 scalar (``-1`` when the dataset has no labels). Subclasses implement
:meth:`ImageDataModule.build_dataset` for ``"train" | "val" | "test"``; it returns the *un-flipped*
dataset (the train loader adds the mirrored copies, :class:`XFlipDataset`), so metrics code can call it directly.

Also here: PIL decoding (``convert("RGB")``), antialiased resizing, the file-list dataset with the
``on_corrupt: raise | skip`` policy, and the one-message errors for missing datasets.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from multiprocessing import context
from pathlib import Path
from typing import Literal

import lightning
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OnCorrupt = Literal["raise", "skip"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the DataModule expects them (message says what to do)."""


class CorruptImageError(RuntimeError):
    """An image file (or lmdb record) could not be decoded; the message names it (``.path``)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def default_root(root: str | os.PathLike | None) -> Path:
    """``root`` if given, else ``$DIFFPROC_DATA``, else ``./data``."""
    if root is None or str(root) == "":
        root = os.environ.get("DIFFPROC_DATA") or "./data"
    return Path(root).expanduser()


def missing_dataset_error(dataset: str, expected: Path | str, layout: str, download: str) -> DatasetNotFoundError:
    """One actionable message: what is missing, the official layout, where to get it."""
    return DatasetNotFoundError(
        f"{dataset} not found: expected {expected}\n"
        f"Official layout:\n{layout.rstrip()}\n"
        f"Get it: {download.rstrip()}\n"
        f"Set `root` (--data.init_args.root) or the DIFFPROC_DATA environment variable to the folder that "
        f"holds it. No download is attempted."
    )


# --------------------------------------------------------------------------------------------------
# image decoding and geometry
# --------------------------------------------------------------------------------------------------

def decode_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes to an RGB PIL image; failures raise :class:`CorruptImageError`."""
    label = name if name is not None else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise CorruptImageError(
            f"cannot decode image {label} ({type(err).__name__}: {err}). Replace or delete the file, or "
            f"set on_corrupt: skip to skip unreadable images.", path=label,
        ) from err


def resize_shorter_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then center-crop ``size x size``.

    Downscaling by large factors first halves with a box filter (``reducing_gap``), as ADM/DDIM do.
    """
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` in ``[-1, 1]``."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 ``(N, C, H, W)`` images resized to ``size`` x ``size`` (bicubic, antialiased), rounded back to uint8."""
    x = torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def uint8_to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``."""
    return x.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------

class TensorImageDataset(Dataset):
    """In-memory uint8 ``(N, C, H, W)`` images + int64 labels -> ``(float [-1, 1], label)`` items."""

    def __init__(self, images: Tensor, labels: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return uint8_to_float(self.images[i]), self.labels[i]


class _SkipCounter:
    """Process-shared count of skipped unreadable images (works across DataLoader workers)."""

    def __init__(self) -> None:
        self.value = multiprocessing.Value("q", 0)

    def add(self) -> int:
        with self.value.get_lock():
            self.value.value += 1
            return self.value.value

    @property
    def total(self) -> int:
        return int(self.value.value)

    def __getstate__(self) -> dict:
        # shared with processes being started (DataLoader workers, spawn); a plain pickle/deepcopy
        # gets an independent counter starting at the current total
        if context.get_spawning_popen() is not None:
            return {"value": self.value}
        return {"count": self.total}

    def __setstate__(self, state: dict) -> None:
        self.value = state["value"] if "value" in state else multiprocessing.Value("q", state["count"])


class SkippingDataset(Dataset):
    """Base for datasets that decode records: applies the ``on_corrupt`` policy around :meth:`load`.

    ``raise``: a :class:`CorruptImageError` naming the file. ``skip``: the next readable record is
    returned instead (batches keep their size), the skip is counted in a process-shared counter, a
    warning names the first bad file, and the owning DataModule warns with the total at ``teardown``.
    """

    def __init__(self, on_corrupt: OnCorrupt = "raise") -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.skipped = _SkipCounter()

    def load(self, i: int) -> tuple[Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        for k in range(n):
            try:
                img, label = self.load((i + k) % n)
                return img, torch.tensor(label, dtype=torch.int64)
            except CorruptImageError as err:
                if self.on_corrupt == "raise":
                    raise
                if self.skipped.add() == 1:
                    warnings.warn(f"Skipping unreadable image {err.path} ({err.__cause__!r}); further "
                                  f"unreadable images are skipped and counted, "
                                  f"the total is reported at the end of the stage.", stacklevel=2)
        raise CorruptImageError(f"every image of this dataset ({n}) is unreadable")


class ImageFileDataset(SkippingDataset):
    """A list of image files with labels; each item is decoded with PIL and passed to ``transform``."""

    def __init__(self, files: Sequence[str | os.PathLike], labels: Sequence[int] | None,
                 transform: Callable[[Image.Image], Image.Image], on_corrupt: OnCorrupt = "raise") -> None:
        super().__init__(on_corrupt)
        self.files = [str(f) for f in files]
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        if len(self.labels) != len(self.files):
            raise ValueError("files and labels differ in length")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[Tensor, int]:
        path = self.files[i]
        img = decode_image(path)
        return pil_to_tensor(self.transform(img)), self.labels[i]


class XFlipDataset(Dataset):
    """``dataset`` followed by its mirror images: item ``i + N`` is item ``i`` flipped left-right.

    The training split's horizontal-flip augmentation (EDM's ``xflip``): every epoch shows each image
    once in each orientation, in shuffled order. The flip is a function of the index, not of a random
    draw, so the sampler's order alone fixes what every step sees — in any DataLoader worker, under DDP,
    and after a resume from a mid-epoch checkpoint.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, label = self.dataset[i % self.n]
        return (img.flip(-1) if i >= self.n else img), label


class EpochShuffleSampler(RandomSampler):
    """A new random order every epoch that depends only on (run seed, epoch) — ``randperm`` of a
    generator seeded with ``seed + epoch``, as torch's ``DistributedSampler`` does (and Lightning's
    ``set_epoch`` drives both).

    A ``RandomSampler`` whose order does not depend on what was drawn before: a run resumed in a later
    epoch (or a new process after a requeue) sees the same order as an uninterrupted one. Being a
    ``RandomSampler``, Lightning replaces it under DDP by a shuffling ``DistributedSampler`` with the same
    seed. ``seed`` defaults to the run's ``seed_everything`` (``PL_GLOBAL_SEED``).
    """

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` (Lightning saves its ``state_dict`` — the position within the
    epoch — in every checkpoint) whose state also holds the sampler's epoch.

    On a resume Lightning creates the training iterator before it calls ``set_epoch`` (Lightning 2.6,
    ``FitLoop.setup_data``), so a run resumed in the middle of epoch ``e > 0`` would replay epoch 0's
    order; restoring the epoch together with the position fixes that. A state saved after the last batch
    of epoch ``e`` resumes with a fresh iterator over epoch ``e + 1``: Lightning (2.6) then runs those
    batches still labelled epoch ``e`` and follows them with one empty epoch, so ``current_epoch`` runs one
    behind for that epoch while the data order is the uninterrupted run's. Works with the
    :class:`EpochShuffleSampler` and with the ``DistributedSampler`` Lightning swaps in under DDP.
    """

    def _epoch_samplers(self) -> list:
        inner = getattr(self.batch_sampler, "sampler", None)
        return [s for s in (self.sampler, inner) if hasattr(s, "set_epoch")]

    def state_dict(self) -> dict:
        samplers = self._epoch_samplers()
        epoch = getattr(samplers[0], "epoch", None) if samplers else None
        return {**super().state_dict(), "sampler_epoch": epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        epoch = state_dict.pop("sampler_epoch", None)
        finished = state_dict.get("_num_yielded", 0) >= len(self)
        if epoch is not None:
            for sampler in self._epoch_samplers():
                sampler.set_epoch(epoch + 1 if finished else epoch)
        if not finished:  # saved after the epoch's last batch: the next epoch's order, from its start
            super().load_state_dict(state_dict)


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Sorted image files (``IMAGE_EXTENSIONS``, case-insensitive) under ``folder``."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# --------------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------------

class ImageDataModule(lightning.LightningDataModule):
    """Base DataModule: splits, loaders (train: shuffle + flip + drop_last), real-image iteration.

    Args:
        root: folder holding the dataset (default ``$DIFFPROC_DATA``, else ``./data``).
        image_size: output resolution (square); linked to ``model.image_size`` by the CLI.
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default ``batch_size``).
        num_workers: DataLoader worker processes.
        random_flip: horizontal flip of training images: each image appears in both orientations
            per epoch (:class:`XFlipDataset`), so an epoch is twice the split.
        pin_memory: pin host memory (default: when CUDA is available).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
    """

    name: str = "images"

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True) -> None:
        super().__init__()
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root = default_root(root)
        self.image_size = int(image_size)
        self.channels = 3
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else self.batch_size
        self.num_workers = int(num_workers)
        self.random_flip = bool(random_flip)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self._datasets: dict[str, Dataset] = {}
        self.save_hyperparameters()  # collects the subclass's init args too (stored in checkpoints)

    # -- subclasses ---------------------------------------------------------------------------------
    def build_dataset(self, split: str) -> Dataset:
        """The un-flipped dataset of ``split`` (``train | val | test``). Raises if files are missing."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset(split)")

    # -- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": (),
                  None: SPLITS}.get(stage, SPLITS)
        for split in splits:
            self.dataset(split)

    def teardown(self, stage: str | None = None) -> None:
        for split, ds in self._datasets.items():
            counter = getattr(ds, "skipped", None)
            if counter is not None and counter.total:
                warnings.warn(f"{type(self).__name__}: skipped {counter.total} unreadable image(s) in the "
                              f"'{split}' split so far (on_corrupt=skip).", stacklevel=2)

    def dataset(self, split: str) -> Dataset:
        """Cached :meth:`build_dataset` (built on first use)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def num_skipped(self, split: str) -> int:
        """Unreadable images skipped so far in ``split`` (``on_corrupt=skip``), over all workers."""
        counter = getattr(self._datasets.get(split), "skipped", None)
        return counter.total if counter is not None else 0

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        """Shuffled (training) loaders are :class:`ResumableDataLoader`s over an :class:`EpochShuffleSampler`:
        Lightning saves the loader's state (epoch, position) in every checkpoint, and a resumed run
        continues with the very batch the uninterrupted run would have drawn next (issue 16)."""
        workers = self.num_workers
        kwargs = dict(batch_size=batch_size, drop_last=drop_last, num_workers=workers, pin_memory=self.pin_memory,
                      persistent_workers=self.persistent_workers and workers > 0)
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        return ResumableDataLoader(dataset, sampler=EpochShuffleSampler(dataset), **kwargs)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        if len(ds) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(f"{type(self).__name__}: the train split has {len(ds)} images, fewer than "  # type: ignore[arg-type]
                             f"batch_size={self.batch_size}; lower batch_size (drop_last=True would yield no batch).")
        if self.random_flip:
            ds = XFlipDataset(ds)
        return self._loader(ds, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        """Unconditional generation: the model decides what to generate (``DiffusionModule``
        yields sample indices). Guided methods override this to feed guide images."""
        return self.trainer.lightning_module.predict_dataloader()

    # -- metrics helper -----------------------------------------------------------------------------
    def real_images(self, split: str = "train", num: int | None = None,
                    batch_size: int | None = None) -> Iterator[Tensor]:
        """Yield batches of real images of ``split`` (float ``[-1, 1]``, NCHW, dataset order, no flip).

        Stops after ``num`` images (all of the split when ``None``; the last batch is truncated).
        Used to compute the reference statistics of FID & co. Uses ``num_workers`` loader workers.
        """
        ds = self.dataset(split)
        total = len(ds) if num is None else min(int(num), len(ds))  # type: ignore[arg-type]
        if total <= 0:
            return
        bs = int(batch_size or self.eval_batch_size)
        subset = torch.utils.data.Subset(ds, range(total))
        loader = DataLoader(subset, batch_size=bs, shuffle=False, num_workers=self.num_workers)
        for images, _ in loader:
            yield images

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, "
                f"image_size={self.image_size}, batch_size={self.batch_size})")


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """``ceil(f * n)`` for each positive fraction (0 for 0), checked to leave something for training."""
    counts = [math.ceil(f * n) if f > 0 else 0 for f in fractions]
    if sum(counts) >= n:
        raise ValueError(f"split fractions {list(fractions)} leave no training images out of {n}")
    return counts
