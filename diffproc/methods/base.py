"""``DiffusionModule``: what every method shares — backbone, optimiser, EMA, sampling, predict.

The module is *given* its process (``diffproc.processes``), in a config by class path::

    model:
      class_path: diffproc.methods.base.DiffusionModule
      init_args:
        process: {class_path: diffproc.processes.ddpm.DDPMProcess, init_args: {num_timesteps: 1000}}

The process's signature is the only config surface of its math; the training step is the process loss,
sampling is the process's reverse steps. A subclass exists only for what a paper adds beyond a process
(:class:`~diffproc.methods.gddm.GDDM`). No method copies a loop.

Room ``methods``: imports ``nets`` (the backbone and its speed options), ``samplers`` and ``processes``; never
``callbacks`` or ``interop``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from diffproc.errors import ConfigError
from diffproc.methods.sdedit import sdedit_predict_step
from diffproc.nets.precond import Denoiser, Head, make_head
from diffproc.nets.speed import (COMPILE_MODES, CUDAGRAPH_MODES, CompileMode, _optimizer_load_flags,
                                 _optimizer_match_layout, _optimizer_state_contiguous, _unet_call, compiled_unet_call,
                                 to_channels_last)
from diffproc.nets.unet import build_unet, diffusers_timestep_shift, load_diffusers_unet, shift_time_input
from diffproc.processes.base import DiffusionProcess, build_process
from diffproc.processes.rng import seed_global_rng, seeded_generator, train_batch_seed
from diffproc.samplers import SampleResult, SamplingSpec, sample_loop



def images_of(batch: Any) -> Tensor:
    """Image tensor of a batch that is a tensor, an ``(images, labels)`` pair or a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"]
    return batch[0]


def as_process(process: DiffusionProcess | dict) -> DiffusionProcess:
    """``process``, or the process of a ``{class_path, init_args}`` config (what the hyperparameters hold, so that
    ``load_from_checkpoint`` rebuilds a module)."""
    return build_process(process) if isinstance(process, dict) else process


