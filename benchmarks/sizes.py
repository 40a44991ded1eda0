"""The options every training benchmark shares: device, image and batch size, and the UNet's shape (default:
the quickstart's 1.06M-parameter UNet at 16×16, batch 64)."""

from __future__ import annotations

import argparse

import torch


def add_size_args(p: argparse.ArgumentParser) -> None:
    """``--device --image-size --batch-size --widths --layers --attention``."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64], help="default: the quickstart UNet")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--attention", type=int, nargs="*", default=[])
