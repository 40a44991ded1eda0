"""Orthonormal separable bases: DCT-II (Neumann), the official blur-diffusion Toeplitz eigenbasis, and
kernel spectra in the DCT basis.

Spec: methods_blur_sie_baselines.md §1.2. A basis is a pair of orthogonal matrices whose *rows* are basis
vectors; ``u = M_h @ x @ M_w.T`` on the last two dims and ``x = M_h.T @ u @ M_w``. Per-coefficient
multipliers are ``(H, W)`` grids broadcast over any leading dims.

Precision: the DCT is orthogonal (condition number 1), so ``dct2``/``idct2`` and ``SeparableBasis`` run in
the *input* dtype (float32 round trip error ~1e-7). Matrices are built in float64 and cast once per
(dtype, device), then cached. Ill-conditioned users (the Poisson solver, ``diffproc.ops.poisson``) upcast
to float64 themselves before calling these functions.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "dct_matrix",
    "dct2",
    "idct2",
    "dct_frequencies",
    "gaussian_kernel_1d",
    "kernel_spectrum",
    "heat_blur",
    "SeparableBasis",
]


def _check_float(x: Tensor, name: str = "x") -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with .float()")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")


@lru_cache(maxsize=None)
def _dct_matrix_f64(n: int) -> Tensor:
    # M[k, j] = sqrt((2 - δ_k0)/n) cos(π k (2j+1) / 2n)   (§1.2)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * k * (2.0 * j + 1.0) / (2.0 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


@lru_cache(maxsize=None)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _dct_matrix_f64(n).to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal DCT-II matrix (n, n); rows are basis vectors, row k has frequency ω_k = πk/n.

    ``dct_matrix(n) @ v`` equals ``scipy.fft.dct(v, type=2, norm='ortho')``. Cached per (n, dtype, device);
    do not modify the returned tensor in place.
    """
    if n < 1:
        raise ValueError(f"dct_matrix needs n >= 1, got {n}")
    return _dct_matrix_cached(int(n), dtype, torch.device(device if device is not None else "cpu"))


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims (any leading dims), in ``x.dtype``."""
    _check_float(x)
    mh = dct_matrix(x.shape[-2], x.dtype, x.device)
    mw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return mh @ x @ mw.T


def idct2(u: Tensor) -> Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III) over the last two dims, in ``u.dtype``."""
    _check_float(u, "u")
    mh = dct_matrix(u.shape[-2], u.dtype, u.device)
    mw = dct_matrix(u.shape[-1], u.dtype, u.device)
    return mh.T @ u @ mw


def _omega(n: int) -> Tensor:
    return math.pi * torch.arange(n, dtype=torch.float64) / n


