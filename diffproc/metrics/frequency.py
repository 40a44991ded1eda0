"""Frequency-band analysis of images (EPDM paper, Appendix B: "EPDM is better than DDPM in the
low-to-mid bands"; the paper does not give its band edges, so they are ours and documented here).

Power spectrum: ``P(f) = |FFT2(x)(f)|²`` with the orthonormal 2-D DFT (``norm="ortho"``), so that
``Σ_f P(f) = Σ_pixels x²`` (Parseval). Every DFT bin ``(f_y, f_x)`` (cycles per pixel, from
``fftfreq``) gets the radial frequency normalised by Nyquist (0.5 cycles/pixel)

    ρ = sqrt(f_y² + f_x²) / 0.5   ∈ [0, √2]   (ρ = 1: Nyquist along an axis; ρ = √2: the corner).

Bands (default ``edges=(1/3, 2/3)``, thirds of Nyquist): **low** ``ρ < 1/3`` (includes DC unless
``remove_dc``), **mid** ``1/3 ≤ ρ < 2/3``, **high** ``ρ ≥ 2/3`` (includes the corners beyond
Nyquist). A band's *fraction* is its share of the total power; white noise therefore has
fractions equal to the bands' shares of the DFT bins (:func:`band_areas`), a constant image has
all its power in DC (low), and a ±1 checkerboard has all of it at ρ = √2 (high).

``mode="gray"`` averages the channels first (one spectrum per image); ``mode="channels"`` keeps one
spectrum per channel. Images are float NCHW (any range; the package uses [-1, 1]).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor

DEFAULT_EDGES: tuple[float, float] = (1.0 / 3.0, 2.0 / 3.0)
BAND_NAMES: tuple[str, str, str] = ("low", "mid", "high")


def radial_frequency(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(H, W) float64 grid of ρ = |f| / Nyquist for the bins of ``torch.fft.fft2``."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=device)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5


def power_spectrum(images: Tensor, mode: Literal["gray", "channels"] = "gray", remove_dc: bool = False) -> Tensor:
    """``|FFT2|²`` (orthonormal) per image: (N, H, W) for ``gray``, (N, C, H, W) for ``channels``;
    float64. ``remove_dc`` subtracts each image's (channel's) mean first, so DC power is 0."""
    if images.ndim != 4:
        raise ValueError(f"power_spectrum expects NCHW images, got shape {tuple(images.shape)}")
    x = images.to(torch.float64)
    if mode == "gray":
        x = x.mean(1)
    elif mode != "channels":
        raise ValueError(f"mode must be 'gray' or 'channels', got {mode!r}")
    if remove_dc:
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(x, norm="ortho").abs().square()


def band_masks(h: int, w: int, edges: Sequence[float] = DEFAULT_EDGES,
               device: torch.device | str | None = None) -> Tensor:
    """(len(edges)+1, H, W) boolean masks of the bands ``[0, e1), [e1, e2), …, [e_last, ∞)`` in ρ."""
    edges = [float(e) for e in edges]
    if any(b <= a for a, b in zip(edges, edges[1:])) or (edges and edges[0] <= 0):
        raise ValueError(f"band edges must be positive and increasing (fractions of Nyquist), got {edges}")
    rho = radial_frequency(h, w, device)
    bounds = [0.0, *edges, math.inf]
    return torch.stack([(rho >= lo) & (rho < hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def band_areas(h: int, w: int, edges: Sequence[float] = DEFAULT_EDGES) -> Tensor:
    """Share of the H·W DFT bins in each band (= white noise's expected power fractions)."""
    m = band_masks(h, w, edges)
    return m.flatten(1).sum(1).to(torch.float64) / (h * w)


def band_power(images: Tensor, edges: Sequence[float] = DEFAULT_EDGES,
               mode: Literal["gray", "channels"] = "gray", remove_dc: bool = False) -> Tensor:
    """Mean power per image (per channel) in each band: (bands,) or (C, bands), float64, summed over
    the band's bins and averaged over the images."""
    p = power_spectrum(images, mode, remove_dc)
    m = band_masks(p.shape[-2], p.shape[-1], edges, p.device).to(p.dtype)
    per_image = torch.einsum("...hw,bhw->...b", p, m)  # (N, bands) or (N, C, bands)
    return per_image.mean(0)


def band_fractions(images: Tensor, edges: Sequence[float] = DEFAULT_EDGES,
                   mode: Literal["gray", "channels"] = "gray", remove_dc: bool = False) -> Tensor:
    """Share of the total (batch-averaged) power in each band: sums to 1 along the last dim.

    Raises when the images carry no power at all (e.g. constant images with ``remove_dc``)."""
    bp = band_power(images, edges, mode, remove_dc)
    total = bp.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("band_fractions: the images have zero power (constant images with remove_dc=True?); "
                         "fractions are undefined")
    return bp / total


def radial_profile(images: Tensor, num_bins: int | None = None, mode: Literal["gray", "channels"] = "gray",
                   remove_dc: bool = False) -> tuple[Tensor, Tensor]:
    """Radially averaged power spectrum, batch-averaged: ``(rho_centres (K,), power (K,) or (C, K))``.

    Bins of equal width in ρ over ``[0, √2]`` (default ``K = max(H, W) // 2 + 1``); a bin's value is
    the mean power of the DFT bins whose ρ falls in it (NaN for empty bins)."""
    p = power_spectrum(images, mode, remove_dc).mean(0)
    h, w = p.shape[-2:]
    k = num_bins or max(h, w) // 2 + 1
    rho = radial_frequency(h, w, p.device)
    idx = torch.clamp((rho / math.sqrt(2) * k).long(), max=k - 1).flatten()
    flat = p.flatten(-2)
    sums = torch.zeros(*flat.shape[:-1], k, dtype=flat.dtype, device=flat.device).index_add_(-1, idx, flat)
    counts = torch.bincount(idx, minlength=k).to(flat.dtype)
    centres = (torch.arange(k, dtype=torch.float64) + 0.5) * math.sqrt(2) / k
    return centres, sums / counts  # 0/0 -> NaN for empty bins


def compare_bands(real: Tensor, generated: dict[str, Tensor], edges: Sequence[float] = DEFAULT_EDGES,
                  remove_dc: bool = True) -> dict[str, dict]:
    """Band fractions and band power relative to the real images, for each named generated set.

    Returns ``{name: {"fractions": [low, mid, high], "power_ratio": [gen/real per band],
    "l1_to_real": Σ|frac − frac_real|}}`` with an entry ``"real"`` for the real images (gray spectra)."""
    real_pow = band_power(real, edges, "gray", remove_dc)
    out = {"real": {"fractions": (real_pow / real_pow.sum()).tolist(), "power_ratio": [1.0] * len(real_pow),
                    "l1_to_real": 0.0, "num_images": int(real.shape[0])}}
    rf = real_pow / real_pow.sum()
    for name, imgs in generated.items():
        gp = band_power(imgs, edges, "gray", remove_dc)
        gf = gp / gp.sum()
        out[name] = {"fractions": gf.tolist(), "power_ratio": (gp / real_pow).tolist(),
                     "l1_to_real": float((gf - rf).abs().sum()), "num_images": int(imgs.shape[0])}
    return out
