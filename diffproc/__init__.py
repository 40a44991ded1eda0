"""diffproc: Lightning framework for image diffusion models with non-standard forward processes.

Subpackages are imported lazily (``import diffproc.methods.ddpm``) so that importing one room never
pulls in another.
"""

__version__ = "0.1.0"
