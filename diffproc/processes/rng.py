"""Randomness in one place: per-sample seeds and generators, and the noise draws every process makes.

Sample ``i`` of a sampling run draws all its noise from ``(seed, i)`` alone (:func:`sample_seed`,
:class:`PerSampleGenerator`, EDM's per-seed generators), so images and metrics do not depend on the batch size
or the number of ranks; training batch ``b`` of rank ``r`` reseeds from ``(seed, r, b)``
(:func:`train_batch_seed`), so a resumed run draws what the uninterrupted one drew. The noise helpers
(:func:`randn`, :func:`rand`, :func:`randn_like`) take a ``torch.Generator``, a :class:`PerSampleGenerator` or
``None`` (the global RNG). Pure torch and arithmetic: processes, samplers, methods and interop import it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def train_batch_seed(seed: int, rank: int, batch: int) -> int:
    """A 64-bit seed for training batch ``batch`` of DDP rank ``rank`` in a run seeded with ``seed``
    (a linear mix with SplitMix64's odd constants: neighbouring batches, ranks and seeds get unrelated
    streams)."""
    return (seed * 0x9E3779B97F4A7C15 + (rank + 1) * 0xBF58476D1CE4E5B9 + batch * 0x94D049BB133111EB) % 2**64


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global generators a step on ``device`` draws from: the CPU's, and the device's own. The same
    streams as ``torch.manual_seed(seed)`` for that step, which also seeds every other backend's generators and
    costs ~0.1–0.5 ms, a third of the framework's per-step overhead on a small CPU model (benchmarks/overhead.py)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()] \
            .manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run with base seed ``seed`` (a 64-bit mix of the pair, so
    nearby (seed, index) pairs never share a stream)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


class PerSampleGenerator:
    """Per-sample randomness (EDM's per-seed generators): row ``j`` of every draw comes from its own
    ``torch.Generator`` seeded by :func:`sample_seed` ``(seed, indices[j])``. A sample therefore gets the
    same noise (prior and every step's noise) whatever the batch it is drawn in and whatever the number
    of ranks. Pass it wherever a process takes ``generator``; the noise helpers below dispatch on it.
    """

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, i))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self, fn, shape: tuple[int, ...], **kw) -> Tensor:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"PerSampleGenerator for {len(self.generators)} samples asked for a draw of shape "
                             f"{tuple(shape)}; the first dimension must be the batch")
        return torch.stack([fn(tuple(shape[1:]), generator=g, device=self.device, **kw) for g in self.generators])

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.randn, shape, dtype=dtype)

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.rand, shape, dtype=dtype)


def seeded_generator(num: int, seed: int | None = None, indices=None, generator=None,
                     device: torch.device | str = "cpu"):
    """The randomness of one sampling call of ``num`` samples: with ``seed``, a
    :class:`PerSampleGenerator` for ``indices`` (default ``0..num-1``); otherwise ``generator`` as given."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either seed (per-sample noise) or generator, not both")
    idx = list(range(num)) if indices is None else [int(i) for i in indices]
    if len(idx) != num:
        raise ValueError(f"{len(idx)} indices for {num} samples")
    return PerSampleGenerator(seed, idx, device)


def randn(shape, generator=None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard-normal draw of ``shape`` on ``device`` from a ``torch.Generator`` (drawn on its device,
    then moved), a :class:`PerSampleGenerator` (one stream per sample) or the global RNG (``None``)."""
    shape = tuple(shape)
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape, generator=None, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) draw; same generator rules as :func:`randn`."""
    shape = tuple(shape)
    if isinstance(generator, PerSampleGenerator):
        return generator.rand(shape, dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """``torch.randn_like`` that honours a generator (see :func:`randn`)."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator, x.device, x.dtype)
