"""GDDM / LDDM / hybrid (Gong, arXiv 2309.01875): DDPM in the gradient or Laplacian domain, images back by
Poisson reconstruction (exact DCT solve or a Poisson U-Net). Spec: methods_gddm_epdm.md §2; manual: docs/gddm.md.

The diffusion itself is :class:`~diffproc.processes.gradient.GradientDomainProcess` (plain DDPM on the
normalised field). This class adds what the paper adds beyond a process: the optional Poisson network
(a second, smaller ``UNet2DModel``, a submodule so its weights are in every checkpoint), its training on
clean fields with noise augmentation and the reconstruction used by :meth:`decode`. Its diagnostics (sparsity,
integrability of generated fields, Poisson net vs DCT) are the callback
:class:`~diffproc.callbacks.gddm_diagnostics.GDDMDiagnostics` (``--gddm_diagnostics.*`` in ``cli.py``).

EMA: ``self.ema_unet`` averages the diffusion UNet only. The Poisson network has no EMA: it is a supervised
regressor trained on clean (augmented) data, evaluated with its raw weights.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffproc.errors import ConfigError
from diffproc.methods.base import DiffusionModule, as_process
from diffproc.nets.unet import build_unet
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.rng import randn_like

#: default Poisson network: about a tenth of the DDPM CelebA backbone
DEFAULT_POISSON_NET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_resolutions": [],
    "dropout": 0.0,
}

PoissonStage = Literal["separate", "joint", "poisson_only"]


def known_dc(process: GradientDomainProcess, z: Tensor, x: Optional[Tensor], dc_mean: Tensor,
             dc_known: bool) -> Optional[Tensor]:
    """The images' DC where the process cannot resolve it alone: the true images' mean (``dc_mode="oracle"``,
    needs ``x``) or ``dc_mean`` (``dataset_mean``; ``dc_known``: whether it is set or estimated); else None."""
    mode = process.dc_mode
    if mode == "oracle":
        if x is None:
            raise ConfigError("dc_mode='oracle' takes the mean of the true image and cannot generate; "
                              "use dc_mode='aux' (default), 'dataset_mean' or 'poisson_net' for sampling.")
        return x.mean(dim=(-2, -1))
    if mode == "dataset_mean":
        if not dc_known:
            raise ConfigError("dc_mode='dataset_mean' has no mean yet: set the process's dataset_mean "
                              "or train a few steps (the running mean of the training images is used).")
        return dc_mean.to(z.device, z.dtype).expand(z.shape[0], -1)
    return None


def poisson_reconstruct(process: GradientDomainProcess, z: Tensor, dc: Optional[Tensor], net: Optional[nn.Module],
                        reconstruction: str, residual: bool) -> Tensor:
    """Domain state -> image: the exact DCT solve, plus the Poisson network ``net`` where there is one (§2.7;
    ``reconstruction`` and ``residual`` as GDDM's options)."""
    dc_eff = dc if dc is not None else (0.0 if process.dc_mode == "poisson_net" else None)
    x_dct = process.from_domain(z, dc_eff)
    if net is None or (reconstruction == "dct" and dc is not None):
        return x_dct
    field = process.split(z)[0]
    dtype = next(net.parameters()).dtype
    inp = field
    if residual:
        inp = torch.cat([field, x_dct - x_dct.mean(dim=(-2, -1), keepdim=True)], dim=1)
    out = net(inp.to(dtype), torch.zeros(z.shape[0], device=z.device, dtype=dtype)).sample.to(z.dtype)
    if reconstruction == "poisson_net":
        return x_dct + out if residual else out
    return x_dct + out.mean(dim=(-2, -1), keepdim=True)  # dct shape, DC from the net


def check_gddm_options(process: GradientDomainProcess, reconstruction: str, poisson_net_stage: str) -> None:
    """Refuse, with :class:`ConfigError`, GDDM options that cannot work with each other or with ``process``."""
    if not isinstance(process, GradientDomainProcess):
        raise ConfigError(f"GDDM needs a GradientDomainProcess, got {type(process).__name__}")
    for name, value, allowed in (("reconstruction", reconstruction, ("dct", "poisson_net")),
                                 ("poisson_net_stage", poisson_net_stage, ("separate", "joint", "poisson_only"))):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if poisson_net_stage == "poisson_only" and not (reconstruction == "poisson_net" or process.dc_mode == "poisson_net"):
        raise ConfigError("poisson_net_stage='poisson_only' trains the Poisson network, but none is built: "
                          "set reconstruction='poisson_net' or the process's dc_mode='poisson_net'.")


class GDDM(DiffusionModule):
    """Gradient-domain (GDDM), Laplacian-domain (LDDM) and hybrid diffusion: a :class:`DiffusionModule` given a
    :class:`~diffproc.processes.gradient.GradientDomainProcess` (``process: {class_path:
    diffproc.processes.gradient.GradientDomainProcess, init_args: {...}}``: domain, noise kind, DC mode, schedule,
    objective, ``noise_cap``; its defaults are the seed-literal setting, the measured one is in
    ``configs/gddm_shapes.yaml``) and a preconditioning head (``precond``: the eps head on the domain state by
    default; ``diffproc.nets.precond.ModeEDM``, the image view with its σ_data spectrum, in the measured setting),
    plus what the paper adds beyond the process:

    Args:
        reconstruction: ``dct`` — exact Neumann Poisson solve (default, parameter-free); ``poisson_net`` —
            the paper's Poisson U-Net (with ``poisson_residual`` it corrects the DCT solve).
        poisson_net: UNet config of the Poisson network (:func:`~diffproc.nets.unet.build_unet` keys); built when
            ``reconstruction="poisson_net"`` or the process's ``dc_mode="poisson_net"``. Its last conv is
            zero-initialised.
        poisson_net_stage: ``separate`` (default) — this run trains the diffusion UNet only, the Poisson
            net is frozen; its own stage is a second ``fit`` with ``poisson_only``. ``joint`` — both trained
            in every step (loss = diffusion + ``poisson_loss_weight`` · Poisson MSE, own param group when
            ``poisson_lr`` is set). ``poisson_only`` — the diffusion UNet and its EMA are frozen and only the
            Poisson net trains; combine with ``init_from`` = the stage-1 checkpoint.
        poisson_residual: ``x̂ = poisson(g, dc) + P([field, poisson(g, 0)])`` (default) or ``x̂ = P(field)``.
        poisson_aug_sigma: input noise std ~ U(0, poisson_aug_sigma) on the normalised field (§2.7).
        poisson_curl_noise: extra std ~ U(0, ·) of purely non-integrable noise (0 = off).
        poisson_loss_weight, poisson_lr: joint-stage weight and learning rate (None = ``lr``).
        **kwargs: the shared options of :class:`DiffusionModule` (backbone, optimiser, EMA, sampling; ``init_from``
            may be a stage-1 checkpoint without Poisson-net keys).

    Diagnostics (sparsity, integrability, Poisson net vs DCT) are the callback ``GDDMDiagnostics``
    (``--gddm_diagnostics.*``).
    """

    def __init__(self, process: GradientDomainProcess, reconstruction: Literal["dct", "poisson_net"] = "dct",
                 poisson_net: Optional[dict] = None,
                 poisson_net_stage: PoissonStage = "separate", poisson_residual: bool = True,
                 poisson_aug_sigma: float = 0.05, poisson_curl_noise: float = 0.0,
                 poisson_loss_weight: float = 1.0, poisson_lr: Optional[float] = None, **kwargs: Any) -> None:
        process = as_process(process)
        check_gddm_options(process, reconstruction, poisson_net_stage)
        super().__init__(process=process, **kwargs)
        self.process: GradientDomainProcess
        self.reconstruction = reconstruction
        self.poisson_net: Optional[nn.Module] = None
        if reconstruction == "poisson_net" or process.dc_mode == "poisson_net":
            self.poisson_net = self._build_poisson_net(poisson_net, poisson_residual, poisson_net_stage)
        # dataset_mean: fixed when given, else a running mean of the training batches (in the checkpoint)
        mean = process.dataset_mean
        self._fixed_dc = mean is not None
        init = torch.as_tensor(mean if mean is not None else [0.0] * self.channels, dtype=torch.float64)
        if init.numel() != self.channels:
            raise ConfigError(f"dataset_mean has {init.numel()} values but the images have {self.channels} channels")
        self.register_buffer("dc_mean", init.clone())
        self.register_buffer("dc_count", torch.tensor(0.0, dtype=torch.float64))

    def _build_poisson_net(self, config: Optional[dict], residual: bool, stage: str) -> nn.Module:
        """The Poisson network (last conv zero: residual mode starts as the exact DCT solve, spec §2.10.12), frozen
        or trained by ``stage``."""
        c = self.channels
        in_ch = self.process.field_channels(c) + (c if residual else 0)
        net = build_unet(dict(DEFAULT_POISSON_NET if config is None else config), self.image_size, in_ch, c)
        with torch.no_grad():
            net.conv_out.weight.zero_()
            net.conv_out.bias.zero_()
        if stage == "separate":
            net.requires_grad_(False)
        elif stage == "poisson_only":
            self.unet.requires_grad_(False)
        return net

    init_from_optional_keys = ("poisson_net.", "dc_", "precond.")  # a stage-1 checkpoint has no Poisson network

    # --- stages ---------------------------------------------------------------------------------
    @property
    def trains_poisson(self) -> bool:
        return self.poisson_net is not None and self.hparams.poisson_net_stage in ("joint", "poisson_only")

    def update_ema(self) -> None:
        if self.hparams.poisson_net_stage != "poisson_only":  # frozen UNet: keep its EMA as loaded
            super().update_ema()

    def parameter_groups(self) -> list[dict]:
        """Joint stage with ``poisson_lr``: the Poisson network in a second group at that learning rate
        (the base's warm-up / cosine factor scales both); otherwise the base's single group."""
        lr = self.hparams.poisson_lr
        if lr is None or self.hparams.poisson_net_stage != "joint" or self.poisson_net is None:
            return super().parameter_groups()
        net = {id(p) for p in self.poisson_net.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if id(p) not in net]},
                {"params": [p for p in trainable if id(p) in net], "lr": lr}]

    # --- reconstruction -------------------------------------------------------------------------
    def _dc(self, z: Tensor, x: Optional[Tensor] = None) -> Optional[Tensor]:
        """DC for modes the process cannot resolve alone (:func:`known_dc`)."""
        known = self.process.dc_mode != "dataset_mean" or self._fixed_dc or float(self.dc_count) > 0  # no sync else
        return known_dc(self.process, z, x, self.dc_mean, known)

    def reconstruct(self, z: Tensor, dc: Optional[Tensor] = None) -> Tensor:
        """Domain state -> image (:func:`poisson_reconstruct` with this module's Poisson network)."""
        return poisson_reconstruct(self.process, z, dc, self.poisson_net, self.reconstruction,
                                   self.hparams.poisson_residual)

    def decode(self, z: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """:meth:`reconstruct` with the DC of ``dc_mode`` and the Poisson net in eval mode; ``x`` (the true
        images) is needed only by ``dc_mode="oracle"``."""
        net = self.poisson_net
        was = net.training if net is not None else False
        if net is not None:
            net.eval()
        try:
            return self.reconstruct(z, self._dc(z, x))
        finally:
            if net is not None:
                net.train(was)

    def dct_reconstruct(self, z: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """The exact DCT Poisson solve alone, without the Poisson net (what the net is measured against):
        DC as in :meth:`decode`, 0 for ``dc_mode="poisson_net"``."""
        dc = self._dc(z, x)
        if dc is None and self.process.dc_mode == "poisson_net":
            dc = 0.0
        return self.process.from_domain(z, dc)

    # --- training -------------------------------------------------------------------------------
    def poisson_loss(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """MSE of the reconstruction from clean fields + U(0, σ_aug) noise (+ curl noise) (§2.7)."""
        z = self.process.to_domain(x)
        hp = self.hparams

        def u(n: int) -> Tensor:
            gd = generator.device if generator is not None else x.device
            return torch.rand(n, generator=generator, device=gd, dtype=x.dtype).to(x.device).view(-1, 1, 1, 1)

        if hp.poisson_aug_sigma > 0:
            z = z + hp.poisson_aug_sigma * u(x.shape[0]) * randn_like(z, generator)
        if hp.poisson_curl_noise > 0:
            n = randn_like(z, generator)
            z = z + hp.poisson_curl_noise * u(x.shape[0]) * (n - self.process.project(n))
        return F.mse_loss(self.reconstruct(z, self._dc(z, x)), x)

    def _stage_prefix(self) -> str:
        stage = self.trainer.state.stage.value if self._trainer is not None and self.trainer.state.stage else "train"
        return {"train": "train", "test": "test"}.get(stage, "val")

    def compute_loss(self, x: Tensor, net: nn.Module, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.training and self.process.dc_mode == "dataset_mean" and not self._fixed_dc:
            with torch.no_grad():
                b = x.shape[0]
                self.dc_mean.mul_(self.dc_count / (self.dc_count + b)).add_(
                    x.double().mean(dim=(0, 2, 3)) * (b / (self.dc_count + b)))
                self.dc_count.add_(b)
        only_poisson = self.hparams.poisson_net_stage == "poisson_only"
        loss = None if only_poisson else super().compute_loss(x, net, generator)
        if self.trains_poisson:
            lp = self.poisson_loss(x, generator)
            if self._trainer is not None:
                self.log(f"{self._stage_prefix()}/poisson_loss", lp, sync_dist=not self.training)
            loss = lp if loss is None else loss + self.hparams.poisson_loss_weight * lp
        return loss
