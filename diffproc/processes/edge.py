"""EPDM — edge-preserving noise (Vandersanden et al. 2024, arXiv 2410.01540), on the Gaussian core.

Spec: methods_gddm_epdm.md §1 (equations recovered from the official code). With ``G = G(x0)`` the
normalised squared Sobel magnitude (:func:`diffproc.ops.edge_map`, §1.2)::

    d_t(x0) = (1 − τ(t))·sqrt(1 + G/λ(t)) + τ(t)                       (§1.4)
    x_t     = sqrt(ᾱ_t)·x0 + σ_t(x0) ⊙ ε,   σ_t(x0) = sqrt(1 − ᾱ_t) / d_t(x0)   (Eqs. 11, 12)
    loss    = ‖f_θ(x_t, t) − σ_t(x0) ⊙ ε‖²   (the network predicts the *scaled* noise, Eq. 15)
    x̂0      = (x_t − f_θ) / sqrt(ᾱ_t)      (Eq. 7; not clipped, as in the code)

and the per-pixel Gaussian posterior (Eqs. 3, 5, 6, 13, 14, float64) with ``G = G(x̂0)`` recomputed at
every reverse step (§1.7).

The process is the Gaussian core (:class:`~diffproc.processes.gaussian.GaussianProcess`) with one
hook: :meth:`EdgePreservingProcess.alpha_sigma_given` returns σ_t(x0) per pixel, and the network is a
σε head (``diffproc.nets.precond.SigmaEpsHead``, the only head it takes). Loss, forward marginal, posterior, ancestral and DDIM(η) steps are
the core's (``work_dtype`` float64, as the official code). DDIM is an **extension**: the DDIM family
q(x_s | x_t, x0) = N(α_s x0 + sqrt(σ_s(x0)² − c²)(x_t − α_t x0)/σ_t(x0), c²) keeps every marginal
q(x_s | x0) = N(α_s x0, σ_s(x0)²) for any x0-dependent σ, so the DDIM derivation holds per x0
(docs/epdm.md). No probability-flow ODE is offered: the score of p_t needs E[ε/σ_t(x0) | x_t], which a
network trained on σ_t(x0) ⊙ ε does not give.

Time convention (same as :class:`~diffproc.processes.ddpm.DDPMProcess`, whose β/ᾱ tables, training
time law U{1..T}, ``N(0, I)`` prior and loss reduction are reused): ``t ∈ {0, …, T}``, ``t = 0`` clean.
The paper/code index is ``k = t − 1 ∈ {0, …, T−1}``; τ and λ are evaluated at ``k`` and the backbone
receives ``k`` (:meth:`model_time`), so the network sees exactly the official time input.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffproc.ops import edge_map, perona_malik
from diffproc.processes.base import MULTISTEP_SOLVERS
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.gaussian import DATA_DEPENDENT_REFUSAL

Transition = Literal["linear", "linear_continuous", "cosine", "sigmoid", "constant"]
TRANSITIONS = ("linear", "linear_continuous", "cosine", "sigmoid", "constant")


class EdgePreservingProcess(DDPMProcess):
    """Hybrid edge-preserving / isotropic noise of EPDM (spec §1.3–1.7) on the Gaussian core:
    ancestral (paper) and DDIM(η) (extension) sampling.

    Args:
        num_timesteps: T (500 CelebA/Church, 750 AFHQ-Cat). ``beta_start``/``beta_end``: linear β (§1.1).
        lambda_min, lambda_max: edge sensitivity λ(k) = λ_min + k/(t_Φ·T)·(λ_max − λ_min) (§1.3).
        t_phi: transition point t_Φ ∈ (0, 1] (fraction of T).
        transition: τ(k) with ts = k/(T−1) — ``linear`` (code: ts below t_Φ, then 1; discontinuous),
            ``linear_continuous`` (min(ts/t_Φ, 1), [recon]), ``cosine`` ((1 − cos πts)/2, ignores t_Φ),
            ``sigmoid`` (1/(1+exp(−k(ts − t_Φ))), code name ``exponential``), ``constant`` (τ ≡ 1:
            isotropic DDPM-like noise; extension, paper §4.1 ablation).
        sigmoid_k: slope of ``sigmoid`` (10 AFHQ, 20 otherwise).
        train_transition: τ used by :meth:`loss`/:meth:`forward` at training time; ``None`` = ``transition``.
            ``"cosine"`` with ``transition="linear"`` reproduces the official train.py/sample.py mismatch.
        edge_norm: ``image_max`` (per image, batch-independent) | ``batch_max`` (official) | ``none``.
        edge_padding: ``zeros`` (official, border shows as edges) | ``replicate``.
        lambda_for_s: λ used in σ_s of the posterior: ``t`` (official quirk) | ``s`` (consistent).
        final: ``state`` (official: the noisy state at k = 0) | ``x0`` (return x̂0 of the last step).
        loss_reduction: ``sum`` over C·H·W then batch mean (official) | ``mean``.
        clip_x0: clip x̂0 to [-1, 1] before the edge map and posterior (the code does not).
        edge_eps: guard of the edge-map normalisation (constant image -> G = 0).
        default_solver: ``ancestral`` (paper) or ``ddim``.
    """

    solvers = ("ancestral", "ddim")
    default_solver = "ancestral"
    heads = ("sigma_eps",)
    default_head = "sigma_eps"
    data_dependent = True
    work_dtype = torch.float64

    def unknown_solver_message(self, solver: str) -> str:
        """The DPM-Solver++ family is refused with the reason (σ_t depends on x0; docs/epdm.md)."""
        if solver in MULTISTEP_SOLVERS:
            return DATA_DEPENDENT_REFUSAL.format(name=type(self).__name__, solver=solver)
        return super().unknown_solver_message(solver)

    def __init__(self, num_timesteps: int = 500, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 lambda_min: float = 1e-6, lambda_max: float = 1e-1, t_phi: float = 0.5,
                 transition: Transition = "linear", sigmoid_k: float = 20.0,
                 train_transition: Transition | None = None,
                 edge_norm: Literal["image_max", "batch_max", "none"] = "image_max",
                 edge_padding: Literal["zeros", "replicate"] = "zeros",
                 lambda_for_s: Literal["t", "s"] = "t", final: Literal["state", "x0"] = "state",
                 loss_reduction: Literal["sum", "mean"] = "sum", clip_x0: bool = False,
                 edge_eps: float = 1e-12, default_solver: str = "ancestral") -> None:
        super().__init__(num_timesteps=num_timesteps, schedule="linear", beta_start=beta_start,
                         beta_end=beta_end, variance="fixedsmall",
                         clip_x0=clip_x0, loss_reduction=loss_reduction, default_solver=default_solver)
        for name, value, allowed in (("transition", transition, TRANSITIONS),
                                     ("train_transition", train_transition, TRANSITIONS + (None,)),
                                     ("edge_norm", edge_norm, ("image_max", "batch_max", "none")),
                                     ("edge_padding", edge_padding, ("zeros", "replicate")),
                                     ("lambda_for_s", lambda_for_s, ("t", "s")),
                                     ("final", final, ("state", "x0"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if not 0 < t_phi <= 1:
            raise ValueError(f"t_phi must lie in (0, 1], got {t_phi}")
        if not 0 < lambda_min <= lambda_max:
            raise ValueError(f"need 0 < lambda_min <= lambda_max, got {lambda_min}, {lambda_max}")
        self.lambda_min, self.lambda_max, self.t_phi = float(lambda_min), float(lambda_max), float(t_phi)
        self.transition, self.sigmoid_k = transition, float(sigmoid_k)
        self.train_transition = train_transition or transition
        self.edge_norm, self.edge_padding, self.edge_eps = edge_norm, edge_padding, float(edge_eps)
        self.lambda_for_s, self.final = lambda_for_s, final
        self._g_key: Tensor | None = None
        self._g_val: Tensor | None = None

    # --- schedules (§1.3), t 1-based, evaluated at k = t − 1 -------------------------------------
    def model_time(self, t: Tensor) -> Tensor:
        """The official network input: the 0-based index k = t − 1."""
        return (t - 1).float()

    def tau(self, t: Tensor, transition: str | None = None) -> Tensor:
        """τ(k) in float64, ``t`` 1-based (``t = 0``, clean, gives τ = 0)."""
        ts = (t.to(torch.float64) - 1).clamp_min(0) / (self.num_timesteps - 1)
        kind = transition or self.transition
        if kind == "linear":
            return torch.where(ts < self.t_phi, ts, torch.ones_like(ts))
        if kind == "linear_continuous":
            return (ts / self.t_phi).clamp(max=1.0)
        if kind == "cosine":
            return (1 - torch.cos(math.pi * ts)) / 2
        if kind == "sigmoid":
            return torch.sigmoid(self.sigmoid_k * (ts - self.t_phi))
        return torch.ones_like(ts)  # constant

    def lam(self, t: Tensor) -> Tensor:
        """λ(k) = λ_min + k/(t_Φ T)·(λ_max − λ_min), float64 (keeps extrapolating past t_Φ, as the code)."""
        k = (t.to(torch.float64) - 1).clamp_min(0)
        return self.lambda_min + k / (self.t_phi * self.num_timesteps) * (self.lambda_max - self.lambda_min)

    def edges(self, x: Tensor) -> Tensor:
        """G(x) in float64, ``(B, 1, H, W)`` (the process's normalisation and padding rules)."""
        return edge_map(x.to(torch.float64), self.edge_norm, self.edge_padding, self.edge_eps)

    def sigma(self, g: Tensor, t: Tensor, lam_t: Tensor | None = None,
              transition: str | None = None) -> Tensor:
        """σ_t(x0) = sqrt(1 − ᾱ_t)/d_t per pixel, float64 ``(B, 1, H, W)`` (Eq. 11). ``lam_t``
        overrides the times at which λ is evaluated (the ``lambda_for_s="t"`` quirk)."""
        view = (-1, 1, 1, 1)
        tau = self.tau(t, transition).view(view)
        lam = self.lam(t if lam_t is None else lam_t).view(view)
        d = (1 - tau) / perona_malik(g, lam) + tau
        b = self.alpha_sigma(t)[1].view(view)
        return b / d

    # --- the Gaussian core's data-dependent hook (§1.4, Eqs. 11, 12) ----------------------------
    def alpha_sigma_given(self, t: Tensor, x0: Tensor | None = None, *, t_from: Tensor | None = None,
                          train: bool = False) -> tuple[Tensor, Tensor]:
        """``(sqrt(ᾱ_t), σ_t(x0))``: σ per pixel from G(x0) (float64 ``(B, 1, H, W)``), with the training
        τ when ``train`` and λ(t_from) in a reverse step's σ_s under ``lambda_for_s="t"`` (official).
        Without x0 it is DDPM's isotropic pair (the prior and the end points)."""
        if x0 is None:
            return self.alpha_sigma(t)
        lam_t = t_from if (t_from is not None and self.lambda_for_s == "t") else None
        transition = self.train_transition if train else None
        return self.alpha_sigma(t)[0], self.sigma(self._edges_cached(x0), t, lam_t=lam_t, transition=transition)

    def _edges_cached(self, x0: Tensor) -> Tensor:
        """G(x0), reused while the same x̂0 tensor is asked again within a step (σ_t, σ_s, ε̂)."""
        if self._g_key is not x0:
            self._g_key, self._g_val = x0, self.edges(x0)
        return self._g_val

    def timesteps(self, num_steps: int | None = None) -> list[int]:
        """Descending 1-based grid. ``final="state"``: ``[T, …, 1]`` (T − 1 steps, official; returns the
        state at k = 0); ``final="x0"``: ``[T, …, 2, 0]`` (the last step returns x̂0 at k = 1).
        ``num_steps < T − 1`` gives a uniformly strided grid (extension: the paper samples every step)."""
        T = self.num_timesteps
        n = T - 1 if num_steps is None else int(num_steps)
        if not 1 <= n <= T - 1:
            raise ValueError(f"EPDM takes 1..{T - 1} sampling steps (T={T}), got {num_steps}")
        if self.final == "state":
            return [int(v) for v in np.round(np.linspace(T, 1, n + 1))]
        if n == 1:
            return [T, 0]
        return [int(v) for v in np.round(np.linspace(T, 2, n))] + [0]
