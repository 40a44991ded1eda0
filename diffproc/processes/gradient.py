"""GDDM / LDDM / hybrid: DDPM in the gradient, Laplacian or image+gradient domain (Gong, arXiv 2309.01875;
implementable spec: methods_gddm_epdm.md §2.4-2.9).

The seed gives ``∇x_t = sqrt(γ_t)∇x0 + sqrt(2(1−γ_t))ε`` ("direct" i.i.d. noise in the gradient domain) and
"Δε = sqrt(5/2)ε" for the Laplacian. Normalising the domain data by the stencil's white-noise scale
``s = sqrt(Σw²)`` turns both into plain DDPM on the normalised field (§2.4)::

    z0 = T x0 / s,   z_t = sqrt(γ_t) z0 + sqrt(1−γ_t) ε        (γ_t = ᾱ_t of DDPM)

so this process *is* :class:`~diffproc.processes.ddpm.DDPMProcess` on 2C (gradient), C (Laplacian) or 3C
(hybrid ``[x, Dx/s_g]``) channels, plus C auxiliary DC channels for ``dc_mode="aux"``. Only the domain
maps, the operator-noise option, the per-channel clip box and the optional projection are added here.

Channel layout of a domain state (all normalised):
  gradient  ``[D_u x/s_g (C), D_v x/s_g (C), aux (C, if dc_mode="aux")]``
  laplacian ``[L x/s_L (C), aux (C, if dc_mode="aux")]``
  hybrid    ``[x (C), D_u x/s_g (C), D_v x/s_g (C)]``   (our reading (a) of "hybrid", §2.8 [recon])

Everything except the seed's two noise equations and the Neumann Poisson reconstruction is a
reconstruction [recon] and therefore a constructor option. The paper's measurements of these domains
(sparsity, SNR crossing, integrability, §2.4/§2.9) are in :mod:`diffproc.processes.gradient_stats`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from diffproc.ops import (
    GRAD_NOISE_SCALE,
    dct2,
    idct2,
    grad,
    laplacian,
    laplacian_noise_scale as stencil_noise_scale,
    poisson_from_gradient,
    poisson_from_laplacian,
    screened_poisson,
)
from diffproc.ops.finite_diff import _check_stencil, neumann_eigenvalues
from diffproc.processes.base import Denoiser
from diffproc.processes.ddpm import DDPMProcess, Schedule, Spacing
from diffproc.processes.gaussian import Variance
from diffproc.processes.rng import randn, randn_like

Domain = Literal["gradient", "laplacian", "hybrid"]
NoiseKind = Literal["iid", "operator"]
DCMode = Literal["aux", "poisson_net", "dataset_mean", "oracle"]
Objective = Literal["head", "image"]

DOMAINS = ("gradient", "laplacian", "hybrid")
DC_MODES = ("aux", "poisson_net", "dataset_mean", "oracle")
OBJECTIVES = ("head", "image")


def check_options(domain: str, noise_kind: str, dc_mode: str, objective: str, clip_image: bool,
                  time_sampling: str, noise_cap: float | None) -> None:
    """Refuse, with ``ValueError``, :class:`GradientDomainProcess` options that cannot work (alone or together)."""
    for name, value, allowed in (("domain", domain, DOMAINS), ("noise_kind", noise_kind, ("iid", "operator")),
                                 ("dc_mode", dc_mode, DC_MODES), ("objective", objective, OBJECTIVES),
                                 ("time_sampling", time_sampling, ("uniform", "quad"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if clip_image and dc_mode != "aux" and domain != "hybrid":
        raise ValueError("clip_image clips the reconstructed image, which needs the DC inside the state: "
                         "use dc_mode='aux' (or domain='hybrid'), or set clip_image=False.")
    if noise_cap is not None and (noise_kind != "iid" or domain == "hybrid" or not noise_cap > 0):
        raise ValueError("noise_cap caps the Poisson amplification of the i.i.d. domain noise: it needs "
                         f"noise_kind='iid', domain='gradient' or 'laplacian' and a value > 0 (got noise_kind="
                         f"{noise_kind!r}, domain={domain!r}, noise_cap={noise_cap}); use noise_cap=None otherwise.")


class GradientDomainProcess(DDPMProcess):
    """DDPM in the gradient / Laplacian / hybrid domain with normalised stencil noise (spec §2.4-2.8).

    What the network sees and predicts is the preconditioning layer's (``model.init_args.precond``): an eps head
    on the normalised domain state (seed-literal, the default), or ``diffproc.nets.precond.ModeEDM``, which shows
    the network the state as an image and predicts it with EDM preconditioning per image DCT mode (the measured
    setting; its σ_data spectrum is that head's state). ``configs/gddm_shapes.yaml`` is the measured preset,
    ``configs/gddm_literal_shapes.yaml`` the paper's.

    Args:
        domain: ``gradient`` (GDDM, 2C field channels), ``laplacian`` (LDDM, C) or ``hybrid``
            (``[x, Dx/s_g]``, 3C; DC from the image channels, screened-Poisson reconstruction) [recon §2.8].
        noise_kind: ``iid`` — the paper's "direct" noise, i.i.d. per entry of the normalised field (the
            equivalent image process has per-frequency noise ``sqrt(s²(1−γ)/λ_k)``, §2.4); ``operator`` —
            ``z_t = T x_t / s`` with ``x_t`` the image-domain DDPM sample, i.e. noise ``T ε / s`` (exactly
            image DDPM seen through T; ablation and oracle). With ``operator`` the prior and the ancestral
            noise are drawn in the image and mapped by the same linear ``to_domain``.
        noise_cap: with ``noise_kind="iid"``, a cap on the image noise per DCT mode: ``c_k ← min(c_k, noise_cap)``
            in units of image DDPM's noise (``c_k = 1``). Only the lowest modes, where the Poisson solve
            amplifies the i.i.d. domain noise by ``s/√λ_k`` (``s/(wλ_k)`` Laplacian), are touched: the
            part of the noise that reaches those modes is scaled by ``noise_cap/c_k`` and everything else
            (the higher modes, the curl part, the DC) is the paper's i.i.d. noise (:meth:`noise_like`). Lets
            the coarse modes be decided before the fine ones (docs/gddm.md §6). None = the paper. [ours]
        dc_mode: where the per-channel mean comes from (§2.6): ``aux`` (C extra channels holding the mean,
            diffused with the field; for ``hybrid`` the image channels play that role), ``poisson_net``
            (learned by the Poisson network; :meth:`from_domain` then needs ``dc``), ``dataset_mean``
            (``dataset_mean`` below) or ``oracle`` (true mean passed as ``dc``; tests only).
        gradient_noise_scale: ``s_g``; default √2 = sqrt(Σw²) of the forward difference (the seed's √2).
        laplacian_noise_scale: ``s_L``; default sqrt(Σw²) of ``laplacian_stencil`` (√20 for the 5-point
            stencil, √5/2 for ``5point_quarter``). ``1.5811`` reproduces the seed's "√(5/2)" literally (§0.5).
        laplacian_stencil: ``5point`` or ``5point_quarter`` (= L/4).
        hybrid_mu: screened-Poisson weight μ of the image channels (default ``s_g²`` = 2, the
            inverse-variance weight under equal unit noise) [recon].
        dataset_mean: per-channel image mean (C,) for ``dc_mode="dataset_mean"`` (settable later).
        project_every_step: replace the curl part of every x̂0 prediction by 0 (gradient part projected
            by LS Poisson; Laplacian part made zero-mean). Not in the paper; off by default (§2.5).
        clip_x0: clip x̂0 per channel group to the box a clean sample can occupy (image and aux ±1,
            gradient ±2/s_g, Laplacian ±8w/s_L). Off by default (the core's ±1 clip is wrong here).
        objective: ``head`` — the preconditioning head's own objective: with the eps head the seed-literal
            ``mean ‖ε̂ − ε‖²`` over the normalised domain (as an image loss it weights DCT mode k by λ_k/s², ≈ 2e-2
            for the lowest modes at 16², 1e-3 at 64², while the Poisson solve multiplies their error by s/√λ_k, so
            the lowest image frequencies are left untrained: docs/gddm.md "Why the seed-literal setting fails");
            with ``ModeEDM`` EDM's per-mode weighting. ``image`` — the ε error measured in the image
            (:meth:`image_loss`): the part of ``ε̂ − ε`` that reaches the image goes through the exact Poisson
            solve, so every image mode counts as in image DDPM's loss, and the part that never reaches the image
            (curl, structural zeros, non-constant aux) keeps the uniform weight. [ours]
        time_sampling: training-time distribution, ``uniform`` (DDPM) or ``quad`` (t = ⌈T u²⌉). (EDM's per-mode law
            around the data's SNR crossings is ``ModeEDM(time_sampling="modes")``: it needs the data's spectrum.) [ours]
        clip_image: reconstruct x̂0 as an image, clip it to [−1, 1] and map it back (DDPM's ``clip_x0``
            seen through ``T``; it also removes the non-integrable part of x̂0). Needs the DC inside the
            state (``dc_mode="aux"`` or ``domain="hybrid"``). [ours]
        num_timesteps, schedule, beta_start, beta_end, variance, spacing, loss_reduction, default_solver: as
            :class:`DDPMProcess` (project defaults: T=1000, linear β).
    """

    x0_range = None  # the domain is not [-1, 1]; see clip_x0 / _bounds
    heads = ("eps", "x0", "v", "sigma_eps", "mode_edm")

    def __init__(self, domain: Domain = "gradient", noise_kind: NoiseKind = "iid", dc_mode: DCMode = "aux",
                 gradient_noise_scale: float | None = None, laplacian_noise_scale: float | None = None,
                 laplacian_stencil: Literal["5point", "5point_quarter"] = "5point",
                 hybrid_mu: float | None = None, dataset_mean: Sequence[float] | Tensor | None = None,
                 project_every_step: bool = False, num_timesteps: int = 1000, schedule: Schedule = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, variance: Variance = "fixedsmall",
                 spacing: Spacing = "uniform", clip_x0: bool = False,
                 loss_reduction: Literal["mean", "sum"] = "mean", default_solver: str = "ancestral",
                 objective: Objective = "head", clip_image: bool = False,
                 time_sampling: Literal["uniform", "quad"] = "uniform", noise_cap: float | None = None) -> None:
        super().__init__(num_timesteps=num_timesteps, schedule=schedule, beta_start=beta_start,
                         beta_end=beta_end, variance=variance, spacing=spacing, clip_x0=clip_x0,
                         loss_reduction=loss_reduction, default_solver=default_solver)
        check_options(domain, noise_kind, dc_mode, objective, clip_image, time_sampling, noise_cap)
        self.domain, self.noise_kind, self.dc_mode = domain, noise_kind, dc_mode
        self.laplacian_stencil = laplacian_stencil
        self.s_g = float(gradient_noise_scale) if gradient_noise_scale else GRAD_NOISE_SCALE
        self.s_l = float(laplacian_noise_scale) if laplacian_noise_scale else stencil_noise_scale(laplacian_stencil)
        self.hybrid_mu = float(hybrid_mu) if hybrid_mu is not None else self.s_g**2
        if self.hybrid_mu <= 0:
            raise ValueError(f"hybrid_mu must be > 0, got {hybrid_mu}")
        self.dataset_mean = None if dataset_mean is None else torch.as_tensor(dataset_mean, dtype=torch.float64)
        self.project_every_step = bool(project_every_step)
        self.objective, self.clip_image, self.time_sampling = objective, bool(clip_image), time_sampling
        self.noise_cap = None if noise_cap is None else float(noise_cap)

    def sample_time(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Training times. ``uniform``: t ~ U{1, …, T} (DDPM). ``quad``: t = ⌈T u²⌉, u ~ U(0, 1) (density ∝ 1/√t:
        P(t ≤ T/10) = 0.32 instead of 0.1). [ours]"""
        if self.time_sampling == "uniform":
            return super().sample_time(batch, generator, device)
        dev = generator.device if generator is not None else torch.device(device or "cpu")
        u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
        return (self.num_timesteps * u * u).ceil().clamp(1, self.num_timesteps).long().to(device)

    # --- channel bookkeeping ----------------------------------------------------------------------
    @property
    def has_aux(self) -> bool:
        """True when the state carries C auxiliary DC channels (``dc_mode="aux"``, not hybrid)."""
        return self.dc_mode == "aux" and self.domain != "hybrid"

    def _field_factor(self) -> int:
        return {"gradient": 2, "laplacian": 1, "hybrid": 3}[self.domain]

    def field_channels(self, channels: int) -> int:
        """Channels of the field part (everything but the aux DC channels)."""
        return self._field_factor() * channels

    def domain_channels(self, channels: int) -> int:
        return (self._field_factor() + int(self.has_aux)) * channels

    def image_channels(self, z: Tensor) -> int:
        """C of the images behind a domain state ``z``."""
        k = self._field_factor() + int(self.has_aux)
        if z.shape[-3] % k:
            raise ValueError(f"a {self.domain} state with dc_mode={self.dc_mode!r} has a multiple of {k} "
                             f"channels, got {z.shape[-3]}")
        return z.shape[-3] // k

    def split(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(field, aux)``; ``aux`` is None without aux channels."""
        c = self.image_channels(z)
        f = self.field_channels(c)
        return z[:, :f], (z[:, f:] if self.has_aux else None)

    def gradient_field(self, z: Tensor) -> Tensor | None:
        """Un-normalised gradient field ``ĝ`` (B, 2C, H, W) of a state, None for the Laplacian domain."""
        field, _ = self.split(z)
        if self.domain == "gradient":
            return field * self.s_g
        if self.domain == "hybrid":
            return field[:, field.shape[1] // 3:] * self.s_g
        return None

    # --- domain maps (§2.4, §2.6, §2.8) -----------------------------------------------------------
    def to_domain(self, x0: Tensor) -> Tensor:
        """Images -> normalised domain state. Linear in ``x0`` (so ``to_domain(ε)`` is the operator noise)."""
        if self.domain == "gradient":
            parts = [grad(x0) / self.s_g]
        elif self.domain == "laplacian":
            parts = [laplacian(x0, self.laplacian_stencil) / self.s_l]
        else:
            parts = [x0, grad(x0) / self.s_g]
        if self.has_aux:
            parts.append(x0.mean(dim=(-2, -1), keepdim=True).expand_as(x0))
        return torch.cat(parts, dim=1)

    def domain_dc(self, z: Tensor, dc: Tensor | float | None = None) -> Tensor | float | None:
        """The per-channel mean the reconstruction uses: ``dc`` if given, else by ``dc_mode``."""
        if dc is not None:
            return dc
        if self.dc_mode == "oracle":
            raise ValueError("dc_mode='oracle' needs the true per-channel mean: call "
                             "from_domain(z, dc=x0.mean(dim=(-2, -1))) (oracle is for tests and round trips).")
        if self.dc_mode == "dataset_mean":
            if self.dataset_mean is None:
                raise ValueError("dc_mode='dataset_mean' needs the per-channel training-set mean: pass "
                                 "dataset_mean=[m_1, ..., m_C] (images in [-1, 1]) or set process.dataset_mean.")
            return self.dataset_mean.to(device=z.device)
        if self.domain == "hybrid":
            return None  # the image channels carry it
        if self.dc_mode == "aux":
            return self.split(z)[1].mean(dim=(-2, -1))
        raise ValueError("dc_mode='poisson_net': the DC comes from the Poisson network; reconstruct with "
                         "GDDM.reconstruct/decode, or pass dc= explicitly (e.g. 0 for the zero-mean solve).")

    def from_domain(self, z: Tensor, dc: Tensor | float | None = None) -> Tensor:
        """Exact DCT reconstruction (§2.3): LS Poisson from the gradient / Laplacian part, or screened
        Poisson with the image channels for ``hybrid`` (§2.8); mean = ``dc`` (see :meth:`domain_dc`)."""
        dc = self.domain_dc(z, dc)
        field, _ = self.split(z)
        if self.domain == "gradient":
            return poisson_from_gradient(field * self.s_g, dc)
        if self.domain == "laplacian":
            return poisson_from_laplacian(field * self.s_l, dc, self.laplacian_stencil)
        c = field.shape[1] // 3
        x = screened_poisson(field[:, c:] * self.s_g, field[:, :c], self.hybrid_mu)
        if dc is None:
            return x
        dc_t = torch.as_tensor(dc, dtype=x.dtype, device=x.device)
        return x - x.mean(dim=(-2, -1), keepdim=True) + dc_t.reshape(*dc_t.shape, 1, 1)

    def image_part(self, z: Tensor) -> Tensor:
        """The image a state change ``z`` makes: the linear part of :meth:`from_domain` (DC from the aux /
        image channels, 0 without them). ``to_domain(image_part(z))`` is the orthogonal projection Π of
        ``z`` onto what reaches the image (range of ``to_domain``; for ``hybrid`` with μ = s_g²)."""
        dc = None if (self.has_aux or self.domain == "hybrid") else 0.0
        return self.from_domain(z, dc)

    # --- per-mode noise (what diffproc.nets.precond.ModeEDM preconditions with; ours) ----------------
    def mode_noise_scale(self, h: int, w: int, device=None) -> Tensor:
        """(H, W) float64 ``c_k``: std of ``image_part(ε)`` per image DCT mode for unit i.i.d. domain noise —
        ``s_g/√λ_k`` (gradient), ``s_L/(wλ_k)`` (Laplacian, w = stencil scale), 1 for the DC (aux channels).
        The equivalent image process is ``x̃_k = α_t x0_k + σ_t c_k ε_k`` (spec §2.4). With ``noise_kind="operator"``
        the state is image DDPM seen through the operator, so ``c_k = 1`` for every mode; with ``noise_cap``,
        ``min(c_k, noise_cap)`` (the DC keeps 1)."""
        if self.noise_kind == "operator":
            return torch.ones(h, w, dtype=torch.float64, device=device)
        c = self._iid_mode_scale(h, w, device)
        if self.noise_cap is not None:
            c = c.clamp(max=self.noise_cap)
            c[0, 0] = 1.0
        return c

    def _iid_mode_scale(self, h: int, w: int, device=None) -> Tensor:
        """``c_k`` of the paper's i.i.d. domain noise: ``s_g/√λ_k`` or ``s_L/(wλ_k)``, 1 for the DC."""
        lam = neumann_eigenvalues(h, w, torch.float64, device).clone()
        lam[0, 0] = 1.0
        if self.domain == "laplacian":
            c = self.s_l / (_check_stencil(self.laplacian_stencil) * lam)
        else:
            c = self.s_g / lam.sqrt()
        c[0, 0] = 1.0
        return c

    # --- training loss (§2.5; ``image`` is ours) ----------------------------------------------------
    def image_loss(self, eps_hat: Tensor, eps: Tensor) -> Tensor:
        """ε error in image units: ``reduce(x_e²) + reduce((e − T x_e)²)`` with ``e = ε̂ − ε`` and
        ``x_e = image_part(e)``.

        The first term is what image DDPM's ε-loss measures: by linearity ``x̂0 − x0 = −(σ/α) x_e``, so it
        equals ``(α/σ)² mean (x̂0 − x0)²``, the SNR-weighted image MSE of DDPM's L_simple. Per image DCT mode
        k it weights the normalised-field error by ``s²/λ_k`` (gradient) or ``s²/λ_k²`` (Laplacian) instead
        of 1. The second term is the uniform loss on the orthogonal complement (curl part, structural zeros,
        non-constant aux), which never reaches the image but keeps the sampler's states in distribution."""
        e = eps_hat - eps
        x_e = self.image_part(e)
        return self.reduce(x_e**2) + self.reduce((e - self.to_domain(x_e)) ** 2)

    def loss(self, denoiser: Denoiser, z0: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """``head``: the denoiser's own objective (the core's loss); ``image``: :meth:`image_loss` of its ε̂."""
        if self.objective == "head":
            return super().loss(denoiser, z0, t, noise, generator)
        if t is None:
            t = self.sample_time(z0.shape[0], generator, z0.device)
        if noise is None:
            noise = self.noise_like(z0, generator)
        z_t = self.forward(z0, t, noise)
        return self.image_loss(denoiser(z_t, t)[1], noise)

    # --- noise: i.i.d. (paper) or through the operator (exact image DDPM) ------------------------
    def _image_noise(self, z_shape: Sequence[int], generator, device, dtype) -> Tensor:
        b, n, h, w = z_shape
        c = n // (self._field_factor() + int(self.has_aux))
        return randn((b, c, h, w), generator, device, dtype)

    def cap_noise(self, eps: Tensor) -> Tensor:
        """``noise_cap`` applied to i.i.d. domain noise ``ε``: ``ε + to_domain(IDCT((r_k − 1) ⊙ DCT(image_part(ε))))``
        with ``r_k = min(c_k, cap)/c_k``. The image it makes has per-mode std ``min(c_k, cap)``; the part that
        never reaches the image (``ε − Πε``, independent of ``Πε``) and the modes under the cap are unchanged."""
        if self.noise_cap is None:
            return eps
        r = (self.noise_cap / self._iid_mode_scale(*eps.shape[-2:], eps.device)).clamp(max=1.0)
        r[0, 0] = 1.0  # the DC is never capped (as in mode_noise_scale)
        x = self.image_part(eps).double()
        return eps + self.to_domain(idct2((r - 1.0) * dct2(x))).to(eps.dtype)

    def noise_like(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """i.i.d. N(0, I) on the domain (with ``noise_cap``: :meth:`cap_noise` of it), or ``to_domain(ε)`` with
        image noise ε for ``noise_kind="operator"``."""
        if self.noise_kind == "iid":
            return self.cap_noise(randn_like(z, generator))
        return self.to_domain(self._image_noise(z.shape, generator, z.device, z.dtype))

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.noise_kind == "iid":
            return self.cap_noise(super().prior(shape, generator, device, dtype))
        return self.to_domain(self._image_noise(shape, generator, device, dtype))

    # --- x̂0 post-processing: per-group clip box and optional projection ---------------------------
    def _bounds(self, c: int, ref: Tensor) -> Tensor:
        """(K,1,1) per-channel bound of a clean state: |x| ≤ 1, |D x| ≤ 2, |L x| ≤ 8·w (w = stencil scale)."""
        lap = 8.0 * (0.25 if self.laplacian_stencil == "5point_quarter" else 1.0) / self.s_l
        per = {"gradient": [2.0 / self.s_g] * 2, "laplacian": [lap], "hybrid": [1.0] + [2.0 / self.s_g] * 2}[self.domain]
        if self.has_aux:
            per = per + [1.0]
        return torch.tensor(per, dtype=ref.dtype, device=ref.device).repeat_interleave(c).view(-1, 1, 1)

    def project(self, z0: Tensor) -> Tensor:
        """Remove the non-integrable part of a clean-state estimate (LS projection of the gradient part,
        zero mean of the Laplacian part); the aux / image channels are kept."""
        c = self.image_channels(z0)
        z0 = z0.clone()
        if self.domain == "laplacian":
            z0[:, :c] = z0[:, :c] - z0[:, :c].mean(dim=(-2, -1), keepdim=True)
            return z0
        lo = c if self.domain == "hybrid" else 0
        g = z0[:, lo:lo + 2 * c]
        z0[:, lo:lo + 2 * c] = grad(poisson_from_gradient(g * self.s_g, 0.0)) / self.s_g
        return z0

    def predict(self, denoiser: Denoiser, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(ẑ0, ε̂)`` with ``project_every_step``, ``clip_image`` and the per-group clip (``clip_x0``)
        applied to ẑ0 in that order (ε̂ is recomputed from the modified ẑ0 so the DDIM step stays consistent)."""
        u0, eps = denoiser(z_t, t)
        if not (self.clip_x0 or self.project_every_step or self.clip_image):
            return u0, eps
        if self.project_every_step:
            u0 = self.project(u0)
        if self.clip_image:
            u0 = self.to_domain(self.from_domain(u0).clamp(-1.0, 1.0))
        if self.clip_x0:
            b = self._bounds(self.image_channels(z_t), u0)
            u0 = torch.maximum(torch.minimum(u0, b), -b)
        a, s = self.coefficients(t, z_t)
        return u0, (z_t - a * u0) / s


__all__ = ["GradientDomainProcess", "OBJECTIVES", "DOMAINS", "DC_MODES"]
