"""The preconditioning layer: what turns a backbone into the ``(x̂0, ε̂)`` a process needs (DESIGN.md, "Method").

A process never sees a network. It sees a **denoiser**, ``denoiser(z_t, t) -> (û0, ε̂)``: the estimates of the
clean state and of the noise, in the process's basis coefficients and work dtype
(:class:`~diffproc.processes.base.Denoiser`). Between the raw network and that denoiser sits one small object per
head type, in the spirit of k-diffusion's ``Denoiser`` wrappers and EDM's ``Precond`` (Karras et al. 2022,
Table 1): what the network sees, how its output becomes ``(û0, ε̂)``, and what it regresses in training.

========================  ==========================================================================================
head                      network output → ``(û0, ε̂)`` (``u_t = α_t u0 + σ_t ε`` per coordinate of the basis)
========================  ==========================================================================================
:class:`EpsHead`          ε̂ (DDPM, Ho et al. 2020 Eq. 14): ``û0 = (u_t − σ ε̂)/α``
:class:`X0Head`           x̂0: ``ε̂ = (u_t − α û0)/σ``
:class:`VHead`            ``v = α ε − σ u0`` (Salimans & Ho 2022): ``û0 = (α u − σ v)/(α²+σ²)``, ``ε̂ = (σ u + α v)/(α²+σ²)``
:class:`SigmaEpsHead`     ``σ_t ⊙ ε`` (EPDM Eq. 15): ``û0 = (u_t − o)/α``, ``ε̂ = o / σ_t(x̂0)`` (σ from the estimate)
:class:`DualHead`         ``[x̂0 | ε̂]`` on 2C channels, taken as they are (SIE §3.2)
:class:`ModeEDM`          GDDM's image view: EDM preconditioning per image DCT mode, with its σ_data spectrum
========================  ==========================================================================================

A head is an ``nn.Module`` (a submodule of :class:`~diffproc.methods.base.DiffusionModule`, ``module.precond``), so
the data statistics a head estimates (``ModeEDM``'s σ_data spectrum and colour basis) are its own buffers: computed
by one pure function (:func:`sigma_data_spectrum`), saved in and restored from the checkpoint, never written into a
process. Training: the default objective of every head is the mean squared error of its own output against its
target (:meth:`Head.residual`); a process decides how it uses it (``GaussianProcess.loss``: as it is; SIE's Eq. 12 and
GDDM's ``loss: image``: on ``(û0, ε̂)``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from diffproc.errors import ConfigError
from diffproc.ops import dct2, idct2
from diffproc.processes.base import DiffusionProcess, NetFn


class Head(nn.Module):
    """How a backbone's output becomes the process's ``(û0, ε̂)`` (module doc). Subclasses implement :meth:`split`
    and :meth:`target`; the default network input is the state itself."""

    #: the name processes and exports know the head by (``GaussianProcess.heads`` lists the ones a process takes)
    name: str = ""

    def setup(self, process: DiffusionProcess, image_size: int, channels: int) -> "Head":
        """The process and image geometry this head serves (called once by the module; heads with state build it
        here). Refuses, with ``ValueError``, a process this head cannot serve. Returns ``self``."""
        process.check_head(self.name)
        return self

    @property
    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: the constructor call that rebuilds this head (without its state)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": dict(getattr(self, "_init_args", {}))}

    def input_channels(self, process: DiffusionProcess, channels: int) -> int:
        return process.domain_channels(channels)

    def output_channels(self, process: DiffusionProcess, channels: int) -> int:
        return process.domain_channels(channels)

    def run(self, process: DiffusionProcess, net_fn: NetFn, z_t: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """The network's output at state ``z_t`` and what the head computed to build its input (``ctx``, handed back
        to :meth:`split` and :meth:`residual` so that nothing is computed twice). Default: the network sees the
        state itself; no ``ctx``."""
        return net_fn(z_t, t), None

    def split(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
        """Network output ``out`` (work dtype) at state ``z_t`` → ``(û0, ε̂)`` in basis coefficients."""
        raise NotImplementedError

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the output regresses in training (process domain, training coefficients)."""
        raise NotImplementedError

    def residual(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, z0: Tensor, noise: Tensor,
                 ctx: Any = None) -> Tensor:
        """Per-element training residual of output ``out`` (``out − target``); the head's objective is its mean
        square (:meth:`Denoiser.error`)."""
        return out - self.target(process, z0, noise, t)

    def train_time(self, process: DiffusionProcess, batch: int, generator: Optional[torch.Generator],
                   device: Any) -> Optional[Tensor]:
        """Training times, when the head has its own law (EDM's noise distribution); None = the process's."""
        return None

    #: how many training images :meth:`estimate` is given when a fit starts (heads with data statistics)
    statistics_images: int = 0

    @property
    def needs_statistics(self) -> bool:
        """True while the head's data statistics are still to be estimated (:meth:`estimate`); none by default."""
        return False

    def estimate(self, images: Tensor) -> Any:
        """Estimate the head's data statistics from training images (N, C, H, W in [−1, 1])."""
        raise ValueError(f"{type(self).__name__} has no data statistics to estimate")

    def bind(self, process: DiffusionProcess, net_fn: NetFn) -> "Denoiser":
        """The denoiser of network ``net_fn(input, t) -> output`` through this head."""
        return Denoiser(self, process, net_fn)


