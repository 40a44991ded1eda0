"""DataModules (LightningDataModule) for diffproc: one module per dataset, imported lazily.

``diffproc.data.ShapesDataModule`` etc. resolve on first access (PEP 562), so importing this package
pulls in nothing; ``diffproc.data.<module>.<Class>`` class paths work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ImageDataModule": "base",
    "ShapesDataModule": "shapes",
    "generate_shapes": "shapes",
    "SHAPE_CLASSES": "shapes",
    "CIFAR10DataModule": "cifar10",
    "CelebADataModule": "celeba",
    "LSUNDataModule": "lsun",
    "AFHQDataModule": "afhq",
    "ImageFolderDataModule": "folder",
    "MNISTDataModule": "mnist",
    "FashionMNISTDataModule": "mnist",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
