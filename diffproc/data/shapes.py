"""The embedded dataset: deterministic, procedural, sharp-edged shapes on varied backgrounds.

No files, any resolution (8..128 and beyond), a class label per image (the main shape's kind). Image
``i`` of ``generate_shapes(..., seed, start)`` is drawn from its own RNG seeded by ``(seed, start + i)``,
so any index range is reproducible on its own and the splits of :class:`ShapesDataModule` are disjoint
index ranges.

Each image: one main shape (circle, square, triangle, diamond, cross or ring; 40-76 % of the image
width across) in one of 8 saturated palette colours, sometimes a small second shape, on a background
that is solid (dark or pastel), a linear gradient, stripes, a checkerboard or low-contrast noise.
Edges are hard (no antialiasing): GDDM and EPDM care about edges. Shapes are rasterised in normalised
coordinates, vectorised over a chunk of images with numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffproc.data.base import ImageDataModule, TensorImageDataset

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
BACKGROUNDS: tuple[str, ...] = ("dark", "pastel", "gradient", "stripes", "checker", "noise")
PALETTE: np.ndarray = np.array([
    (230, 25, 45),    # red
    (40, 200, 60),    # green
    (35, 90, 235),    # blue
    (255, 225, 25),   # yellow
    (225, 45, 210),   # magenta
    (30, 215, 225),   # cyan
    (255, 135, 20),   # orange
    (250, 250, 250),  # white
], dtype=np.float64)
PALETTE_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")

# index offsets of the ShapesDataModule splits (disjoint as long as num_train < 1e9)
SPLIT_START = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}

_NUM_PARAMS = 24  # uniform draws per image, in a fixed order (the per-image RNG stream layout)
_MIN_CONTRAST = 150.0  # min RGB distance between a shape colour and the background mean


def _draw_params(num: int, size: int, seed: int, start: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Per-image uniform draws ``(num, _NUM_PARAMS)`` and noise fields (only for noise backgrounds)."""
    if seed < 0 or start < 0:
        raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}")
    u = np.empty((num, _NUM_PARAMS))
    noise: list[np.ndarray | None] = []
    for i in range(num):
        rng = np.random.default_rng((seed, start + i))
        u[i] = rng.random(_NUM_PARAMS)
        noise.append(rng.random((size, size)) if int(u[i, 0] * len(BACKGROUNDS)) == 5 else None)
    return u, noise


