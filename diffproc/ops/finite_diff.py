"""Finite differences with Neumann (zero-flux) boundary, their adjoint, the 5-point Laplacian and the
discrete curl (methods_gddm_epdm.md §2.2).

Layout: images ``(..., C, H, W)``; gradient fields ``(..., 2C, H, W)`` with all u (horizontal) channels
first, then all v (vertical) channels. Entries that are structurally zero (u at j = W-1, v at i = H-1) are
ignored by :func:`grad_adjoint` and :func:`curl`, so noise placed there is harmless.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRAD_NOISE_SCALE",
    "LaplacianStencil",
    "grad",
    "grad_adjoint",
    "laplacian",
    "curl",
    "neumann_eigenvalues",
    "laplacian_noise_scale",
    "split_gradient",
]

LaplacianStencil = Literal["5point", "5point_quarter"]

#: White-noise scale of a forward difference: sqrt(Σ w²) = sqrt(1² + 1²) (§2.4, the paper's "√2").
GRAD_NOISE_SCALE: float = math.sqrt(2.0)

_LAPLACIAN_SCALE = {"5point": 1.0, "5point_quarter": 0.25}


def _check_stencil(stencil: str) -> float:
    if stencil not in _LAPLACIAN_SCALE:
        raise ValueError(f"unknown Laplacian stencil {stencil!r}; use one of {sorted(_LAPLACIAN_SCALE)}")
    return _LAPLACIAN_SCALE[stencil]


def laplacian_noise_scale(stencil: LaplacianStencil = "5point") -> float:
    """sqrt(Σ w²) of the stencil: √20 for the 5-point stencil, √5/2 for the ¼-scaled one (§2.4)."""
    s = _check_stencil(stencil)
    return math.sqrt(20.0) * s


def _check_image(x: Tensor, name: str = "x") -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"{name} must be (..., C, H, W), got shape {tuple(x.shape)}")


def grad(x: Tensor) -> Tensor:
    """D x: forward differences, Neumann boundary. (..., C, H, W) -> (..., 2C, H, W) [u channels, v channels].

    (D_u x)[i, j] = x[i, j+1] - x[i, j] (0 at j = W-1); (D_v x)[i, j] = x[i+1, j] - x[i, j] (0 at i = H-1).
    """
    _check_image(x)
    du = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    dv = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return torch.cat([du, dv], dim=-3)


def split_gradient(g: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 2C, H, W) -> (g_u, g_v), each (..., C, H, W)."""
    _check_image(g, "g")
    if g.shape[-3] % 2:
        raise ValueError(f"a gradient field has an even channel count (2C), got {g.shape[-3]}")
    c = g.shape[-3] // 2
    return g[..., :c, :, :], g[..., c:, :, :]


def grad_adjoint(g: Tensor) -> Tensor:
    """Dᵀ g (§2.2): (Dᵀg)[i,j] = g_u[i,j-1][j≥1] - g_u[i,j][j≤W-2] + g_v[i-1,j][i≥1] - g_v[i,j][i≤H-2]."""
    gu, gv = split_gradient(g)
    gu = gu[..., :, :-1]
    gv = gv[..., :-1, :]
    return F.pad(gu, (1, 0)) - F.pad(gu, (0, 1)) + F.pad(gv, (0, 0, 1, 0)) - F.pad(gv, (0, 0, 0, 1))


def laplacian(x: Tensor, stencil: LaplacianStencil = "5point") -> Tensor:
    """5-point Laplacian with replicate padding (= -DᵀD, Neumann; Σ_ij (Lx)_ij = 0). ``5point_quarter``
    returns L/4."""
    _check_image(x)
    scale = _check_stencil(stencil)
    lead = x.shape[:-2]
    p = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate").reshape(*lead, *(s + 2 for s in x.shape[-2:]))
    lap = p[..., 1:-1, 2:] + p[..., 1:-1, :-2] + p[..., 2:, 1:-1] + p[..., :-2, 1:-1] - 4.0 * x
    return lap * scale if scale != 1.0 else lap


def curl(g: Tensor) -> Tensor:
    """Discrete curl on the (H-1)(W-1) plaquettes: g_u[i,j] + g_v[i,j+1] - g_u[i+1,j] - g_v[i,j].

    (..., 2C, H, W) -> (..., C, H-1, W-1). Zero iff g (with zero structural entries) is a gradient D x.
    """
    gu, gv = split_gradient(g)
    return gu[..., :-1, :-1] + gv[..., :-1, 1:] - gu[..., 1:, :-1] - gv[..., :-1, :-1]


def neumann_eigenvalues(
    h: int, w: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """(H, W) eigenvalues of DᵀD in the orthonormal DCT-II basis: λ_kl = 4 sin²(πk/2H) + 4 sin²(πl/2W)."""
    k = torch.arange(h, dtype=torch.float64)
    l = torch.arange(w, dtype=torch.float64)
    lam = 4 * torch.sin(math.pi * k / (2 * h))[:, None] ** 2 + 4 * torch.sin(math.pi * l / (2 * w))[None, :] ** 2
    return lam.to(dtype=dtype, device=device)
