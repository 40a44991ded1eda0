"""Exact Neumann Poisson reconstruction by the DCT (methods_gddm_epdm.md §2.3, §2.8).

The DCT-II diagonalises DᵀD with eigenvalues λ_kl (:func:`neumann_eigenvalues`), so the normal equations
DᵀD x = Dᵀ g are solved coefficient-wise. The DC (k = l = 0, λ = 0) is not determined by the field and is
supplied by the caller as the per-channel mean ``dc``.

Precision: the solve divides by λ_kl, whose smallest non-zero value is ≈ (π/n)², so float32 inputs (and
other low-precision floats) are upcast to float64 internally and the result is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffproc.ops.dct import dct2, idct2
from diffproc.ops.finite_diff import LaplacianStencil, _check_stencil, grad_adjoint, neumann_eigenvalues

__all__ = ["poisson_from_gradient", "poisson_from_laplacian", "screened_poisson"]


def _work_dtype(x: Tensor) -> torch.dtype:
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return torch.float64 if x.dtype != torch.float64 else x.dtype


def _set_dc(coef: Tensor, dc: float | Tensor) -> Tensor:
    """Set the DCT DC coefficient so that the spatial mean of each (..., C) image equals ``dc``."""
    h, w = coef.shape[-2:]
    dc_t = torch.as_tensor(dc, dtype=coef.dtype, device=coef.device)
    try:
        dc_t = torch.broadcast_to(dc_t, coef.shape[:-2])
    except RuntimeError as e:
        raise ValueError(f"dc of shape {tuple(dc_t.shape)} does not broadcast to the (..., C) = "
                         f"{tuple(coef.shape[:-2])} of the output; pass a scalar, (C,) or (B, C)") from e
    coef = coef.clone()
    coef[..., 0, 0] = math.sqrt(h * w) * dc_t
    return coef


def _solve(rhs_coef: Tensor, dc: float | Tensor, sign: float = 1.0) -> Tensor:
    h, w = rhs_coef.shape[-2:]
    lam = neumann_eigenvalues(h, w, rhs_coef.dtype, rhs_coef.device).clone()
    lam[0, 0] = 1.0  # placeholder: the DC is set explicitly below
    return idct2(_set_dc(sign * rhs_coef / lam, dc))


def poisson_from_gradient(g: Tensor, dc: float | Tensor = 0.0) -> Tensor:
    """x = argmin_x ‖D x − g‖² subject to mean(x) = dc, per channel (§2.3).

    ``g``: (..., 2C, H, W) gradient field (u channels then v channels, :func:`grad` layout). ``dc``: scalar,
    (C,) or (B, C) per-channel means. For a non-integrable g this is the orthogonal projection onto gradient
    fields (D x_LS is idempotent under re-projection). Returns (..., C, H, W) in ``g.dtype``.
    """
    wd = _work_dtype(g)
    rhs = dct2(grad_adjoint(g.to(wd)))
    dc = dc.to(wd) if isinstance(dc, Tensor) else dc
    return _solve(rhs, dc).to(g.dtype)


def poisson_from_laplacian(lap: Tensor, dc: float | Tensor = 0.0, stencil: LaplacianStencil = "5point") -> Tensor:
    """x with L x = ℓ (least squares: the mean of ℓ is dropped) and mean(x) = dc, per channel (§2.3).

    ``lap``: (..., C, H, W) Laplacian of :func:`laplacian` with the same ``stencil``. Returns ``lap.dtype``.
    """
    scale = _check_stencil(stencil)
    wd = _work_dtype(lap)
    rhs = dct2(lap.to(wd)) / scale
    dc = dc.to(wd) if isinstance(dc, Tensor) else dc
    return _solve(rhs, dc, sign=-1.0).to(lap.dtype)


def screened_poisson(g: Tensor, x_img: Tensor, mu: float = 2.0) -> Tensor:
    """argmin_x ‖D x − g‖² + μ ‖x − x_img‖² (§2.8, hybrid GDDM; our interpretation [recon]).

    DCT-diagonal: X_kl = (DCT(Dᵀg)_kl + μ X_img,kl) / (λ_kl + μ). The DC comes from ``x_img`` (for
    μ > 0 the mean of the result equals the mean of x_img). μ = s_g² = 2 is the inverse-variance weight under
    equal unit noise. ``g``: (..., 2C, H, W); ``x_img``: (..., C, H, W). Returns ``g.dtype``.
    """
    if not mu > 0:
        raise ValueError(f"screened_poisson needs mu > 0 (mu = 0 is poisson_from_gradient), got {mu}")
    wd = _work_dtype(g)
    h, w = g.shape[-2:]
    rhs = dct2(grad_adjoint(g.to(wd))) + mu * dct2(x_img.to(wd))
    lam = neumann_eigenvalues(h, w, wd, g.device)
    return idct2(rhs / (lam + mu)).to(g.dtype)
