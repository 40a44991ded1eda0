"""Measurements of GDDM / LDDM (Gong, arXiv 2309.01875; spec methods_gddm_epdm.md §2.4, §2.9), pure torch.

The paper's claims about the gradient and Laplacian domains, as numbers of a
:class:`~diffproc.processes.gradient.GradientDomainProcess` and a batch of images or states:

* :func:`sparsity` — real images are sparser in the domain than in the image (§2.9);
* :func:`snr_crossing` / :func:`image_snr_crossing` — the forward process reaches SNR < 0.01 earlier in the
  domain than image DDPM does (§2.4 "aggregate convergence");
* :func:`mode_snr_crossing` — when each image DCT mode's SNR crosses 1, i.e. where along the schedule the
  sampler decides it (coarse-to-fine or not; ours);
* :func:`integrability` — how far a (generated) state is from the range of the domain map (§2.9).

The process itself (``processes/gradient.py``) needs none of these to train or sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffproc.ops import curl, grad, laplacian, poisson_from_gradient
from diffproc.processes.gradient import GradientDomainProcess


def structural_mask(c: int, h: int, w: int, device=None, dtype=torch.float64) -> Tensor:
    """(2C, H, W) mask of the gradient entries that can be non-zero (0 at u[:, W-1] and v[H-1, :])."""
    m = torch.ones(2 * c, h, w, device=device, dtype=dtype)
    m[:c, :, -1] = 0
    m[c:, -1, :] = 0
    return m


def sparsity_stats(v: Tensor, magnitude: Tensor, delta: float) -> dict[str, float]:
    """``frac`` = P(magnitude < δ), ``kurtosis`` = excess kurtosis of the signed entries ``v``,
    ``l1_l2`` = ‖v‖₁ / (sqrt(n)‖v‖₂) (1 for constant |v|, small for sparse v) — spec §2.9."""
    v = v.double().flatten()
    c = v - v.mean()
    var = c.pow(2).mean()
    kurt = (c.pow(4).mean() / var.pow(2) - 3.0) if var > 0 else torch.tensor(float("nan"))
    l1l2 = v.abs().mean() / v.pow(2).mean().sqrt().clamp_min(1e-30)
    return {"frac": float((magnitude.double().flatten() < delta).double().mean()),
            "kurtosis": float(kurt), "l1_l2": float(l1l2)}


def snr_crossing_from_energy(energy: Tensor, alphas_bar: Tensor, threshold: float = 0.01) -> Tensor:
    """First ``t ≥ 1`` with ``γ_t·E[z0²] < threshold·(1−γ_t)`` per entry of ``energy`` (B,) (spec §2.4
    "aggregate convergence"); ``T+1`` if never reached."""
    ab = alphas_bar.to(torch.float64)[1:]  # t = 1..T
    ok = ab[None, :] * energy.double()[:, None] < threshold * (1 - ab[None, :])
    first = torch.where(ok.any(1), ok.double().argmax(1) + 1, torch.full_like(energy, len(ab) + 1, dtype=torch.long))
    return first.long()


def signal_energy(process: GradientDomainProcess, z0: Tensor) -> Tensor:
    """Per-image mean square E[z0²] of the field channels of a state (aux excluded), (B,)."""
    field, _ = process.split(z0)
    return field.double().pow(2).flatten(1).mean(1)


def snr_crossing(process: GradientDomainProcess, x0: Tensor, threshold: float = 0.01) -> Tensor:
    """Per-image first t with ``γ_t E[z0²] < threshold (1−γ_t)`` in the process's domain (spec §2.4 table)."""
    return snr_crossing_from_energy(signal_energy(process, process.to_domain(x0.double())), process.alphas_bar,
                                    threshold)


def image_snr_crossing(x0: Tensor, alphas_bar: Tensor, threshold: float = 0.01) -> Tensor:
    """The same crossing for image-domain DDPM (``E[x0²]`` per image)."""
    return snr_crossing_from_energy(x0.double().pow(2).flatten(1).mean(1), alphas_bar, threshold)


