"""Shared numerics (pure torch): orthonormal DCT-II and separable bases, kernel spectra, finite
differences, the Neumann Poisson solver, the Sobel edge map and the Perona–Malik diffusivity.

Specs: methods_blur_sie_baselines.md §1.2; methods_gddm_epdm.md §1.2, §2.2, §2.3, §2.8.
Only torch is imported here (no other diffproc room).
"""

from diffproc.ops.dct import (
    SeparableBasis,
    dct2,
    dct_frequencies,
    dct_matrix,
    gaussian_kernel_1d,
    heat_blur,
    idct2,
    kernel_spectrum,
)
from diffproc.ops.edges import SOBEL_X, SOBEL_Y, edge_map, perona_malik
from diffproc.ops.finite_diff import (
    GRAD_NOISE_SCALE,
    curl,
    grad,
    grad_adjoint,
    laplacian,
    laplacian_noise_scale,
    neumann_eigenvalues,
    split_gradient,
)
from diffproc.ops.poisson import poisson_from_gradient, poisson_from_laplacian, screened_poisson

__all__ = [
    "GRAD_NOISE_SCALE",
    "SOBEL_X",
    "SOBEL_Y",
    "SeparableBasis",
    "curl",
    "dct2",
    "dct_frequencies",
    "dct_matrix",
    "edge_map",
    "gaussian_kernel_1d",
    "grad",
    "grad_adjoint",
    "heat_blur",
    "idct2",
    "kernel_spectrum",
    "laplacian",
    "laplacian_noise_scale",
    "neumann_eigenvalues",
    "perona_malik",
    "poisson_from_gradient",
    "poisson_from_laplacian",
    "screened_poisson",
    "split_gradient",
]
