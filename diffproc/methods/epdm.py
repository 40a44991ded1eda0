"""EPDM — Edge-Preserving Diffusion Models (Vandersanden, Holl, Huang, Singh; arXiv 2410.01540).

Algorithm box (spec methods_gddm_epdm.md §1): the forward noise is suppressed on the edges of x0
(``σ_t(x0) = sqrt(1−ᾱ_t)/d_t(x0)``) until the transition point t_Φ, then isotropic (DDPM); the network
predicts the scaled noise ``σ_t ⊙ ε``; sampling is ancestral with the edge map recomputed from x̂0 at
every step (paper), or DDIM(η) on the same per-pixel grids (extension, ``solver: ddim``). Stroke-guided generation (SDEdit) is :mod:`diffproc.methods.sdedit`, used by
``cli.py predict`` with a guide DataModule (:mod:`diffproc.data.strokes`). All the math lives in
:class:`~diffproc.processes.edge.EdgePreservingProcess`; this class names the knobs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from diffproc.methods.base import ConfigError, DiffusionModule
from diffproc.processes.edge import EdgePreservingProcess


class EPDM(DiffusionModule):
    """EPDM (pixel space).

    Args:
        num_timesteps: T (paper: 500; AFHQ-Cat 750). beta_start, beta_end: linear β (1e-4 → 2e-2).
        lambda_min, lambda_max: range of the linear edge sensitivity λ(t) (CelebA/Church 1e-6 → 1e-1,
            AFHQ-Cat 1e-4 → 1e-1).
        t_phi: transition point (fraction of T) where τ reaches 1 (paper: 0.5).
        transition: τ — ``linear`` (paper/code), ``linear_continuous``, ``cosine``, ``sigmoid``,
            ``constant`` (τ ≡ 1, DDPM-like). sigmoid_k: slope of ``sigmoid``.
        train_transition: τ for training only (``null`` = ``transition``; ``cosine`` = official train.py).
        edge_norm: ``image_max`` (default) | ``batch_max`` (official) | ``none``.
        edge_padding: ``zeros`` (official) | ``replicate``.
        lambda_for_s: ``t`` (official quirk) | ``s`` — λ used for σ_s in the posterior.
        final: ``state`` (official, noisy state at index 0) | ``x0`` (x̂0 of the last step).
        loss_reduction: ``sum`` (official) | ``mean``.
        clip_x0: clip x̂0 to [-1, 1] during sampling (official: no).
        eta: DDIM η for ``solver: ddim`` (extension; 0 = deterministic, 1 = the ancestral step).
        **kwargs: the shared options of :class:`DiffusionModule` (backbone, optimiser, EMA, sampling).
    """

    def __init__(self, num_timesteps: int = 500, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 lambda_min: float = 1e-6, lambda_max: float = 1e-1, t_phi: float = 0.5,
                 transition: Literal["linear", "linear_continuous", "cosine", "sigmoid", "constant"] = "linear",
                 sigmoid_k: float = 20.0,
                 train_transition: Optional[Literal["linear", "linear_continuous", "cosine", "sigmoid",
                                                    "constant"]] = None,
                 edge_norm: Literal["image_max", "batch_max", "none"] = "image_max",
                 edge_padding: Literal["zeros", "replicate"] = "zeros",
                 lambda_for_s: Literal["t", "s"] = "t", final: Literal["state", "x0"] = "state",
                 loss_reduction: Literal["sum", "mean"] = "sum", clip_x0: bool = False,
                 eta: float = 0.0, **kwargs: Any) -> None:
        try:
            process = EdgePreservingProcess(
                num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
                lambda_min=lambda_min, lambda_max=lambda_max, t_phi=t_phi, transition=transition,
                sigmoid_k=sigmoid_k, train_transition=train_transition, edge_norm=edge_norm,
                edge_padding=edge_padding, lambda_for_s=lambda_for_s, final=final,
                loss_reduction=loss_reduction, clip_x0=clip_x0, eta=eta)
        except ValueError as err:
            raise ConfigError(f"EPDM: {err}") from err
        steps = kwargs.get("num_steps") or kwargs.get("sampling_steps")
        if steps is not None and not 1 <= int(steps) <= int(num_timesteps) - 1:
            raise ConfigError(f"EPDM: num_steps={steps} must lie in 1..{int(num_timesteps) - 1} "
                              f"(T - 1 = the full chain; null = full)")
        super().__init__(process=process, **kwargs)
