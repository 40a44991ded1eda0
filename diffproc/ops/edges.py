"""EPDM edge map and Perona–Malik diffusivity (methods_gddm_epdm.md §1.2, §1.3; paper Eqs. 9–11).

The official ``compute_gradient``: Sobel cross-correlation of the channel SUM with 'same' zero padding in
float64, squared magnitude, divided by the max over the whole batch. Here the normalisation and padding are
options; the default ``image_max`` (per-image max) keeps the process batch-independent, ``batch_max`` is the
bit-faithful choice.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SOBEL_X", "SOBEL_Y", "edge_map", "perona_malik"]

#: Cross-correlation kernels exactly as in the official code (F.conv2d does not flip).
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def edge_map(
    x: Tensor,
    norm: Literal["image_max", "batch_max", "none"] = "image_max",
    padding: Literal["zeros", "replicate"] = "zeros",
    eps: float = 1e-12,
) -> Tensor:
    """G(x): squared Sobel magnitude of Σ_c x[:, c], normalised to [0, 1]. (B, C, H, W) -> (B, 1, H, W).

    - ``norm``: ``image_max`` divides by each image's max, ``batch_max`` by the max of the whole batch
      (official), ``none`` returns gx² + gy² unnormalised.
    - ``padding``: ``zeros`` (official 'same' conv: image borders show up as edges) or ``replicate``
      (no border edges).
    - ``eps``: the divisor is max(·, eps), so a constant image gives 0 instead of the official NaN.
    Computed in float64, returned in ``x.dtype``.
    """
    if x.dim() != 4 or not torch.is_floating_point(x):
        raise ValueError(f"edge_map expects a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    s = x.to(torch.float64).sum(dim=1, keepdim=True)
    if padding == "zeros":
        s = F.pad(s, (1, 1, 1, 1))
    elif padding == "replicate":
        s = F.pad(s, (1, 1, 1, 1), mode="replicate")
    else:
        raise ValueError(f"edge_map padding must be 'zeros' or 'replicate', got {padding!r}")
    k = torch.tensor([SOBEL_X, SOBEL_Y], dtype=torch.float64, device=x.device).unsqueeze(1)  # (2,1,3,3)
    gxy = F.conv2d(s, k)
    mag = (gxy**2).sum(dim=1, keepdim=True)
    if norm == "image_max":
        mag = mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(eps)
    elif norm == "batch_max":
        mag = mag / mag.max().clamp_min(eps)
    elif norm != "none":
        raise ValueError(f"edge_map norm must be 'image_max', 'batch_max' or 'none', got {norm!r}")
    return mag.to(x.dtype)


def perona_malik(g: Tensor, lam: float | Tensor) -> Tensor:
    """Perona–Malik coefficient in EPDM's form c = 1 / sqrt(1 + G/λ) (paper Eq. 9), G the normalised
    squared edge magnitude. c = 1 at G = 0 or λ → ∞; c → 0 as λ → 0 on edges."""
    if not isinstance(lam, Tensor):
        if not lam > 0:
            raise ValueError(f"perona_malik needs lam > 0, got {lam}")
        return torch.rsqrt(1.0 + g / lam)
    return torch.rsqrt(1.0 + g / lam.to(dtype=g.dtype, device=g.device))  # tensor λ: not checked (no host sync)
