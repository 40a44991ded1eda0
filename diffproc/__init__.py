"""diffproc: Lightning framework for image diffusion models with non-standard forward processes.

Subpackages are imported lazily (``import diffproc.methods.base``) so that importing one room never
pulls in another.
"""

__version__ = "0.2.0"
