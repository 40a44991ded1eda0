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

__all__ = [
    "SeparableBasis",
    "dct2",
    "dct_frequencies",
    "dct_matrix",
    "gaussian_kernel_1d",
    "heat_blur",
    "idct2",
    "kernel_spectrum",
]