def check_options(hp: Any) -> None:
    """Refuse, with :class:`ConfigError`, values of the module's own options that cannot work."""
    for name, ok, want in (("lr", hp.lr > 0, "> 0"), ("ema_decay", 0 <= hp.ema_decay < 1, "in [0, 1)"),
                           ("warmup_steps", hp.warmup_steps >= 0, ">= 0"),
                           ("predict_num_samples", hp.predict_num_samples >= 1, ">= 1"),
                           ("predict_batch_size", hp.predict_batch_size >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"model.init_args.{name} must be {want}, got {hp[name]}")
    if hp.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {hp.lr_schedule!r}")
    for name in ("compile_train", "compile_sample"):
        if hp[name] not in COMPILE_MODES:
            raise ConfigError(f"{name} must be one of {list(COMPILE_MODES)}, got {hp[name]!r}")


class DiffusionModule(L.LightningModule):
    """Shared LightningModule of all methods.

    Args:
        process: the forward process, configured by class path (``{class_path, init_args}``; in Python a process
            object, or that config as a dict); its arguments are saved in the hyperparameters as ``process`` (its
            :attr:`~DiffusionProcess.config`).
        precond: the preconditioning head between the network and the process (:mod:`diffproc.nets.precond`, by
            class path: ``EpsHead``, ``X0Head``, ``VHead``, ``SigmaEpsHead``, ``DualHead``, GDDM's ``ModeEDM``); None:
            the process's ``default_head``. A submodule (``self.precond``): data statistics it estimates (ModeEDM's
            σ_data spectrum, from the first training images when a fit starts) are in the checkpoint.
        image_size, channels: image geometry (linked from the DataModule by the CLI), also given to the
            process (:meth:`~DiffusionProcess.set_geometry`).
        unet: backbone config, see :func:`~diffproc.nets.unet.build_unet`.
        lr, weight_decay, betas: AdamW. ``warmup_steps``: linear LR warm-up; ``lr_schedule``
            ``constant`` or ``cosine`` (decays to 0 over the Trainer's total steps).
        ema_decay: EMA of the weights (0 disables); ``ema_warmup`` uses
            ``min(decay, (1+n)/(10+n))`` so that short runs get a useful average;
            ``ema_start_step``/``ema_every_n_steps`` as in the papers' code. Sampling, validation
            and checkpoints use/carry the EMA weights.
        sampling: the default sampling spec (:class:`~diffproc.samplers.SamplingSpec`:
            ``solver``, ``num_steps``, ``time_grid``, ``ddim_eta``, ``seed``, SDEdit ``strength``;
            ``--model.init_args.sampling.num_steps 50``) of :meth:`sample`, ``predict`` (unconditional and SDEdit)
            and, for every field they leave unset, of the callbacks that sample (``--sample_grid.sampling.*``,
            ``--metrics.sampling.*``, ``--fid.sampling.*``, ``--gddm_diagnostics.sampling.*``) and of an exported
            pipeline. Checked against the process here. ``time_grid`` ``logsnr`` (uniform in the log-SNR of the
            median coordinate) is the best grid for the DPM-Solver++ family on Gaussian data
            (docs/results/gaussian_w2; on real images per process, docs/results/real_fmnist). ``seed``: sample ``i``
            draws all its noise from ``(seed, i)`` (:class:`~diffproc.processes.base.PerSampleGenerator`), whatever
            the batch size or rank count. The config wins over a checkpoint's hyperparameters, so
            ``cli.py predict|test --model.init_args.sampling.num_steps 10`` is an override for that run.
        predict_num_samples, predict_batch_size, predict_dir: ``cli.py predict`` writes that many PNGs.
        init_from: weights to start from, one option for both sources:
            a diffusers model folder (``UNet2DModel.save_pretrained``, or a pipeline folder with ``unet/``
            such as ``python -m diffproc.interop.export`` writes): its UNet, architecture and weights, replaces the
            one ``unet`` describes, and starts the EMA. Channels and sample size must fit the process. DDPM/DDIM take
            diffusers' 0-based timesteps into account (:func:`~diffproc.nets.unet.diffusers_timestep_shift`). Keep it
            in the config of later ``test``/``predict`` runs: it fixes the architecture that the checkpoint's weights
            load into.
            Or a diffproc checkpoint file (``.ckpt``): its weights (raw and EMA, no optimiser state) initialise
            a fresh ``fit`` of the same configuration; ignored when the fit resumes with ``--ckpt_path``
            (GDDM's two-stage Poisson-net recipe uses it).
        compile_train, compile_sample: ``torch.compile`` mode of the backbone call while training (any call with
            gradients) and while sampling/evaluating (without): ``none`` (eager, default), ``default``,
            ``reduce-overhead`` (CUDA graphs on CUDA: the loop's fixed shapes suit ``compile_sample``),
            ``max-autotune``, ``max-autotune-no-cudagraphs``. Only the UNet's forward is compiled (the process
            math, schedules and float64 DCT/Poisson stay eager); the first calls compile (seconds on a GPU,
            minutes on a CPU). Modules are not wrapped: state-dict keys have no ``_orig_mod.`` prefix.
        channels_last: the backbones' weights and inputs in channels-last memory format (faster convolutions
            with bf16 on tensor-core GPUs); checkpoints are saved contiguous either way.
        fused_optimizer: AdamW's fused kernel (one kernel for all parameters) instead of the default
            for-each / per-tensor loop; numerically equal up to rounding.
        None of these changes a checkpoint: one written with any of them loads, resumes and exports without
        them and the reverse; all are off by default (``docs/results/throughput_cpu.md`` has the measured ratios).
    """

    def __init__(self, process: DiffusionProcess, precond: Optional[Head] = None, image_size: int = 32,
                 channels: int = 3, unet: Optional[dict] = None, lr: float = 2e-4, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 1000,
                 lr_schedule: str = "constant", ema_decay: float = 0.9999, ema_warmup: bool = True,
                 ema_start_step: int = 0, ema_every_n_steps: int = 1,
                 sampling: SamplingSpec = SamplingSpec(), predict_num_samples: int = 64,
                 predict_batch_size: int = 64, predict_dir: Optional[str] = None,
                 init_from: Optional[str] = None, compile_train: CompileMode = "none",
                 compile_sample: CompileMode = "none", channels_last: bool = False,
                 fused_optimizer: bool = False) -> None:
        super().__init__()
        process = as_process(process)
        sampling = SamplingSpec.of(sampling)
        self.save_hyperparameters(ignore=["process", "precond", "sampling"])
        self.hparams["process"] = process.config
        self.hparams["sampling"] = sampling.to_dict()  # plain values: checkpoints load with weights_only=True
        check_options(self.hparams)
        self.compile_train, self.compile_sample = compile_train, compile_sample
        self.channels_last, self.fused_optimizer = bool(channels_last), bool(fused_optimizer)
        self.image_size, self.channels = int(image_size), int(channels)
        self.process = process.set_geometry(self.image_size, self.channels)
        try:
            self.precond = make_head(precond, process).setup(process, self.image_size, self.channels)
        except ValueError as err:
            raise ConfigError(f"model.init_args.precond: {err}") from None
        self.hparams["precond"] = self.precond.config
        #: the default sampling spec, complete (:meth:`SamplingSpec.resolve`); overrides go on top of it
        self.sampling: SamplingSpec = self.check_sampling(sampling, "model.init_args.sampling", base=SamplingSpec())
        in_ch = self.precond.input_channels(process, self.channels)
        out_ch = self.precond.output_channels(process, self.channels)
        self.unet = build_unet(unet, self.image_size, in_ch, out_ch)
        if init_from is not None and not os.path.isfile(os.path.expanduser(str(init_from))):
            # a diffusers folder: its UNet (architecture and weights) is the backbone (a .ckpt: on_fit_start)
            self.unet = shift_time_input(load_diffusers_unet(init_from, self.image_size, in_ch, out_ch),
                                         -diffusers_timestep_shift(process))
        self.ema_unet: Optional[nn.Module] = None
        if ema_decay > 0:
            self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        if self.channels_last:
            to_channels_last(self)

    # --- network as the process sees it ---------------------------------------------------------
    def denoiser(self, net: Optional[nn.Module] = None) -> Denoiser:
        """The denoiser the process sees, ``(z_t, t) -> (û0, ε̂)``: backbone ``net`` (default the raw UNet) called
        with the process's time scaling, through the preconditioning head."""
        net = net if net is not None else self.unet

        def fn(z: Tensor, t: Tensor) -> Tensor:
            tt = self.process.model_time(t.to(z.device)).expand(z.shape[0])
            return self.net_call(net, z, tt)

        return self.precond.bind(self.process, fn)

    def net_call(self, net: nn.Module, z: Tensor, t: Tensor) -> Tensor:
        """``net(z, t).sample`` in ``z``'s dtype, with the speed options: the input in channels-last format
        (``channels_last``) and the call compiled with ``compile_train`` when gradients are on, else
        ``compile_sample``."""
        if self.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        mode = self.compile_train if torch.is_grad_enabled() else self.compile_sample
        if mode == "none":
            return _unet_call(net, z, t)
        out = compiled_unet_call(mode)(net, z, t)
        if mode in CUDAGRAPH_MODES and out.is_cuda:  # the next graph replay overwrites its output buffer
            out = out.clone()
        return out

    def setup(self, stage: str) -> None:
        """Channels-last also for backbones a method builds after ``DiffusionModule.__init__`` (GDDM's
        Poisson network)."""
        if self.channels_last:
            to_channels_last(self)

    @property
    def sampling_net(self) -> nn.Module:
        """The weights used for sampling and evaluation: EMA when enabled."""
        return self.ema_unet if self.ema_unet is not None else self.unet

    # --- training -------------------------------------------------------------------------------
    def compute_loss(self, x: Tensor, net: nn.Module, generator: Optional[torch.Generator] = None) -> Tensor:
        """The process's training objective on a batch of images; in training, its parts (SIE's x̂0, ε̂ and
        derivative terms) are logged as ``train/loss_<term>``. Subclasses may add terms."""
        if self.training and self.precond.needs_statistics:
            self.precond.estimate(x)  # fallback when on_fit_start found no indexable training set
        t = self.precond.train_time(self.process, x.shape[0], generator, x.device)
        terms = self.process.loss_terms(self.denoiser(net), self.process.to_domain(x), t=t, generator=generator)
        if len(terms) > 1 and self.training and self._trainer is not None and self._logger_writes():
            for name, value in terms.items():
                if name != "loss":
                    self.log(f"train/loss_{name}", value.detach())
        return terms["loss"]

    def _logger_writes(self) -> bool:
        """Whether the logger writes this training step's metrics (Lightning's ``log_every_n_steps`` cadence):
        each ``self.log`` costs ~0.7 ms of bookkeeping, so terms only TensorBoard shows are logged only then."""
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0 or self.trainer.should_stop

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed the global RNG for this batch from (run seed, rank, batch counter across epochs).

        Everything random in a training step (diffusion time, noise, dropout, a method's extra draws)
        then depends only on where the run is, not on what ran before in this process: a run resumed from
        a checkpoint draws exactly what the uninterrupted run drew at the same step (issue 16), and
        validation, sample grids or a restart in between cannot shift the stream."""
        if self._trainer is not None:
            seed_global_rng(train_batch_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank,
                                             self.trainer.fit_loop.total_batch_idx), self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.compile_train in CUDAGRAPH_MODES and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's graph outputs are free
        loss = self.compute_loss(images_of(batch), self.unet)
        # On an accelerator, checking finiteness syncs host and device: there it is done every log
        # interval (a diverged run is caught within that many steps; NonFiniteGuard keeps NaN weights
        # out of checkpoints in between). On the CPU it costs nothing and runs every step.
        every = 1
        if self._trainer is not None and loss.device.type != "cpu":
            every = max(1, self.trainer.log_every_n_steps)
        if self.global_step % every == 0 and self._loss_not_finite(loss):
            raise FloatingPointError(
                f"loss is NaN/inf at global step {self.global_step} (rank {self.global_rank}: {loss.item()}): "
                "training stopped and the last "
                "good checkpoint was kept. Lower model.lr, keep trainer.gradient_clip_val (e.g. 1.0), or "
                "use 32-bit precision, then resume with --ckpt_path last.")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _loss_not_finite(self, loss: Tensor) -> bool:
        """True when the loss is NaN/inf on any rank (all DDP ranks decide together: no rank is left
        waiting in the gradient all-reduce while another one stops)."""
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def _eval_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x = images_of(batch)
        g = torch.Generator(device=x.device).manual_seed(1000 + batch_idx)  # same noise every epoch
        loss = self.compute_loss(x, self.sampling_net, generator=g)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA update after each optimiser step (``ema_start_step``, ``ema_every_n_steps``, warm-up)."""
        if self.ema_unet is None:
            return
        step, hp = self.global_step, self.hparams
        if step % max(1, hp.ema_every_n_steps) != 0:
            return
        if step < hp.ema_start_step:
            decay = 0.0
        else:
            n = step - hp.ema_start_step
            decay = min(hp.ema_decay, (1 + n) / (10 + n)) if hp.ema_warmup else hp.ema_decay
        ema = [p for p in self.ema_unet.parameters()]
        cur = [p.detach() for p in self.unet.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - decay)

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups, as ``torch.optim`` takes them: dicts with ``params`` and any
        per-group option (``lr``, ``weight_decay``, …; unset ones take the module's). Default: one group
        with every trainable parameter. Methods override this, never :meth:`configure_optimizers`."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> dict:
        """AdamW over :meth:`parameter_groups`; the warm-up / cosine factor scales every group's own lr."""
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                                fused=True if self.fused_optimizer else None)
        # checkpoints do not depend on the implementation or memory format (load/resume with other options)
        opt.register_state_dict_post_hook(_optimizer_state_contiguous)
        opt.register_load_state_dict_pre_hook(_optimizer_load_flags)
        opt.register_load_state_dict_post_hook(_optimizer_match_layout)
        warmup = max(0, int(hp.warmup_steps))
        total = None
        if hp.lr_schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warmup) if warmup else 1.0
            if total is not None and step >= warmup:
                f *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- sampling -------------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Final domain state -> images in [-1, 1] (GDDM overrides with its Poisson network)."""
        return self.process.from_domain(z)

    def sampling_spec(self, spec: Optional[SamplingSpec] = None, where: str = "sampling",
                      sdedit: bool = False) -> SamplingSpec:
        """The complete spec of a run: ``spec`` (an override; ``None`` fields inherit) over the module's default
        :attr:`sampling`, resolved against the process (``ValueError`` naming ``where`` when it cannot run)."""
        return SamplingSpec.of(spec).over(self.sampling).resolve(self.process, where, sdedit=sdedit)

    @torch.no_grad()
    def sample(self, num: int, spec: Optional[SamplingSpec] = None, generator: Optional[torch.Generator] = None,
               progress: bool = True, use_ema: bool = True, indices: Optional[Sequence[int]] = None,
               desc: Optional[str] = None) -> SampleResult:
        """Generate ``num`` images with the sampling spec ``spec`` over the module's default :attr:`sampling`
        (EMA weights unless ``use_ema=False``).

        Randomness: sample ``j`` draws all its noise from ``(seed, indices[j])`` (``indices`` defaults to
        ``0..num-1``; ``seed`` from the spec), so an image does not depend on the batch it is drawn in; a
        ``generator`` given instead (one stream for the whole batch) replaces the seed, unless ``spec`` sets one.

        Returns one :class:`~diffproc.samplers.SampleResult`: ``images`` in [-1, 1], the final domain
        state ``sample``, the ``nfe`` actually spent, the time grid and the solver.

        Under a Trainer, a SIGTERM (Lightning's ``received_sigterm``) stops sampling before the next
        network evaluation with ``SIGTERMException``, in whatever phase it runs (end-of-fit grid,
        test metrics, predict).
        """
        run = self.sampling_spec(spec)
        explicit_seed = spec is not None and SamplingSpec.of(spec).seed is not None
        seed = run.seed if generator is None or explicit_seed else None
        generator = seeded_generator(num, seed, indices, generator, self.device)
        net = self.sampling_net if use_ema else self.unet
        was_training = net.training
        net.eval()
        try:
            shape = (num, self.process.domain_channels(self.channels), self.image_size, self.image_size)
            fn = self.denoiser(net)

            def guarded(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
                if self._trainer is not None and self.trainer.received_sigterm:
                    raise SIGTERMException()
                return fn(z, t)

            res = sample_loop(self.process, guarded, shape, run.num_steps, run.solver, generator, self.device,
                              progress=progress, desc=desc or f"sampling ({run.solver})", grid=run.time_grid,
                              ddim_eta=run.ddim_eta)
        finally:
            net.train(was_training)
        res.images = self.decode(res.sample).clamp(-1, 1)
        return res

    def planned_nfe(self, spec: Optional[SamplingSpec] = None) -> int:
        """Network evaluations :meth:`sample` will spend per image with ``spec`` over the module's default."""
        return self.sampling_spec(spec).nfe(self.process)

    def check_sampling(self, spec: Optional[SamplingSpec], where: str = "sampling",
                       base: Optional[SamplingSpec] = None) -> SamplingSpec:
        """Refuse, with :class:`ConfigError`, a spec (an override over ``base``, default the module's
        :attr:`sampling`) that this process cannot run as asked; ``where`` names the option group in the message
        (``--sample_grid.sampling``). Callbacks that sample call it when they are set up. Returns the complete
        spec."""
        try:
            return SamplingSpec.of(spec).over(self.sampling if base is None else base).resolve(self.process, where)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @torch.no_grad()
    def seconds_per_evaluation(self, num: int) -> float:
        """Wall time of one network evaluation on ``num`` images (the EMA weights, at the first time of
        the sampling grid), measured once: what sizing a sampling job against a time budget needs."""
        net = self.sampling_net
        was_training = net.training
        net.eval()
        try:
            z = torch.randn(num, self.process.domain_channels(self.channels), self.image_size, self.image_size,
                            device=self.device)
            t = torch.full((num,), float(self.process.timesteps(self.sampling.num_steps)[0]), device=self.device)
            fn = self.denoiser(net)
            if self.compile_sample != "none":  # compile outside the timed call
                fn(z, t)
            start = time.perf_counter()
            fn(z, t)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start
        finally:
            net.train(was_training)

    # --- predict: write PNGs --------------------------------------------------------------------
    def predict_dataloader(self) -> DataLoader:
        """Indices of the samples to generate (Lightning splits them across DDP ranks)."""
        return DataLoader(torch.arange(self.hparams.predict_num_samples),
                          batch_size=self.hparams.predict_batch_size)

    #: state-dict key prefixes a checkpoint given as ``init_from`` may lack (e.g. GDDM's Poisson network)
    init_from_optional_keys: tuple[str, ...] = ("precond.",)

    def on_fit_start(self) -> None:
        """``init_from`` = a diffproc checkpoint: its weights start a fresh fit (not a resumed one). Then a head that
        needs data statistics and has none yet (a fresh fit) estimates them from the first training images."""
        self._load_init_from()
        if not self.precond.needs_statistics or self._trainer is None:
            return
        dm = self.trainer.datamodule
        dataset = getattr(dm.train_dataloader(), "dataset", None) if dm is not None else None
        if dataset is None or not hasattr(dataset, "__len__"):
            return  # no indexable training set here: compute_loss estimates it from the first batch
        n = min(len(dataset), self.precond.statistics_images)  # the first n, in order (no RNG used)
        self.precond.estimate(torch.stack([images_of(dataset[i]) for i in range(n)]).to(self.device))

    def _load_init_from(self) -> None:
        path = self.hparams.get("init_from")
        if not path or self._trainer is None or self.trainer.ckpt_path is not None:
            return
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            return  # a diffusers folder, loaded in __init__
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing, unexpected = self.load_state_dict(state.get("state_dict", state), strict=False)
        bad = [k for k in missing if not k.startswith(self.init_from_optional_keys)] + list(unexpected)
        if bad:
            raise ConfigError(f"init_from={path} does not match this model (e.g. {bad[:3]}): it must be a "
                              f"checkpoint of the same {type(self).__name__} configuration (process, unet).")

    def on_predict_start(self) -> None:
        # trainer.log_dir is a broadcast under DDP: resolve it once on every rank here, not per batch
        # (ranks may get different numbers of predict batches)
        self._predict_dir = None
        self._predict_dir = self.predict_output_dir()

    def predict_output_dir(self) -> str:
        if self.hparams.predict_dir:
            return self.hparams.predict_dir
        if getattr(self, "_predict_dir", None):
            return self._predict_dir
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        return os.path.join(log_dir or ".", "predictions")

    def predict_step(self, batch: Tensor, batch_idx: int) -> None:
        if not (isinstance(batch, Tensor) and not torch.is_floating_point(batch)):
            # guide batch (float images / (images, names) / dict from diffproc.data.strokes) -> SDEdit
            sdedit_predict_step(self, batch, batch_idx)
            return None
        idx = batch.long()
        x = self.sample(len(idx), indices=idx.tolist(), progress=True).images
        out = self.predict_output_dir()
        os.makedirs(out, exist_ok=True)
        for i, img in zip(idx.tolist(), x):
            save_image((img + 1) / 2, os.path.join(out, f"{i:06d}.png"))
        if batch_idx == 0:
            nrow = max(1, int(math.sqrt(len(x))))
            save_image(make_grid((x + 1) / 2, nrow=nrow), os.path.join(out, f"grid_rank{self.global_rank}.png"))
