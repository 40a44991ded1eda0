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

from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from torch import Tensor, nn

from diffproc.methods.base import ConfigError, DiffusionModule, build_unet
from diffproc.processes.base import randn_like
from diffproc.processes.gradient import GradientDomainProcess

#: default Poisson network: about a tenth of the DDPM CelebA backbone
DEFAULT_POISSON_NET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_resolutions": [],
    "dropout": 0.0,
}

PoissonStage = Literal["separate", "joint", "poisson_only"]


class GDDM(DiffusionModule):
    """Gradient-domain (GDDM), Laplacian-domain (LDDM) and hybrid diffusion.

    Process args (see :class:`GradientDomainProcess`): ``domain`` gradient|laplacian|hybrid, ``noise``
    iid|operator, ``dc_mode`` aux|poisson_net|dataset_mean|oracle, ``gradient_noise_scale`` (√2),
    ``laplacian_noise_scale`` (√20 for the 5-point stencil; 1.5811 = the seed's literal "√(5/2)"),
    ``laplacian_stencil``, ``hybrid_mu``, ``dataset_mean``, ``project_every_step``, and the DDPM schedule
    ``num_timesteps``, ``schedule``, ``beta_start``, ``beta_end``, ``prediction``, ``variance``, ``eta``,
    ``spacing``, ``clip_x0`` (per-domain box, off by default), and the four options that make the samples
    images (docs/gddm.md "Why the seed-literal setting fails"; all ours, chosen by measurement):
    ``network_view`` (``image``: the backbone sees the state as a C-channel image with EDM's per-mode
    preconditioning and predicts the clean image; ``domain``: it sees and outputs the field), ``prediction``
    (``x0``; the image view needs it), ``loss_weighting`` (``edm``; ``uniform`` = ε-MSE on the field,
    ``image`` = DDPM's L_simple in image units), ``clip_image`` (x̂0 clipped to [−1, 1] as an image, DDPM's
    clip; applies with ``dc_mode="aux"``, ignored otherwise) and ``sigma_data`` (0.5).
    ``sigma_data_mode``: ``uniform`` (the scalar ``sigma_data`` for every image DCT mode) or ``spectrum``
    (σ_data per mode = the RMS of the orthonormal DCT coefficients of the first ``sigma_data_images`` training
    images, averaged over channels, estimated when a fit starts and kept in the checkpoint as the buffer
    ``sigma_data_spectrum``; :meth:`estimate_sigma_data` sets it by hand). ``time_sampling``: training times
    ``uniform`` (DDPM), ``quad`` (t = ⌈T u²⌉, more weight on small t) or ``modes`` (half around the times the
    data's image modes cross SNR 1; needs a ``spectrum`` σ_data mode). ``noise_cap``: cap on the image noise
    per DCT mode that the i.i.d. domain noise makes (units of image DDPM's noise; only the lowest modes, where
    the Poisson solve amplifies it, are touched; None = the paper's noise; docs/gddm.md §6).
    **Seed-literal setting**: ``network_view: domain, prediction: eps, loss_weighting: uniform,
    clip_image: false`` (``configs/gddm_literal_shapes.yaml``).

    Args:
        reconstruction: ``dct`` — exact Neumann Poisson solve (default, parameter-free); ``poisson_net`` —
            the paper's Poisson U-Net (with ``poisson_residual`` it corrects the DCT solve).
        poisson_net: UNet config of the Poisson network (:func:`build_unet` keys); built when
            ``reconstruction="poisson_net"`` or ``dc_mode="poisson_net"``. Its last conv is zero-initialised.
        poisson_net_stage: ``separate`` (default) — this run trains the diffusion UNet only, the Poisson
            net is frozen; its own stage is a second ``fit`` with ``poisson_only``. ``joint`` — both trained
            in every step (loss = diffusion + ``poisson_loss_weight`` · Poisson MSE, own param group when
            ``poisson_lr`` is set). ``poisson_only`` — the diffusion UNet and its EMA are frozen and only the
            Poisson net trains; combine with ``init_from`` = the stage-1 checkpoint.
        poisson_residual: ``x̂ = poisson(g, dc) + P([field, poisson(g, 0)])`` (default) or ``x̂ = P(field)``.
        poisson_aug_sigma: input noise std ~ U(0, poisson_aug_sigma) on the normalised field (§2.7).
        poisson_curl_noise: extra std ~ U(0, ·) of purely non-integrable noise (0 = off).
        poisson_loss_weight, poisson_lr: joint-stage weight and learning rate (None = ``lr``).
        init_from: (a :class:`DiffusionModule` option) a checkpoint whose weights initialise a fresh ``fit``
            (weights only; ignored when the fit resumes with ``--ckpt_path``). Missing Poisson-net keys are allowed.
        diagnostics_every_n_val, diagnostics_num, diagnostics_steps, sparsity_delta: deprecated (a warning
            says so), honoured for one release by the callback ``GDDMDiagnostics`` — ``every_n_val``,
            ``num``, ``num_steps``, ``sparsity_delta`` (``--gddm_diagnostics.*`` in ``cli.py``).
        **kwargs: the shared options of :class:`DiffusionModule` (backbone, optimiser, EMA, sampling).
    """

    def __init__(self, domain: Literal["gradient", "laplacian", "hybrid"] = "gradient",
                 noise: Literal["iid", "operator"] = "iid",
                 dc_mode: Literal["aux", "poisson_net", "dataset_mean", "oracle"] = "aux",
                 reconstruction: Literal["dct", "poisson_net"] = "dct",
                 gradient_noise_scale: Optional[float] = None, laplacian_noise_scale: Optional[float] = None,
                 laplacian_stencil: Literal["5point", "5point_quarter"] = "5point",
                 hybrid_mu: Optional[float] = None, dataset_mean: Optional[Sequence[float]] = None,
                 project_every_step: bool = False, num_timesteps: int = 1000,
                 schedule: Literal["linear", "cosine"] = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction: Literal["eps", "x0", "v"] = "x0",
                 variance: Literal["fixedsmall", "fixedlarge"] = "fixedsmall", eta: float = 0.0,
                 spacing: Literal["uniform", "quad"] = "uniform", clip_x0: bool = False,
                 loss_weighting: Literal["uniform", "image", "edm", "snr"] = "edm", clip_image: bool = True,
                 network_view: Literal["domain", "image"] = "image", sigma_data: float = 0.5,
                 sigma_data_mode: Literal["uniform", "spectrum", "spectrum_colour"] = "uniform", sigma_data_images: int = 2048,
                 time_sampling: Literal["uniform", "quad", "modes"] = "uniform", noise_cap: Optional[float] = None,
                 poisson_net: Optional[dict] = None, poisson_net_stage: PoissonStage = "separate",
                 poisson_residual: bool = True, poisson_aug_sigma: float = 0.05,
                 poisson_curl_noise: float = 0.0, poisson_loss_weight: float = 1.0,
                 poisson_lr: Optional[float] = None,
                 diagnostics_every_n_val: Optional[int] = None, diagnostics_num: Optional[int] = None,
                 diagnostics_steps: Optional[int] = None, sparsity_delta: Optional[float] = None,
                 **kwargs: Any) -> None:
        if reconstruction not in ("dct", "poisson_net"):
            raise ConfigError(f"reconstruction must be 'dct' or 'poisson_net', got {reconstruction!r}")
        if sigma_data_mode not in ("uniform", "spectrum", "spectrum_colour"):
            raise ConfigError("sigma_data_mode must be 'uniform', 'spectrum' or 'spectrum_colour', "
                              f"got {sigma_data_mode!r}")
        if poisson_net_stage not in ("separate", "joint", "poisson_only"):
            raise ConfigError("poisson_net_stage must be 'separate', 'joint' or 'poisson_only', "
                              f"got {poisson_net_stage!r}")
        try:
            process = GradientDomainProcess(
                domain=domain, noise=noise, dc_mode=dc_mode, gradient_noise_scale=gradient_noise_scale,
                laplacian_noise_scale=laplacian_noise_scale, laplacian_stencil=laplacian_stencil,
                hybrid_mu=hybrid_mu, dataset_mean=dataset_mean, project_every_step=project_every_step,
                num_timesteps=num_timesteps, schedule=schedule, beta_start=beta_start, beta_end=beta_end,
                prediction=prediction, variance=variance, eta=eta, spacing=spacing, clip_x0=clip_x0,
                loss_weighting=loss_weighting, clip_image=clip_image and dc_mode == "aux",
                network_view=network_view, sigma_data=sigma_data, time_sampling=time_sampling,
                noise_cap=noise_cap)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        super().__init__(process=process, **kwargs)
        self.process: GradientDomainProcess
        moved = {"every_n_val": diagnostics_every_n_val, "num": diagnostics_num, "num_steps": diagnostics_steps,
                 "sparsity_delta": sparsity_delta}
        moved = {k: v for k, v in moved.items() if v is not None}
        if moved:  # deprecated: the diagnostics are a callback now
            rank_zero_deprecation(
                "GDDM's diagnostics_every_n_val / diagnostics_num / diagnostics_steps / sparsity_delta are deprecated "
                "(honoured for one release by the GDDMDiagnostics callback): the diagnostics are the callback "
                "diffproc.callbacks.gddm_diagnostics.GDDMDiagnostics, which cli.py registers. Use " + " ".join(f"--gddm_diagnostics.{k} {v}" for k, v in moved.items())
                + " (in a config: a top-level `gddm_diagnostics:` section); with your own Trainer: "
                "callbacks=[GDDMDiagnostics(" + ", ".join(f"{k}={v}" for k, v in moved.items()) + ")].")
        self.reconstruction = reconstruction
        needs_net = reconstruction == "poisson_net" or dc_mode == "poisson_net"
        if poisson_net_stage == "poisson_only" and not needs_net:
            raise ConfigError("poisson_net_stage='poisson_only' trains the Poisson network, but none is built: "
                              "set reconstruction='poisson_net' or dc_mode='poisson_net'.")
        self.poisson_net: Optional[nn.Module] = None
        if needs_net:
            c = self.channels
            cfg = dict(DEFAULT_POISSON_NET if poisson_net is None else poisson_net)
            in_ch = process.field_channels(c) + (c if poisson_residual else 0)
            self.poisson_net = build_unet(cfg, self.image_size, in_ch, c)
            with torch.no_grad():  # residual mode starts as the exact DCT solve (spec §2.10.12)
                self.poisson_net.conv_out.weight.zero_()
                self.poisson_net.conv_out.bias.zero_()
            if poisson_net_stage == "separate":
                self.poisson_net.requires_grad_(False)
            elif poisson_net_stage == "poisson_only":
                self.unet.requires_grad_(False)
        # dataset_mean: fixed when given, else a running mean of the training batches (in the checkpoint)
        self._fixed_dc = dataset_mean is not None
        init = torch.as_tensor(dataset_mean if dataset_mean is not None else [0.0] * self.channels, dtype=torch.float64)
        if init.numel() != self.channels:
            raise ConfigError(f"dataset_mean has {init.numel()} values but the images have {self.channels} channels")
        self.register_buffer("dc_mean", init.clone())
        self.register_buffer("dc_count", torch.tensor(0.0, dtype=torch.float64))
        if time_sampling == "modes" and sigma_data_mode == "uniform":
            raise ConfigError("time_sampling='modes' draws times around the data's per-mode SNR crossings: set "
                              "sigma_data_mode: spectrum_colour (or spectrum).")
        # sigma_data_mode="spectrum": σ_data per image DCT mode, estimated from training images at fit start
        # (buffers only then, so checkpoints of the other settings load unchanged)
        if sigma_data_mode != "uniform":
            if network_view != "image" and loss_weighting not in ("edm", "snr"):
                raise ConfigError(f"sigma_data_mode={sigma_data_mode!r} sets σ_data of network_view='image' / "
                                  "loss_weighting='edm'; neither is used here.")
            n, c = self.image_size, self.channels
            shape = (c, n, n) if sigma_data_mode == "spectrum_colour" else (n, n)
            self.register_buffer("sigma_data_spectrum", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer("sigma_data_count", torch.tensor(0.0, dtype=torch.float64))
            if sigma_data_mode == "spectrum_colour":
                self.register_buffer("sigma_data_colour_basis", torch.eye(c, dtype=torch.float64))

    init_from_optional_keys = ("poisson_net.", "dc_", "sigma_data_")  # a stage-1 checkpoint has no Poisson network

    # --- σ_data per DCT mode (sigma_data_mode="spectrum") ------------------------------------------
    @torch.no_grad()
    def estimate_sigma_data(self, images: Tensor) -> Tensor:
        """Set σ_data per image DCT mode to the RMS of the orthonormal DCT coefficients of ``images`` (N, C,
        H, W in [−1, 1]), averaged over images and channels (the DC's RMS includes the mean); kept in the
        checkpoint as ``sigma_data_spectrum``. Returns it (H, W) float64."""
        from diffproc.ops import dct2

        mode = self.hparams.sigma_data_mode
        if mode == "uniform":
            raise ConfigError("estimate_sigma_data needs sigma_data_mode='spectrum' or 'spectrum_colour'")
        u = dct2(images.to(self.sigma_data_spectrum.device, torch.float64))
        if mode == "spectrum_colour":  # colour basis: eigenvectors of the channel second moments of all coefficients
            flat = u.transpose(0, 1).reshape(u.shape[1], -1)
            _, vecs = torch.linalg.eigh(flat @ flat.T / flat.shape[1])
            q = vecs.flip(-1).T.contiguous()  # rows = components, largest first
            q = q * torch.where(q.sum(1, keepdim=True) < 0, -1.0, 1.0)  # sign convention: rows sum >= 0
            self.sigma_data_colour_basis.copy_(q)
            rms = torch.einsum("dc,bchw->bdhw", q, u).pow(2).mean(dim=0).sqrt().clamp_min(1e-3)
        else:
            rms = u.pow(2).mean(dim=(0, 1)).sqrt().clamp_min(1e-3)
        self.sigma_data_spectrum.copy_(rms)
        self.sigma_data_count.fill_(u.shape[0])
        return rms

    def _sigma_data_ready(self) -> bool:
        """Whether the σ_data spectrum is estimated (or loaded). Once true it stays true, so the buffer on the
        device is read (a host sync on a GPU) only until then, not at every network evaluation."""
        if not getattr(self, "_sigma_data_known", False):
            self._sigma_data_known = float(self.sigma_data_count) > 0
        return self._sigma_data_known

    def _sync_sigma_data(self) -> None:
        mode = self.hparams.get("sigma_data_mode", "uniform")
        if mode == "uniform":
            return
        if not self._sigma_data_ready():
            raise ConfigError(f"sigma_data_mode={mode!r} has no spectrum yet: it is estimated from the training "
                              "images when a fit starts (or call model.estimate_sigma_data(images)).")
        self.process.sigma_data_modes = self.sigma_data_spectrum
        self.process.colour_basis = self.sigma_data_colour_basis if mode == "spectrum_colour" else None

    def model_fn(self, net: Optional[nn.Module] = None):
        self._sync_sigma_data()
        return super().model_fn(net)

    def on_fit_start(self) -> None:
        """The base's ``init_from``; then, for ``sigma_data_mode="spectrum"`` and no spectrum yet (a fresh fit),
        σ_data per DCT mode from the first ``sigma_data_images`` training images."""
        super().on_fit_start()
        if self.hparams.get("sigma_data_mode", "uniform") == "uniform" or self._sigma_data_ready():
            return
        from diffproc.methods.base import images_of

        dm = self.trainer.datamodule if self._trainer is not None else None
        dataset = getattr(dm.train_dataloader(), "dataset", None) if dm is not None else None
        if dataset is None or not hasattr(dataset, "__len__"):
            return  # no indexable training set here: compute_loss estimates it from the first batch
        n = min(len(dataset), int(self.hparams.sigma_data_images))  # the first n, in order (no RNG used)
        self.estimate_sigma_data(torch.stack([images_of(dataset[i]) for i in range(n)]))

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
        """DC for modes the process cannot resolve alone: oracle (from ``x``), dataset_mean (buffer)."""
        mode = self.process.dc_mode
        if mode == "oracle":
            if x is None:
                raise ConfigError("dc_mode='oracle' takes the mean of the true image and cannot generate; "
                                  "use dc_mode='aux' (default), 'dataset_mean' or 'poisson_net' for sampling.")
            return x.mean(dim=(-2, -1))
        if mode == "dataset_mean":
            if not self._fixed_dc and float(self.dc_count) == 0:
                raise ConfigError("dc_mode='dataset_mean' has no mean yet: set model.init_args.dataset_mean "
                                  "or train a few steps (the running mean of the training images is used).")
            return self.dc_mean.to(z.device, z.dtype).expand(z.shape[0], -1)
        return None

    def reconstruct(self, z: Tensor, dc: Optional[Tensor] = None) -> Tensor:
        """Domain state -> image: exact DCT solve, plus the Poisson network where it exists (§2.7)."""
        p = self.process
        dc_eff = dc if dc is not None else (0.0 if p.dc_mode == "poisson_net" else None)
        x_dct = p.from_domain(z, dc_eff)
        net = self.poisson_net
        if net is None or (self.reconstruction == "dct" and dc is not None):
            return x_dct
        field = p.split(z)[0]
        dtype = next(net.parameters()).dtype
        inp = field
        if self.hparams.poisson_residual:
            inp = torch.cat([field, x_dct - x_dct.mean(dim=(-2, -1), keepdim=True)], dim=1)
        out = net(inp.to(dtype), torch.zeros(z.shape[0], device=z.device, dtype=dtype)).sample.to(z.dtype)
        if self.reconstruction == "poisson_net":
            return x_dct + out if self.hparams.poisson_residual else out
        return x_dct + out.mean(dim=(-2, -1), keepdim=True)  # dct shape, DC from the net

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
        if self.training and self.hparams.get("sigma_data_mode", "uniform") != "uniform" and not self._sigma_data_ready():
            self.estimate_sigma_data(x)  # fallback when on_fit_start found no indexable training set
        only_poisson = self.hparams.poisson_net_stage == "poisson_only"
        loss = None if only_poisson else super().compute_loss(x, net, generator)
        if self.trains_poisson:
            lp = self.poisson_loss(x, generator)
            if self._trainer is not None:
                self.log(f"{self._stage_prefix()}/poisson_loss", lp, sync_dist=not self.training)
            loss = lp if loss is None else loss + self.hparams.poisson_loss_weight * lp
        return loss
