"""GDDM / LDDM diagnostics during ``fit`` and ``test`` (spec methods_gddm_epdm.md §2.9; docs/gddm.md).

:class:`GDDMDiagnostics` logs, for a :class:`~diffproc.methods.gddm.GDDM` model (any other model is left alone):

* every validation / test batch: the sparsity of the real images in the domain vs the image,
  ``val/sparsity_*`` / ``test/sparsity_*`` (:func:`~diffproc.processes.gradient_stats.sparsity`);
* every ``every_n_val`` validation runs, and once per test run: :func:`diagnostics` of ``num`` generated
  fields (the ``sampling`` override over the model's spec, 20 steps by default; EMA weights) and, with a Poisson net, of the first real images of the
  run, as ``val/diag_*`` / ``test/diag_*``.

``cli.py`` registers it for every run (``--gddm_diagnostics.*``, on by default); with a plain
``lightning.Trainer`` pass ``callbacks=[GDDMDiagnostics(...)]``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from diffproc.methods.base import images_of
from diffproc.methods.gddm import GDDM
from diffproc.processes.gradient_stats import integrability, sparsity
from diffproc.samplers import SamplingSpec

#: the diagnostics' own default override: few steps (they are cheap, not a quality measure)
DIAGNOSTICS_SAMPLING = SamplingSpec(num_steps=20)


@torch.no_grad()
def diagnostics(model: GDDM, num: int = 8, spec: Optional[SamplingSpec] = DIAGNOSTICS_SAMPLING,
                generator: Optional[torch.Generator] = None, x_real: Optional[Tensor] = None,
                sparsity_delta: float = 0.02) -> dict[str, float]:
    """Cheap GDDM diagnostics of ``model`` as a flat dict of floats.

    Generated (``num`` samples with the sampling spec ``spec`` over the model's — 20 steps by default —, EMA
    weights; noise from ``generator``, default one stream seeded with the spec's ``seed``): ``gen_curl_energy`` = ‖curl ĝ‖/‖ĝ‖ and
    ``gen_ls_residual`` = ‖D poisson(ĝ) − ĝ‖/‖ĝ‖ (Laplacian: mean part only), ``gen_seconds``; with a Poisson
    net also ``gen_net_vs_dct_rms`` and the per-batch times ``dct_seconds``/``poisson_net_seconds``.
    Real images ``x_real`` (optional, the first ``num`` are used): ``real_domain_frac``/``real_image_frac``/
    kurtosis/L1-L2 sparsity (δ = ``sparsity_delta``), and with a Poisson net ``real_dct_rms`` /
    ``real_net_rms`` reconstruction errors of clean fields.
    ``dc_mode="oracle"`` cannot generate, so only the real-image entries are returned then.
    """
    p = model.process
    out: dict[str, float] = {}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        r = fn()
        sync()
        return r, time.perf_counter() - t0

    def rms(a: Tensor, b: Tensor) -> float:
        return float((a.double() - b.double()).pow(2).mean().sqrt())

    if p.dc_mode != "oracle":
        run = model.sampling_spec(spec)
        g = generator or torch.Generator(device=model.device).manual_seed(run.seed)
        res, sec = timed(lambda: model.sample(num, replace(run, seed=None), g, progress=False))
        z = res.sample
        out.update({f"gen_{k}": v for k, v in integrability(p, z).items()})
        out["gen_seconds"] = sec
        if model.poisson_net is not None:
            x_dct, t_dct = timed(lambda: model.dct_reconstruct(z))
            x_net, t_net = timed(lambda: model.decode(z))
            out.update(gen_net_vs_dct_rms=rms(x_net, x_dct), dct_seconds=t_dct, poisson_net_seconds=t_net)
    if x_real is not None:
        x_real = x_real[:num].to(model.device)
        out.update({f"real_{k}": v for k, v in sparsity(p, x_real, sparsity_delta).items()})
        if model.poisson_net is not None:
            z0 = p.to_domain(x_real)
            out["real_dct_rms"] = rms(model.dct_reconstruct(z0, x_real), x_real)
            out["real_net_rms"] = rms(model.decode(z0, x_real), x_real)
    return out


class GDDMDiagnostics(L.Callback):
    """Sparsity of the real batches and generated-field diagnostics of a GDDM model (module docstring).

    Args:
        every_n_val: generated-field diagnostics every N validation runs (the 1st, N+1th, …; not during the
            sanity check); 0 = never. ``test`` runs them once, whatever N.
        num: generated images, and real images of the run's first batch, of those diagnostics.
        sampling: override of the model's sampling spec for those diagnostics
            (:class:`~diffproc.samplers.SamplingSpec`; unset fields inherit ``model.init_args.sampling``). Default
            ``num_steps: 20`` (few: they are cheap, not a quality measure; ``--gddm_diagnostics.sampling.num_steps
            null`` takes the model's). Their noise is one stream seeded with the spec's ``seed``, the same on every
            rank and at every run.
        sparsity_delta: threshold δ of the sparsity fraction (un-normalised image units, spec §2.9).
    """

    def __init__(self, every_n_val: int = 1, num: int = 8, sampling: Optional[SamplingSpec] = DIAGNOSTICS_SAMPLING,
                 sparsity_delta: float = 0.02) -> None:
        if every_n_val < 0 or num < 1:
            raise ValueError(f"GDDMDiagnostics: every_n_val must be >= 0 and num >= 1 "
                             f"(got every_n_val={every_n_val}, num={num})")
        self.every_n_val, self.num = int(every_n_val), int(num)
        self.sampling, self.sparsity_delta = SamplingSpec.of(sampling), float(sparsity_delta)
        self.val_runs = 0  # validation runs seen (in the checkpoint: the cadence survives a resume)
        self._real: Optional[Tensor] = None

    # --- per batch: sparsity of the real images, first images kept ----------------------------------
    def _batch(self, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int,
               stage: str) -> None:
        if not isinstance(pl_module, GDDM):
            return
        x = images_of(batch)
        s = sparsity(pl_module.process, x, self.sparsity_delta)
        pl_module.log_dict({f"{stage}/sparsity_{k}": v for k, v in s.items()}, sync_dist=True)
        if batch_idx == 0 and dataloader_idx == 0:
            self._real = x[: self.num].detach()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(pl_module, batch, batch_idx, dataloader_idx, "val")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(pl_module, batch, batch_idx, dataloader_idx, "test")

    # --- per run: generated-field diagnostics ----------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, GDDM) and pl_module.process.dc_mode != "oracle" and (
                stage == "test" or (stage == "fit" and self.every_n_val > 0)):
            pl_module.check_sampling(self.sampling, "--gddm_diagnostics.sampling")

    def log_diagnostics(self, pl_module: GDDM, stage: str) -> dict[str, float]:
        d = diagnostics(pl_module, self.num, self.sampling, None, self._real, self.sparsity_delta)
        d = {k: v for k, v in d.items() if not k.startswith("real_") or "rms" in k}  # sparsity: per batch above
        pl_module.log_dict({f"{stage}/diag_{k}": v for k, v in d.items()}, sync_dist=True)  # same seed on every rank
        self._real = None
        return d

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, GDDM) or trainer.sanity_checking or self.every_n_val <= 0:
            return
        self.val_runs += 1
        if (self.val_runs - 1) % self.every_n_val == 0:
            self.log_diagnostics(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, GDDM):
            self.log_diagnostics(pl_module, "test")

    # --- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs} if self.val_runs else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))


__all__ = ["GDDMDiagnostics", "diagnostics"]
