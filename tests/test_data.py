"""Tests for diffproc.data: the embedded shapes dataset and the DataModules on real on-disk formats.

Every file-based DataModule reads a tiny fixture written here in its dataset's native format.
"""

from __future__ import annotations

import io
import pickle
import warnings
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
    assert len(batches) == 5  # drop_last
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


def test_train_flip_is_random_horizontal_flip():
    torch.manual_seed(0)
    dm = ShapesDataModule(image_size=16, batch_size=64, num_train=64)
    x, y = next(iter(dm.train_dataloader()))
    ref = dm.dataset("train")
    flipped = same = 0
    for img, label in zip(x, y):
        idx = [i for i in range(64) if torch.equal(ref.labels[i], label) and
               (torch.equal(ref[i][0], img) or torch.equal(ref[i][0].flip(-1), img))]
        assert idx, "train image is neither an original nor a horizontal flip of one"
        flipped += any(torch.equal(ref[i][0].flip(-1), img) and not torch.equal(ref[i][0], img) for i in idx)
        same += any(torch.equal(ref[i][0], img) for i in idx)
    assert flipped > 10 and same > 10


def test_real_images_helper():
    dm = ShapesDataModule(image_size=8, num_train=30)
    batches = list(dm.real_images("train", num=25, batch_size=10))
    assert [b.shape[0] for b in batches] == [10, 10, 5]
    ref, _ = generate_shapes(25, 8)
    assert torch.allclose(torch.cat(batches), ref.float() / 127.5 - 1)
