"""SDEdit (Meng et al. 2022) for every diffproc method: guided generation from a stroke painting.

EPDM's stroke-guided generation (spec methods_gddm_epdm.md §1.8) is SDEdit on its own process: noise
the guide to a hijack time ``t0`` with the process's closed-form forward marginal (EPDM: σ from the
*guide's* edge map), then run the method's reverse process from ``t0`` down. Nothing here is specific
to a process, so the DDPM baseline (or any method) runs the same comparison with the same command.

Hijack time: ``t0 = strength · t_max`` in the process's own time units, ``t_max`` the first time of the
full chain (T for DDPM/EPDM; rounded for integer grids); ``strength = 0`` returns the guide, ``strength = 1`` starts
from the (almost pure-noise) top of the chain. [recon] default ``strength = 0.5`` (§1.8: t0 = T/2).

The loop itself is pure and lives with the other loops: :func:`diffproc.samplers.hijack_grid` and
:func:`diffproc.samplers.sdedit_loop`. What stays here is the module glue: :func:`sdedit` runs them with a
:class:`~diffproc.methods.base.DiffusionModule`'s network and decoding, :func:`sdedit_predict_step` writes the PNGs.
Room ``methods``: imports ``samplers`` and ``processes``, never ``callbacks``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffproc.processes.rng import PerSampleGenerator, seeded_generator
from diffproc.samplers import SampleResult, SamplingSpec, hijack_grid, sdedit_loop


@torch.no_grad()
def sdedit(module, guides: Tensor, spec: Optional[SamplingSpec] = None, t0: Any = None,
           generator: Optional[torch.Generator] = None, use_ema: bool = True) -> SampleResult:
    """Stroke-guided generation with a :class:`~diffproc.methods.base.DiffusionModule`.

    ``guides``: images in [-1, 1], NCHW, at the model's resolution. ``spec``: sampling spec over the module's
    default: its ``strength`` is the hijack point (see :func:`hijack_grid`; default 0.5), ``num_steps`` the
    sampling steps of the full chain before truncation, ``solver``/``time_grid``... as in sampling. ``t0``: an
    explicit hijack time in the process's units instead of ``strength`` (Python only). Noise: as in
    :meth:`~diffproc.methods.base.DiffusionModule.sample`, guide ``i`` draws it from ``(seed, i)`` (the spec's seed),
    unless a ``generator`` is given instead. Returns the
    :class:`~diffproc.samplers.SampleResult` with ``images`` in [-1, 1] (clamped) and the NFE spent.
    """
    if guides.ndim != 4 or guides.shape[1] != module.channels or guides.shape[-1] != module.image_size \
            or guides.shape[-2] != module.image_size:
        raise ValueError(f"SDEdit guides must be (N, {module.channels}, {module.image_size}, {module.image_size}) "
                         f"to match the model, got {tuple(guides.shape)}")
    process = module.process
    run = module.sampling_spec(spec, sdedit=True)
    explicit_seed = spec is not None and SamplingSpec.of(spec).seed is not None
    generator = seeded_generator(len(guides), run.seed if generator is None or explicit_seed else None, None,
                                 generator, module.device)
    grid = hijack_grid(process, None if t0 is not None else run.strength, t0, run.num_steps, run.time_grid)
    net = module.sampling_net if use_ema else module.unet
    was_training = net.training
    net.eval()
    try:
        z_g = process.to_domain(guides.to(module.device, torch.float32))
        res = sdedit_loop(process, module.denoiser(net), z_g, grid, run.solver, generator, run.ddim_eta)
    finally:
        net.train(was_training)
    res.images = module.decode(res.sample).clamp(-1, 1)
    return res


def _unpack(batch: Any, batch_idx: int) -> tuple[Tensor, list[str], Optional[Tensor]]:
    """Guide batch -> (guides, names, real images or None). Accepts a float tensor, an
    ``(images, names)`` pair or a dict with ``image``, ``name`` and optional ``real``."""
    real = None
    if isinstance(batch, dict):
        images, names, real = batch["image"], batch.get("name"), batch.get("real")
    elif isinstance(batch, Tensor):
        images, names = batch, None
    else:
        images, names = batch[0], (batch[1] if len(batch) > 1 else None)
    if names is None:
        names = [f"{batch_idx:04d}_{i:03d}" for i in range(len(images))]
    elif isinstance(names, Tensor):
        names = [f"{int(n):06d}" for n in names]
    return images, [str(n) for n in names], real


def sdedit_predict_step(module, batch: Any, batch_idx: int) -> Tensor:
    """``predict_step`` for guide batches: SDEdit, then ``<name>_guide.png``, ``<name>_result.png``
    (and ``<name>_real.png`` when the guide was made from a real image) plus a side-by-side grid
    ``sdedit_grid_<batch>_rank<r>.png`` (rows: [real,] guide, result) in the predict directory.

    Options are the module's sampling spec (``model.init_args.sampling``: ``strength``, default 0.5, ``num_steps``,
    ``solver``, ``time_grid``, ``ddim_eta``, ``seed``; on the command line of ``cli.py predict`` they override the
    checkpoint's). Guide batches that carry an ``index`` (the strokes datasets do) give guide ``i`` its noise from
    ``(seed, i)``: the results do not depend on the batch size or the number of ranks.
    """
    images, names, real = _unpack(batch, batch_idx)
    seed = module.sampling.seed
    index = batch.get("index") if isinstance(batch, dict) else None
    if index is not None:
        g = PerSampleGenerator(int(seed), [int(i) for i in index], module.device)
    else:
        g = torch.Generator(device=module.device).manual_seed(int(seed) * 1_000_003 + 7919 * batch_idx
                                                              + 104729 * module.global_rank)
    x = sdedit(module, images, generator=g).images
    out = module.predict_output_dir()
    os.makedirs(out, exist_ok=True)
    guides = images.to(x.device, x.dtype)
    cols = [guides, x] if real is None else [real.to(x.device, x.dtype), guides, x]
    for i, name in enumerate(names):
        if real is not None:
            save_image((cols[0][i] + 1) / 2, os.path.join(out, f"{name}_real.png"))
        save_image((guides[i] + 1) / 2, os.path.join(out, f"{name}_guide.png"))
        save_image((x[i] + 1) / 2, os.path.join(out, f"{name}_result.png"))
    tiles = torch.stack(cols, dim=1).flatten(0, 1)  # per image: [real,] guide, result
    save_image(make_grid((tiles + 1) / 2, nrow=len(cols) * max(1, min(4, int(math.sqrt(len(x))))), padding=1),
               os.path.join(out, f"sdedit_grid_{batch_idx:04d}_rank{module.global_rank}.png"))
    return x