def dct_frequencies(
    h: int, w: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """(H, W) grid λ_kl = ω_k² + ω_l² with ω_k = πk/H, ω_l = πl/W (IHDM/BNDM 'Laplacian eigenvalue', §1.2)."""
    lam = _omega(h)[:, None] ** 2 + _omega(w)[None, :] ** 2
    return lam.to(dtype=dtype, device=device)


def gaussian_kernel_1d(size: int, sigma: float) -> Tensor:
    """Official blur-diffusion sampled kernel: g_j ∝ exp(-½((j - (size-1)/2)/σ)²), sums to 1 (float64)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    j = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((j - (size - 1) / 2.0) / sigma) ** 2)
    return g / g.sum()


def _sampled_response(n: int, sigma: float) -> Tensor:
    # ĝ(ω_k) = g(0) + 2 Σ_{m≥1} g(m) cos(ω_k m) for the centred size-(2n-1) kernel (half-sample symmetric ext.)
    g = gaussian_kernel_1d(2 * n - 1, sigma)[n - 1 :]  # g(0), g(1), ..., g(n-1)
    m = torch.arange(n, dtype=torch.float64)
    c = torch.cos(_omega(n)[:, None] * m[None, :])
    wts = torch.full((n,), 2.0, dtype=torch.float64)
    wts[0] = 1.0
    return c @ (wts * g)


def kernel_spectrum(
    h: int,
    w: int,
    sigma: float,
    kind: Literal["sampled", "heat"] = "sampled",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """(H, W) eigenvalues D of a separable Gaussian blur in the DCT basis (§1.2 'Kernel spectra').

    - ``sampled``: ĝ(ω_k)ĝ(ω_l) of the official sampled kernel (size 2n-1, σ px, normalised) under
      half-sample-symmetric extension; exact eigenvalues of that discrete convolution.
    - ``heat``: exp(-σ² (ω_k² + ω_l²) / 2), the continuous heat semigroup (D^p = blur of variance pσ²).
    """
    if kind == "sampled":
        d = _sampled_response(h, sigma)[:, None] * _sampled_response(w, sigma)[None, :]
    elif kind == "heat":
        d = torch.exp(-0.5 * sigma**2 * dct_frequencies(h, w))
    else:
        raise ValueError(f"kernel_spectrum kind must be 'sampled' or 'heat', got {kind!r}")
    return d.to(dtype=dtype, device=device)


def heat_blur(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Gaussian blur of std ``sigma`` px with Neumann boundary: idct2(exp(-σ²λ/2) ⊙ dct2(x)).

    Equals ``scipy.ndimage.gaussian_filter(x, σ, mode='reflect')`` up to aliasing (< 1e-9 for σ >= 2).
    ``sigma`` may be a float or a tensor broadcastable against the leading dims (e.g. shape (B, 1, 1, 1)).
    """
    _check_float(x)
    lam = dct_frequencies(x.shape[-2], x.shape[-1], x.dtype, x.device)
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return idct2(torch.exp(-0.5 * sig**2 * lam) * dct2(x))


class SeparableBasis:
    """Orthonormal separable basis ``u = M_h x M_w^T`` (§1.2); build with :meth:`dct`,
    :meth:`toeplitz_eig` or :meth:`identity`.

    Attributes: ``kind`` ('dct' | 'toeplitz_eig' | 'identity'), ``shape`` (H, W), ``m_h``/``m_w`` (float64
    CPU matrices, rows = basis vectors; None for identity), ``eigenvalues`` ((H, W) float64 grid D for
    ``toeplitz_eig``, else None). Matrices are cast to the input's dtype/device on use and cached.
    """

    def __init__(self, kind: str, m_h: Tensor | None, m_w: Tensor | None, shape: tuple[int, int],
                 eigenvalues: Tensor | None = None) -> None:
        self.kind = kind
        self.m_h = m_h
        self.m_w = m_w
        self.shape = (int(shape[0]), int(shape[1]))
        self.eigenvalues = eigenvalues
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"SeparableBasis(kind={self.kind!r}, shape={self.shape})"

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def dct(cls, h: int, w: int | None = None) -> "SeparableBasis":
        """Orthonormal DCT-II basis (Neumann boundary; the project default). Row (k, l) has ω = (πk/H, πl/W)."""
        w = h if w is None else w
        return cls("dct", _dct_matrix_f64(h), _dct_matrix_f64(w), (h, w))

    @classmethod
    def identity(cls, h: int, w: int | None = None) -> "SeparableBasis":
        """Pixel basis: forward/inverse return the input unchanged (no copy, no matmul)."""
        w = h if w is None else w
        return cls("identity", None, None, (h, w))

    @classmethod
    def toeplitz_eig(cls, h: int, w: int | None = None, sigma: float = 0.4,
                     zero: float = 0.03) -> "SeparableBasis":
        """Official blur-diffusion basis (§1.2, code ``Deblurring``): eigenbasis of the 1-D zero-boundary
        Toeplitz blur ``H[i, j] = g[j - i + n - 1]`` with ``g = gaussian_kernel_1d(2n-1, σ)``.

        Eigenvalues are sorted descending (as ``torch.svd`` in the official code; index 0 = smoothest
        vector), clamped to ``>= zero`` (official ``ZERO = 3e-2``), and ``eigenvalues[k, l] =
        min(λ_k λ_l, 1)``. Differences from the official code, both negligible: H is built exactly symmetric
        (the official loop drops the tap H[0, n-1] ~ e^-12000), and eigenvectors get a deterministic sign
        (largest-magnitude entry positive). The channel-layout quirk (§0 finding 2) is NOT reproduced here.
        """
        w = h if w is None else w
        vh, lh = _toeplitz_eig_1d(h, sigma)
        vw, lw = _toeplitz_eig_1d(w, sigma)
        lh, lw = lh.clamp_min(zero), lw.clamp_min(zero)
        d = (lh[:, None] * lw[None, :]).clamp_max(1.0)
        return cls("toeplitz_eig", vh, vw, (h, w), eigenvalues=d)

    # -- application ----------------------------------------------------------------------------------
    def matrices(self, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(M_h, M_w) cast to ``dtype``/``device`` (cached)."""
        if self.m_h is None or self.m_w is None:
            raise RuntimeError("the identity basis has no matrices; call forward/inverse instead")
        key = (dtype, torch.device(device if device is not None else "cpu"))
        if key not in self._cache:
            self._cache[key] = (self.m_h.to(dtype=dtype, device=key[1]), self.m_w.to(dtype=dtype, device=key[1]))
        return self._cache[key]

    def _check(self, x: Tensor) -> None:
        _check_float(x)
        if tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"basis built for (H, W) = {self.shape} but the input has spatial shape "
                             f"{tuple(x.shape[-2:])}; build the basis for the image size you use")

    def forward(self, x: Tensor) -> Tensor:
        """Pixels -> coefficients: u = M_h x M_w^T on the last two dims."""
        self._check(x)
        if self.kind == "identity":
            return x
        mh, mw = self.matrices(x.dtype, x.device)
        return mh @ x @ mw.T

    def inverse(self, u: Tensor) -> Tensor:
        """Coefficients -> pixels: x = M_h^T u M_w on the last two dims."""
        self._check(u)
        if self.kind == "identity":
            return u
        mh, mw = self.matrices(u.dtype, u.device)
        return mh.T @ u @ mw

    __call__ = forward


@lru_cache(maxsize=None)
def _toeplitz_eig_1d(n: int, sigma: float) -> tuple[Tensor, Tensor]:
    """Rows = eigenvectors of the zero-boundary Toeplitz blur, eigenvalues descending (float64)."""
    g = gaussian_kernel_1d(2 * n - 1, sigma)
    idx = torch.arange(n)
    hmat = g[(idx[None, :] - idx[:, None]) + n - 1]
    lam, v = torch.linalg.eigh(hmat)  # ascending, columns
    lam, v = lam.flip(0), v.flip(1)
    rows = v.T.contiguous()
    pivot = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    rows = rows * torch.sign(pivot)
    return rows, lam