def _shape_mask(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, theta: np.ndarray,
                gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Boolean ``(n, H, W)`` masks of shapes of ``kind`` with half-extent ``r`` (normalised units)."""
    f = np.float32
    c, s = np.cos(theta).astype(f)[:, None, None], np.sin(theta).astype(f)[:, None, None]
    dx, dy = gx[None] - cx.astype(f)[:, None, None], gy[None] - cy.astype(f)[:, None, None]
    x, y = c * dx + s * dy, -s * dx + c * dy  # rotate the frame by -theta
    r = r.astype(f)[:, None, None]
    out = np.zeros(dx.shape, dtype=bool)
    for k in range(len(SHAPE_CLASSES)):
        i = np.flatnonzero(kind == k)
        if len(i) == 0:
            continue
        xi, yi, ri = x[i], y[i], r[i]
        ax, ay = np.abs(xi), np.abs(yi)
        if k == 0:    # circle
            m = xi * xi + yi * yi <= (0.92 * ri) ** 2
        elif k == 1:  # square
            m = np.maximum(ax, ay) <= 0.8 * ri
        elif k == 2:  # triangle, apex up, circumradius R, bounding box centred (apex -0.75R, base +0.75R)
            R = 1.12 * ri
            yt = yi - R / 4
            m = (yt <= R / 2) & (0.866 * xi - 0.5 * yt <= R / 2) & (-0.866 * xi - 0.5 * yt <= R / 2)
        elif k == 3:  # diamond
            m = ax + ay <= 1.05 * ri
        elif k == 4:  # cross (plus)
            w = 0.32 * ri
            m = ((ax <= w) & (ay <= ri)) | ((ay <= w) & (ax <= ri))
        else:         # ring
            d2 = xi * xi + yi * yi
            m = (d2 <= (0.95 * ri) ** 2) & (d2 >= (0.5 * ri) ** 2)
        out[i] = m
    return out


def _background(u: np.ndarray, noise: list[np.ndarray | None], gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float ``(n, H, W, 3)`` backgrounds in [0, 255] and their mean colours ``(n, 3)``."""
    f = np.float32
    n, (H, W) = len(u), gx.shape
    bg_type = (u[:, 0] * len(BACKGROUNDS)).astype(int)
    dark = 10 + 85 * u[:, 1:4]                    # (n, 3) in [10, 95]
    pastel = 160 + 90 * u[:, 4:7]                 # (n, 3) in [160, 250]
    phi = np.pi * 2 * u[:, 7]
    period = (0.09 + 0.14 * u[:, 8]).astype(f)    # stripe/checker period, fraction of the image

    # colour pairs per type: c1 everywhere, c2 mixed in by a weight map t in [0, 1]
    is_pastel_base = (bg_type == 1) | ((bg_type >= 3) & (u[:, 9] < 0.5))
    c1 = np.where(is_pastel_base[:, None], pastel, dark)
    shift = 35 + 30 * u[:, 10:13]                 # low-contrast partner colour for textures
    sign = np.where(is_pastel_base, -1.0, 1.0)[:, None]
    c2 = np.where((bg_type == 2)[:, None], pastel * 0.8, np.clip(c1 + sign * shift, 0, 255))

    t = np.zeros((n, H, W), dtype=f)
    for kind in (2, 3):  # gradient, stripes: along direction phi
        i = np.flatnonzero(bg_type == kind)
        if len(i):
            cphi, sphi = np.cos(phi[i]).astype(f)[:, None, None], np.sin(phi[i]).astype(f)[:, None, None]
            proj = (gx[None] - 0.5) * cphi + (gy[None] - 0.5) * sphi
            if kind == 2:
                t[i] = (proj / (0.5 * (np.abs(cphi) + np.abs(sphi))) + 1) / 2
            else:
                t[i] = np.floor(proj / period[i, None, None]) % 2
    i = np.flatnonzero(bg_type == 4)  # checker
    if len(i):
        p = period[i, None, None]
        t[i] = (np.floor(gx[None] / p) + np.floor(gy[None] / p)) % 2
    img = c1.astype(f)[:, None, None, :] + t[..., None] * (c2 - c1).astype(f)[:, None, None, :]
    for i in np.flatnonzero(bg_type == 5):
        amp = 25 + 20 * u[i, 11]
        img[i] += (amp * (noise[i][..., None] - 0.5) * 2).astype(f)  # type: ignore[index]
    np.clip(img, 0, 255, out=img)
    return img, img.mean(axis=(1, 2), dtype=np.float64)


def _pick_colour(index: np.ndarray, bg_mean: np.ndarray, avoid: np.ndarray | None = None) -> np.ndarray:
    """Palette index, moved forward until it contrasts with the background (and differs from ``avoid``)."""
    out = index.copy()
    for i in range(len(out)):
        for k in range(len(PALETTE)):
            j = (index[i] + k) % len(PALETTE)
            if np.linalg.norm(PALETTE[j] - bg_mean[i]) >= _MIN_CONTRAST and (avoid is None or j != avoid[i]):
                out[i] = j
                break
    return out


def _render(u: np.ndarray, noise: list[np.ndarray | None], size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = ((np.arange(size) + 0.5) / size).astype(np.float32)
    gx, gy = np.meshgrid(coords, coords, indexing="xy")
    img, bg_mean = _background(u, noise, gx, gy)

    kind = (u[:, 13] * len(SHAPE_CLASSES)).astype(int)
    r = 0.20 + 0.18 * u[:, 14]                                   # half-extent: 40-76 % across
    margin = r + 0.03
    cx = margin + (1 - 2 * margin) * u[:, 15]
    cy = margin + (1 - 2 * margin) * u[:, 16]
    # small tilt for square/diamond/cross (keeps them distinct), any angle for triangle
    theta = np.where(kind == 2, (u[:, 17] - 0.5) * (2 * np.pi / 3) * 0.5, (u[:, 17] - 0.5) * np.deg2rad(20))
    colour = _pick_colour((u[:, 18] * len(PALETTE)).astype(int), bg_mean)

    # optional small second shape (drawn first, main shape on top), in the corner farthest away
    has2 = u[:, 19] < 0.3
    if has2.any():
        idx = np.flatnonzero(has2)
        kind2 = (u[idx, 20] * 4).astype(int)  # filled kinds only (circle..diamond): readable when tiny
        r2 = 0.09 + 0.05 * u[idx, 21]
        cx2 = np.where(cx[idx] < 0.5, 1 - r2 - 0.04, r2 + 0.04)
        cy2 = np.where(cy[idx] < 0.5, 1 - r2 - 0.04, r2 + 0.04)
        colour2 = _pick_colour((u[idx, 22] * len(PALETTE)).astype(int), bg_mean[idx], avoid=colour[idx])
        m2 = _shape_mask(kind2, cx2, cy2, r2, np.zeros_like(r2), gx, gy)
        img[idx] = np.where(m2[..., None], PALETTE[colour2].astype(np.float32)[:, None, None, :], img[idx])

    m = _shape_mask(kind, cx, cy, r, theta, gx, gy)
    img = np.where(m[..., None], PALETTE[colour].astype(np.float32)[:, None, None, :], img)
    return np.rint(img).astype(np.uint8), kind


def generate_shapes(num: int, image_size: int, seed: int = 0, start: int = 0) -> tuple[Tensor, Tensor]:
    """``num`` shape images: uint8 ``(num, 3, image_size, image_size)`` and int64 labels ``(num,)``.

    Image ``i`` depends only on ``(seed, start + i)`` (and ``image_size``), so
    ``generate_shapes(5, s, start=10)`` equals rows 10..14 of ``generate_shapes(20, s)``.
    Labels index :data:`SHAPE_CLASSES`.
    """
    num, size = int(num), int(image_size)
    if num < 0 or size < 1:
        raise ValueError(f"num must be >= 0 and image_size >= 1, got num={num}, image_size={size}")
    images = torch.empty((num, 3, size, size), dtype=torch.uint8)
    labels = torch.empty((num,), dtype=torch.int64)
    chunk = max(1, (1 << 19) // (size * size))
    for a in range(0, num, chunk):
        b = min(num, a + chunk)
        u, noise = _draw_params(b - a, size, seed, start + a)
        img, kind = _render(u, noise, size)
        images[a:b] = torch.from_numpy(img).permute(0, 3, 1, 2)
        labels[a:b] = torch.from_numpy(kind)
    return images, labels


class ShapesDataModule(ImageDataModule):
    """The embedded procedural dataset (no files): the default for the quickstart, tests and offline runs.

    Splits are disjoint index ranges of the same generator: train ``[0, num_train)``, val from 1e9,
    test from 2e9 (:data:`SPLIT_START`). Generated in memory on first use and cached per split.
    ``root`` is accepted for interface uniformity and ignored.
    """

    name = "shapes"

    def __init__(self, root: str | None = None, image_size: int = 32, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = True,
                 pin_memory: bool | None = None, persistent_workers: bool = True,
                 num_train: int = 10000, num_val: int = 256, num_test: int = 2000, seed: int = 0) -> None:
        super().__init__(root, image_size, batch_size, eval_batch_size, num_workers, random_flip,
                         pin_memory, persistent_workers)
        self.num_train, self.num_val, self.num_test, self.seed = int(num_train), int(num_val), int(num_test), int(seed)
        self.classes = SHAPE_CLASSES

    def build_dataset(self, split: str) -> Dataset:
        num = {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]
        images, labels = generate_shapes(num, self.image_size, seed=self.seed, start=SPLIT_START[split])
        return TensorImageDataset(images, labels)
