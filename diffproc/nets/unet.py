"""The backbone: diffusers' ``UNet2DModel`` built from a compact config dict, loaded from a diffusers folder
(``init_from``), and its time input shifted between diffproc's and diffusers' timestep conventions (export).

Room ``nets`` (the backbone): imports ``processes`` and ``errors``, never ``methods``; ``methods`` and ``interop``
use it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from diffusers import UNet2DModel

from diffproc.errors import ConfigError
from diffproc.processes.base import DiffusionProcess
from diffproc.processes.ddpm import DDPMProcess

#: a small CPU-friendly default backbone (overridden by every paper config)
DEFAULT_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_resolutions": [],
    "dropout": 0.0,
}


def build_unet(config: Optional[dict], image_size: int, in_channels: int, out_channels: int) -> UNet2DModel:
    """diffusers ``UNet2DModel`` from a compact config dict.

    Keys: ``block_out_channels`` (one width per resolution level), ``layers_per_block``,
    ``attention_resolutions`` (feature-map sizes in pixels that get self-attention, DDPM style: e.g.
    ``[16]``), ``dropout``, ``norm_num_groups`` (default: largest of 32/16/8/4 dividing every width),
    ``attention_head_dim``; any other key is passed to ``UNet2DModel`` unchanged.
    """
    cfg = dict(DEFAULT_UNET)
    cfg.update(config or {})
    widths = list(cfg.pop("block_out_channels"))
    attn = set(int(r) for r in cfg.pop("attention_resolutions", []) or [])
    levels = len(widths)
    factor = 2 ** (levels - 1)
    if image_size % factor != 0:
        raise ConfigError(
            f"image_size={image_size} cannot go through a UNet with {levels} resolution levels "
            f"(block_out_channels={widths}): it must be divisible by {factor}. Use an image size that "
            f"is a multiple of {factor}, or fewer entries in model.unet.block_out_channels.")
    resolutions = [image_size // 2**i for i in range(levels)]
    unknown = attn - set(resolutions)
    if unknown:
        raise ConfigError(f"unet.attention_resolutions {sorted(unknown)} are not feature-map sizes of "
                          f"this UNet; available: {resolutions}")
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions]
    up = ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)]
    groups = cfg.pop("norm_num_groups", None) or next(g for g in (32, 16, 8, 4, 2, 1)
                                                      if all(w % g == 0 for w in widths))
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=tuple(widths), down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=groups, **cfg)


def diffusers_timestep_shift(process: DiffusionProcess) -> int:
    """Steps by which diffusers' timestep index trails this process's network time: 1 for DDPM/DDIM (diffusers'
    ``DDPMScheduler``/``DDIMScheduler`` call the UNet with the 0-based ``t - 1`` for diffproc's ``t`` in 1..T, at
    the same alpha-bar), 0 for every other process (no diffusers scheduler; diffproc's pipeline feeds ``model_time``
    itself). :func:`shift_time_input` moves a UNet between the two conventions (export and ``init_from``)."""
    return 1 if type(process) is DDPMProcess else 0


@torch.no_grad()
def shift_time_input(unet: UNet2DModel, shift: float) -> UNet2DModel:
    """Make ``unet(x, t)`` compute what it computed at ``t + shift`` (in place; returns ``unet``).

    The sinusoidal embedding of ``t + d`` is the embedding of ``t`` rotated by ``d * w_k`` in each (sin, cos) pair,
    a linear map R(d), so it folds into the first layer of the time MLP: ``W <- W R(d)`` (exact up to rounding).
    """
    if shift == 0:
        return unet
    if unet.config.time_embedding_type != "positional":
        raise ConfigError(f"cannot shift the time input of a UNet with time_embedding_type="
                          f"{unet.config.time_embedding_type!r}; only 'positional' (sinusoidal) embeddings fold a shift")
    proj, lin = unet.time_proj, unet.time_embedding.linear_1
    half = proj.num_channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64)
                      / (half - proj.downscale_freq_shift)) * proj.scale
    c, s = torch.diag(torch.cos(shift * freqs)), torch.diag(torch.sin(shift * freqs))
    sin_i, cos_i = slice(0, half), slice(half, 2 * half)
    if proj.flip_sin_to_cos:
        sin_i, cos_i = cos_i, sin_i
    rot = torch.eye(proj.num_channels, dtype=torch.float64)  # an odd width's zero pad stays as it is
    rot[sin_i, sin_i], rot[sin_i, cos_i], rot[cos_i, cos_i], rot[cos_i, sin_i] = c, s, c, -s
    lin.weight.copy_((lin.weight.double() @ rot).to(lin.weight.dtype))
    return unet


def load_diffusers_unet(path: str, image_size: int, in_channels: int, out_channels: int) -> UNet2DModel:
    """The ``UNet2DModel`` of a diffusers folder: a model's ``save_pretrained`` folder (``config.json`` + weights)
    or a pipeline folder with ``unet/`` (e.g. from ``python -m diffproc.interop.export``), checked against the geometry the
    process needs."""
    root = os.path.expanduser(str(path))
    sub = next((d for d in ("", "unet") if os.path.isfile(os.path.join(root, d, "config.json"))), None)
    if sub is None:
        what = "does not exist" if not os.path.exists(root) else "has no config.json (nor unet/config.json)"
        raise ConfigError(f"init_from={path} {what}: pass a diffusers model folder, as written by "
                          "UNet2DModel.save_pretrained (config.json + diffusion_pytorch_model.safetensors), or a "
                          "pipeline folder with a unet/ subfolder (python -m diffproc.interop.export).")
    cfg = UNet2DModel.load_config(root, subfolder=sub or None)
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"init_from={path}: the folder holds a {cfg['_class_name']}, diffproc's backbone is a "
                          "UNet2DModel")
    bad = [f"{k}={cfg.get(k, 3)} (this model needs {want})"
           for k, want in (("in_channels", in_channels), ("out_channels", out_channels)) if cfg.get(k, 3) != want]
    size = cfg.get("sample_size")  # None: a fully convolutional UNet of any size
    if size is not None and list([size] * 2 if isinstance(size, int) else size) != [image_size] * 2:
        bad.append(f"sample_size={size} (this model needs {image_size})")
    if bad:
        raise ConfigError(f"init_from={path}: the UNet does not fit this model: {', '.join(bad)}. Set data.image_size "
                          "/ data.channels (and the method options that set the channel counts) to the folder's, or "
                          "export a UNet of this geometry.")
    return UNet2DModel.from_pretrained(root, subfolder=sub or None).float()