class Denoiser:
    """``denoiser(z_t, t) -> (û0, ε̂)`` of one network through one head, what processes and samplers call
    (:class:`~diffproc.processes.base.Denoiser`); ``error`` is the head's training error."""

    def __init__(self, head: Head, process: DiffusionProcess, net_fn: NetFn) -> None:
        self.head, self.process, self.net_fn = head, process, net_fn

    @property
    def kind(self) -> str:
        """The head's name (SIE's loss asks whether there are two heads)."""
        return self.head.name

    def raw(self, z_t: Tensor, t: Tensor) -> Tensor:
        """The network's output at ``z_t`` as the head feeds it."""
        return self.head.run(self.process, self.net_fn, z_t, t)[0]

    def __call__(self, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        p = self.process
        wd = getattr(p, "work_dtype", None) or z_t.dtype
        out, ctx = self.head.run(p, self.net_fn, z_t, t)
        return self.head.split(p, out.to(wd), z_t.to(wd), t, ctx)

    def residual(self, z_t: Tensor, t: Tensor, z0: Tensor, noise: Tensor) -> Tensor:
        """The head's training residual at ``z_t`` (:meth:`Head.residual`)."""
        out, ctx = self.head.run(self.process, self.net_fn, z_t, t)
        return self.head.residual(self.process, out, z_t, t, z0, noise, ctx)

    def error(self, z_t: Tensor, t: Tensor, z0: Tensor, noise: Tensor) -> Tensor:
        """The head's per-element training error: the residual squared."""
        return self.residual(z_t, t, z0, noise) ** 2


def _store_args(head: Head, **kwargs: Any) -> None:
    head._init_args = kwargs


class CoefficientHead(Head):
    """A head whose ``(û0, ε̂)`` is, coordinate by coordinate of the process basis, a function of the state ``u_t``,
    the output ``o`` and ``(α_t, σ_t)`` (:meth:`convert`)."""

    def split(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
        u_t = process.to_basis(z_t)
        a, s = process.coefficients(t, u_t)
        return self.convert(u_t, process.to_basis(out), a, s)

    def convert(self, u_t: Tensor, o: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class EpsHead(CoefficientHead):
    """ε prediction (DDPM). Args: min_alpha: lower bound on α in ``û0 = (u − σ ε̂)/α`` (SIE's single ε head on a
    grid that reaches α = 0, spec §5.3: 1e-4); 0 = none."""

    name = "eps"

    def __init__(self, min_alpha: float = 0.0) -> None:
        super().__init__()
        _store_args(self, min_alpha=min_alpha)
        self.min_alpha = float(min_alpha)

    def convert(self, u_t: Tensor, o: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        if self.min_alpha > 0:
            a = a.clamp_min(self.min_alpha)
        return (u_t - s * o) / a, o

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise


class X0Head(CoefficientHead):
    """Clean-state prediction."""

    name = "x0"

    def convert(self, u_t: Tensor, o: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        return o, (u_t - a * o) / s

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return z0


class VHead(CoefficientHead):
    """v prediction, ``v = α ε − σ u0`` (Salimans & Ho 2022)."""

    name = "v"

    def convert(self, u_t: Tensor, o: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        norm = a * a + s * s
        return (a * u_t - s * o) / norm, (s * u_t + a * o) / norm

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = process.coefficients(t, z0, z0 if process.data_dependent else None, train=True)
        return process.from_basis(a * process.to_basis(noise) - s * process.to_basis(z0))


class SigmaEpsHead(Head):
    """Scaled-noise prediction ``σ_t ⊙ ε`` (EPDM Eq. 15): the natural target when σ_t depends on the unknown x0.
    û0 needs only α; ε̂ divides by σ_t at the (clipped) estimate x̂0."""

    name = "sigma_eps"

    def split(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
        u_t = process.to_basis(z_t)
        a, _ = process.coefficients(t, u_t)
        o = process.to_basis(out)
        u0 = (u_t - o) / a
        x0 = process.clip(process.from_basis(u0)) if process.data_dependent else None
        return u0, o / process.coefficients(t, u_t, x0)[1]

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        _, s = process.coefficients(t, z0, z0 if process.data_dependent else None, train=True)
        return process.from_basis(s * process.to_basis(noise))


class DualHead(Head):
    """Two heads on 2C output channels, ``[x̂0 | ε̂]``, taken as they are (no division anywhere; SIE §3.2). Its own
    objective is the sum of both heads' squared errors; SIE's Eq. 12 adds its derivative term on top."""

    name = "dual"

    def output_channels(self, process: DiffusionProcess, channels: int) -> int:
        return 2 * process.domain_channels(channels)

    def split(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
        c = z_t.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"the dual head needs a network with 2C = {2 * c} output channels ([x̂0 | ε̂]); got "
                             f"{out.shape[1]}. Build the UNet with out_channels = head.output_channels(process, C).")
        return process.to_basis(out[:, :c]), process.to_basis(out[:, c:])

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return torch.cat([z0, noise], dim=1)


#: the heads by name (``GaussianProcess.heads`` names the ones a process takes; ``default_head`` its default)
HEADS: dict[str, type[Head]] = {h.name: h for h in (EpsHead, X0Head, VHead, SigmaEpsHead, DualHead)}


def make_head(head: "Head | str | dict | None", process: DiffusionProcess) -> Head:
    """A head object from an object, a name (:data:`HEADS`), a ``{class_path, init_args}`` config, or None (the
    process's ``default_head``)."""
    if isinstance(head, Head):
        return head
    if head is None:
        head = process.default_head
    if isinstance(head, str):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
        return HEADS[head]()
    path = str(head.get("class_path", ""))
    module_name, _, name = path.rpartition(".")
    cls = globals().get(name) if module_name == __name__ else None
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise ValueError(f"precond {path!r} is not a head of {__name__}")
    return cls(**dict(head.get("init_args") or {}))


def denoiser_for(process: DiffusionProcess, fn: NetFn, head: "Head | str | None" = None) -> Denoiser:
    """``fn`` (a network, or an analytic function of ``(z_t, t)`` with that head's output) as a denoiser of
    ``process`` through ``head`` (default: the process's own)."""
    h = make_head(head, process)
    return h.bind(process, fn)


# --- GDDM's image view: EDM preconditioning per image DCT mode ----------------------------------------------------
SigmaDataMode = Literal["uniform", "spectrum", "spectrum_colour"]


def sigma_data_spectrum(images: Tensor, colour: bool) -> tuple[Tensor, Optional[Tensor]]:
    """σ_data per image DCT mode of ``images`` (N, C, H, W in [−1, 1]): the RMS of their orthonormal DCT coefficients
    over images (and channels), float64 (H, W), clamped at 1e-3. ``colour``: per component of the images' principal
    colour basis Q (rows = components, largest first, each row summing to ≥ 0: the eigenvectors of the channels'
    second moments over all coefficients), (C, H, W); returns ``(spectrum, Q or None)``."""
    u = dct2(images.to(torch.float64))
    if not colour:
        return u.pow(2).mean(dim=(0, 1)).sqrt().clamp_min(1e-3), None
    flat = u.transpose(0, 1).reshape(u.shape[1], -1)
    _, vecs = torch.linalg.eigh(flat @ flat.T / flat.shape[1])
    q = vecs.flip(-1).T.contiguous()
    q = q * torch.where(q.sum(1, keepdim=True) < 0, -1.0, 1.0)
    rms = torch.einsum("dc,bchw->bdhw", q, u).pow(2).mean(dim=0).sqrt().clamp_min(1e-3)
    return rms, q


class ModeEDM(Head):
    """GDDM's image view [ours; docs/gddm.md]: the backbone sees the domain state as an image and predicts it with EDM
    preconditioning per image DCT mode (Karras et al. 2022, Table 1), each mode with its own noise level.

    The state ``z_t`` of a gradient / Laplacian process makes the image ``x̃ = image_part(z_t) = α_t x0 + σ_t c_k ε``
    per DCT mode k (``c_k`` = ``process.mode_noise_scale``: the Poisson solve's amplification of the domain noise).
    With ``σ_k = σ_t c_k`` and σ_data per mode ``σ_d,k``::

        c_in  = 1/√(α² σ_d² + σ_k²)              network input: IDCT(c_in ⊙ DCT x̃)   (unit variance per mode)
        x0:   c_skip = α σ_d²/(α² σ_d² + σ_k²),  c_out = σ_k σ_d/√(α² σ_d² + σ_k²)       (EDM)
        eps:  c_skip = 1/α,                       c_out = −σ_k/α                           (DDPM per mode, F = ε̂_k)
        x̂0 = IDCT(c_skip ⊙ DCT x̃ + c_out ⊙ DCT F),   ẑ0 = to_domain(x̂0),   ε̂ = (z_t − α ẑ0)/σ_t

    ε̂ is then exact on the parts of the state that never reach the image (curl, structural zeros, non-constant aux).

    Args:
        parameterisation: ``x0`` (EDM's ``c_skip``/``c_out``) or ``eps`` (F is the per-mode image noise).
        weighting: training error per mode on ``(x̂0 − x0)_k``: ``edm`` — ``1/c_out²`` (EDM's λ(σ) = ``α²/σ_k² +
            1/σ_d²`` for x0: the ε weight plus a floor on modes buried in noise), i.e. the squared error of F; ``snr``
            — ``α²/σ_k²`` (DDPM's ε-MSE of the per-mode image noise, whatever the parameterisation).
        sigma_data: σ_d for every mode with ``sigma_data_mode="uniform"`` (EDM's 0.5).
        sigma_data_mode: ``uniform``; ``spectrum`` — σ_d per mode = the RMS of the training images' orthonormal DCT
            coefficients (:func:`sigma_data_spectrum`, averaged over channels); ``spectrum_colour`` — per component
            of the images' principal colour basis and mode (preconditioning and loss in that basis). Estimated from
            the first ``sigma_data_images`` training images when a fit starts (:meth:`estimate`), then kept in the
            checkpoint as this head's buffers.
        time_sampling: ``process`` (the process's training-time law) or ``modes`` (EDM's noise distribution made
            per mode: half the batch uniform, half at the times where a random image mode crosses SNR 1,
            log-SNR jittered by N(0, 2²); needs a spectrum mode). [ours]
    """

    name = "mode_edm"
    #: ``time_sampling="modes"``: share of uniform times, and the std of the log-SNR jitter around a mode's crossing
    modes_uniform_share: float = 0.5
    modes_logsnr_std: float = 2.0

    def __init__(self, parameterisation: Literal["x0", "eps"] = "x0", weighting: Literal["edm", "snr"] = "edm",
                 sigma_data: float = 0.5, sigma_data_mode: SigmaDataMode = "uniform", sigma_data_images: int = 2048,
                 time_sampling: Literal["process", "modes"] = "process") -> None:
        super().__init__()
        _store_args(self, parameterisation=parameterisation, weighting=weighting, sigma_data=sigma_data,
                    sigma_data_mode=sigma_data_mode, sigma_data_images=sigma_data_images, time_sampling=time_sampling)
        for name, value, allowed in (("parameterisation", parameterisation, ("x0", "eps")),
                                     ("weighting", weighting, ("edm", "snr")),
                                     ("sigma_data_mode", sigma_data_mode, ("uniform", "spectrum", "spectrum_colour")),
                                     ("time_sampling", time_sampling, ("process", "modes"))):
            if value not in allowed:
                raise ValueError(f"ModeEDM: {name} must be one of {list(allowed)}, got {value!r}")
        if not sigma_data > 0:
            raise ValueError(f"ModeEDM: sigma_data must be > 0, got {sigma_data}")
        if time_sampling == "modes" and sigma_data_mode == "uniform":
            raise ValueError("ModeEDM: time_sampling='modes' draws times around the data's per-mode SNR crossings: "
                             "set sigma_data_mode: spectrum_colour (or spectrum).")
        self.parameterisation, self.weighting = parameterisation, weighting
        self.sigma_data, self.sigma_data_mode = float(sigma_data), sigma_data_mode
        self.sigma_data_images, self.time_sampling = int(sigma_data_images), time_sampling
        self.statistics_images = self.sigma_data_images if sigma_data_mode != "uniform" else 0
        self._ready = sigma_data_mode == "uniform"

    # --- state ----------------------------------------------------------------------------------------------
    def setup(self, process: DiffusionProcess, image_size: int, channels: int) -> "ModeEDM":
        if not hasattr(process, "mode_noise_scale") or getattr(process, "domain", None) not in ("gradient", "laplacian"):
            raise ValueError("ModeEDM (the image view) needs a GradientDomainProcess with domain 'gradient' or "
                             "'laplacian' (the hybrid state already carries the image): use EpsHead/X0Head there.")
        if self.sigma_data_mode != "uniform" and not hasattr(self, "spectrum"):
            n, c = int(image_size), int(channels)
            colour = self.sigma_data_mode == "spectrum_colour"
            self.register_buffer("spectrum", torch.zeros((c, n, n) if colour else (n, n), dtype=torch.float64))
            self.register_buffer("count", torch.tensor(0.0, dtype=torch.float64))
            if colour:
                self.register_buffer("colour_basis", torch.eye(c, dtype=torch.float64))
        return self

    @property
    def needs_statistics(self) -> bool:
        """True while a spectrum mode has no estimate yet (read from the buffer once, then cached: no host sync
        at every network evaluation)."""
        if not self._ready:
            self._ready = float(self.count) > 0
        return not self._ready

    @torch.no_grad()
    def estimate(self, images: Tensor) -> Tensor:
        """Set the σ_data spectrum (and colour basis) from ``images`` (N, C, H, W in [−1, 1]) by
        :func:`sigma_data_spectrum`; returns the spectrum."""
        if self.sigma_data_mode == "uniform":
            raise ValueError("ModeEDM.estimate needs sigma_data_mode='spectrum' or 'spectrum_colour'")
        rms, q = sigma_data_spectrum(images.to(self.spectrum.device), self.sigma_data_mode == "spectrum_colour")
        if q is not None:
            self.colour_basis.copy_(q)
        self.spectrum.copy_(rms)
        self.count.fill_(images.shape[0])
        self._ready = True
        return rms

    def mode_sigma_data(self, h: int, w: int, device: Any = None) -> Tensor | float:
        """σ_data per image DCT mode ((H, W) or (C, H, W)), or the scalar ``sigma_data``."""
        if self.sigma_data_mode == "uniform":
            return self.sigma_data
        if self.needs_statistics:
            raise ConfigError(f"sigma_data_mode={self.sigma_data_mode!r} has no spectrum yet: it is estimated from "
                             "the training images when a fit starts (or call model.precond.estimate(images)).")
        if tuple(self.spectrum.shape[-2:]) != (h, w):
            raise ValueError(f"the σ_data spectrum is {tuple(self.spectrum.shape)}, the images are {h}x{w}")
        return self.spectrum.to(device=device, dtype=torch.float64)

    def _rotate(self, x: Tensor, inverse: bool = False) -> Tensor:
        """Channels -> colour components (or back with ``inverse``); identity without a colour basis."""
        if self.sigma_data_mode != "spectrum_colour":
            return x
        q = self.colour_basis.to(device=x.device, dtype=x.dtype)
        return torch.einsum("cd,bchw->bdhw" if inverse else "dc,bchw->bdhw", q, x)

    # --- the preconditioning --------------------------------------------------------------------------------
    def input_channels(self, process: Any, channels: int) -> int:
        return channels

    def output_channels(self, process: Any, channels: int) -> int:
        return channels

    def coefficients(self, process: Any, t: Tensor, ref: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_in, c_skip, c_out)`` per DCT mode, each (B, 1, H, W) float64, and ``α`` (B, 1, 1, 1) (class doc)."""
        a, sig = process.alpha_sigma(t)
        a = a.to(torch.float64).view(-1, 1, 1, 1)
        sk = sig.to(torch.float64).view(-1, 1, 1, 1) * process.mode_noise_scale(*ref.shape[-2:], ref.device)
        sd = self.mode_sigma_data(*ref.shape[-2:], ref.device)
        var = a * a * sd * sd + sk * sk
        if self.parameterisation == "eps":
            return var.rsqrt(), (1.0 / a).expand_as(sk), -sk / a, a
        return var.rsqrt(), a * sd * sd / var, sk * sd * var.rsqrt(), a

    def run(self, process: Any, net_fn: NetFn, z_t: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        """The network sees ``IDCT(c_in ⊙ x̃)``, ``x̃ = DCT(image_part(z_t))`` (in the colour basis); ``ctx`` keeps x̃ and
        ``c_skip``, ``c_out`` for :meth:`split` and :meth:`residual` (one Poisson solve per evaluation)."""
        c_in, c_skip, c_out, _ = self.coefficients(process, t, z_t)
        u = dct2(self._rotate(process.image_part(z_t).double()))
        return net_fn(idct2(c_in * u).to(z_t.dtype), t), (u, c_skip, c_out)

    def clean_state(self, process: Any, out: Tensor, z_t: Tensor, ctx: Any) -> Tensor:
        """ẑ0 = to_domain(x̂0) for network output F at ``z_t`` (``ctx`` from :meth:`run`)."""
        u, c_skip, c_out = ctx
        x0 = self._rotate(idct2(c_skip * u + c_out * dct2(out.double())), inverse=True)
        return process.to_domain(x0).to(z_t.dtype)

    def split(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
        z0 = self.clean_state(process, out, z_t, ctx)
        a, s = process.coefficients(t, z_t)
        return z0, (z_t - a * z0) / s

    def target(self, process: Any, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError("ModeEDM's training error is per DCT mode of the image: see ModeEDM.error")

    def loss_scale(self, process: Any, t: Tensor, ref: Tensor, c_out: Optional[Tensor] = None) -> Tensor:
        """(B, 1, H, W) float64 divisor of the x̂0 error per mode (weight = its −2 power): ``c_out`` (``edm``; given,
        or computed) or ``σ_k/α`` (``snr``)."""
        if self.weighting == "snr":
            a, sig = (v.to(torch.float64).view(-1, 1, 1, 1) for v in process.alpha_sigma(t))
            return sig * process.mode_noise_scale(*ref.shape[-2:], ref.device) / a
        return c_out if c_out is not None else self.coefficients(process, t, ref)[2]

    def mode_error(self, process: Any, z0_hat: Tensor, z0: Tensor, t: Tensor,
                   c_out: Optional[Tensor] = None) -> Tensor:
        """``DCT(x̂0 − x0) / loss_scale`` per image mode (colour components with ``spectrum_colour``) of a clean-state
        estimate ``z0_hat``: for ``edm`` the error of F against its target, whose square is EDM's Eq. 8 weighting."""
        d = process.image_part(z0_hat - z0).double()
        return (dct2(self._rotate(d)) / self.loss_scale(process, t, z0, c_out)).to(z0.dtype)

    def residual(self, process: Any, out: Tensor, z_t: Tensor, t: Tensor, z0: Tensor, noise: Tensor,
                 ctx: Any = None) -> Tensor:
        """:meth:`mode_error` of the output's ẑ0. The data-free part of ε̂ is exact, so nothing else is trained."""
        return self.mode_error(process, self.clean_state(process, out, z_t, ctx), z0, t, ctx[2])

    def train_time(self, process: Any, batch: int, generator: Optional[torch.Generator],
                   device: Any) -> Optional[Tensor]:
        """``modes``: with probability ``modes_uniform_share`` the process's uniform t, else the t whose log-SNR is
        nearest to ``2 log(c_k/σ_d,k) + modes_logsnr_std·n``, n ~ N(0, 1), for a uniformly drawn image mode (and
        colour component) k: the times at which the data's modes cross SNR 1, where the sampler decides them
        (as :func:`~diffproc.processes.gradient_stats.mode_snr_crossing` measures them)."""
        if self.time_sampling == "process":
            return None
        dev = generator.device if generator is not None else torch.device(device or "cpu")
        sd = self.mode_sigma_data(*self.spectrum.shape[-2:], dev)
        crossing = (2 * (process.mode_noise_scale(*sd.shape[-2:], dev) / sd).log()).flatten()
        k = torch.randint(0, crossing.numel(), (batch,), generator=generator, device=dev)
        target = crossing[k] + self.modes_logsnr_std * torch.randn(batch, generator=generator, device=dev,
                                                                   dtype=torch.float64)
        T = process.num_timesteps
        a, sig = process.alpha_sigma(torch.arange(1, T + 1, device=dev))
        logsnr = 2 * (a / sig).log()  # decreasing in t = 1..T
        t_modes = (logsnr - target[:, None]).abs().argmin(1) + 1
        t_unif = torch.randint(1, T + 1, (batch,), generator=generator, device=dev)
        use_unif = torch.rand(batch, generator=generator, device=dev) < self.modes_uniform_share
        return torch.where(use_unif, t_unif, t_modes).to(device)


HEADS[ModeEDM.name] = ModeEDM

__all__ = ["Head", "Denoiser", "EpsHead", "X0Head", "VHead", "SigmaEpsHead", "DualHead", "ModeEDM", "HEADS",
           "make_head", "denoiser_for", "sigma_data_spectrum"]