def mode_snr_crossing(process: GradientDomainProcess, sigma_data: Tensor, threshold: float = 1.0) -> Tensor:
    """Per image DCT mode k, the first ``t`` at which its SNR ``γ_t σ_d,k² / ((1−γ_t) c_k²)`` falls below
    ``threshold``: the time around which the sampler decides that mode (ours; docs/gddm.md §5). ``sigma_data``
    is the data's RMS per mode, (H, W) or (C, H, W) (``ModeEDM.spectrum``, the GDDM module's ``precond``); ``c_k`` is
    :meth:`~GradientDomainProcess.mode_noise_scale` (1 for every mode = image DDPM). ``T+1`` if never reached."""
    c = process.mode_noise_scale(*sigma_data.shape[-2:], sigma_data.device)
    energy = (sigma_data.double() / c).pow(2)
    return snr_crossing_from_energy(energy.flatten(), process.alphas_bar, threshold).view(energy.shape)


def sparsity(process: GradientDomainProcess, x0: Tensor, delta: float = 0.02) -> dict[str, float]:
    """Sparsity of real images in the process's domain vs the image domain (spec §2.9), un-normalised units:
    gradient/hybrid — ``|∇x| = sqrt(u²+v²)`` on the (H−1)(W−1) interior and the signed u, v entries;
    Laplacian — ``|Lx|``; image — ``|x − mean|``. Keys ``domain_frac``, ``domain_kurtosis``,
    ``domain_l1_l2``, ``image_frac``, ``image_kurtosis``, ``image_l1_l2``."""
    x0 = x0.double()
    if process.domain == "laplacian":
        lx = laplacian(x0, process.laplacian_stencil)
        dom = sparsity_stats(lx, lx.abs(), delta)
    else:
        g = grad(x0)
        c = x0.shape[1]
        u, v = g[:, :c, :-1, :-1], g[:, c:, :-1, :-1]
        dom = sparsity_stats(torch.cat([u.flatten(), v.flatten()]), (u * u + v * v).sqrt(), delta)
    xc = x0 - x0.mean(dim=(-2, -1), keepdim=True)
    img = sparsity_stats(xc, xc.abs(), delta)
    return {**{f"domain_{k}": v for k, v in dom.items()}, **{f"image_{k}": v for k, v in img.items()}}


def integrability(process: GradientDomainProcess, z: Tensor) -> dict[str, float]:
    """Integrability of (generated) states (spec §2.9). Gradient/hybrid: ``curl_energy = ‖curl ĝ‖/‖ĝ‖``
    and ``ls_residual = ‖D poisson(ĝ) − ĝ‖/‖ĝ‖`` on the non-structural entries (noise placed on the
    structurally-zero entries never reaches the image). Laplacian: ``ls_residual`` = relative size of the
    field's per-channel mean, the only part outside range(L). Real data gives 0."""
    field, _ = process.split(z.double())
    if process.domain == "laplacian":
        lap = field * process.s_l
        mean = lap.mean(dim=(-2, -1), keepdim=True).expand_as(lap)
        return {"ls_residual": float(mean.norm() / lap.norm().clamp_min(1e-30))}
    g = process.gradient_field(z.double())
    c = g.shape[1] // 2
    g = g * structural_mask(c, *g.shape[-2:], device=g.device)
    nrm = g.norm().clamp_min(1e-30)
    res = grad(poisson_from_gradient(g, 0.0)) - g
    return {"curl_energy": float(curl(g).norm() / nrm), "ls_residual": float(res.norm() / nrm)}


__all__ = ["image_snr_crossing", "integrability", "signal_energy", "snr_crossing", "snr_crossing_from_energy",
           "sparsity", "sparsity_stats", "structural_mask"]
