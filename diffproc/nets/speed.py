"""Speed options of the backbone (issue 20): ``torch.compile`` of the UNet call, channels-last memory format,
and the optimiser hooks that keep checkpoints independent of both and of the fused AdamW kernel.

Room ``nets`` (the backbone): imports ``processes`` and ``errors``, never ``methods``; ``methods`` use it.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

# --- speed options (issue 20): compile, channels-last, fused AdamW ------------------------------------
#: ``torch.compile`` modes of ``compile_train`` / ``compile_sample`` ("none": eager)
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: modes that capture CUDA graphs on CUDA (their outputs are overwritten by the next replay: cloned)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def _unet_call(net: nn.Module, z: Tensor, t: Tensor) -> Tensor:
    """One backbone evaluation, output in the input's dtype (fp32 under bf16/fp16 autocast: the process
    math after the network stays in full precision)."""
    return net(z, t).sample.to(z.dtype)


_COMPILED: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {}


def compiled_unet_call(mode: str) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """:func:`_unet_call` under ``torch.compile(mode=mode)``, one per mode and process. The module is an
    argument, not a wrapped attribute: no ``OptimizedModule`` replaces ``self.unet``, so state-dict keys,
    EMA copies and checkpoints are the eager ones (no ``_orig_mod.`` prefixes)."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_unet_call, mode=None if mode == "default" else mode)
    return _COMPILED[mode]


def _contiguous_state_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of channels-last modules: their 4-D weights are saved contiguous, so a
    checkpoint (and a safetensors export, which refuses strided tensors) does not depend on the option."""
    for name in list(module._parameters) + list(module._buffers):
        v = state_dict.get(prefix + name)
        if isinstance(v, Tensor) and not isinstance(v, nn.Parameter) and not v.is_contiguous():
            state_dict[prefix + name] = v.contiguous()


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-D parameters and buffers in channels-last memory format (in place), saving them
    contiguous (:func:`_contiguous_state_hook`). Values and state-dict keys do not change; idempotent."""
    module.to(memory_format=torch.channels_last)
    for m in module.modules():
        if getattr(m, "_diffproc_contiguous_state", False):
            continue
        if any(t is not None and t.dim() == 4 for t in list(m._parameters.values()) + list(m._buffers.values())):
            m.register_state_dict_post_hook(_contiguous_state_hook)
            m._diffproc_contiguous_state = True
    return module


def _optimizer_state_contiguous(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer ``state_dict`` post-hook: moments saved contiguous whatever the parameters' memory format
    (new dicts: the live state keeps its layout)."""
    state_dict["state"] = {k: {n: (v.contiguous() if isinstance(v, Tensor) and not v.is_contiguous() else v)
                               for n, v in st.items()} for k, st in state_dict["state"].items()}
    return state_dict


def _optimizer_load_flags(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer ``load_state_dict`` pre-hook: the configured ``fused``/``foreach`` implementation wins over
    the one recorded in the checkpoint (torch would otherwise restore the saved flags with the groups)."""
    state_dict = dict(state_dict)
    groups = []
    for cur, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        saved = dict(saved)
        for key in ("fused", "foreach"):
            if key in cur:
                saved[key] = cur[key]
        groups.append(saved)
    state_dict["param_groups"] = groups + list(state_dict["param_groups"][len(groups):])
    return state_dict


def _optimizer_match_layout(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer ``load_state_dict`` post-hook: each moment takes its parameter's strides (a checkpoint of a
    contiguous run resumed channels-last, or the reverse; fused kernels need equal layouts)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            for n, v in (st or {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[n] = torch.empty_strided(p.shape, p.stride(), dtype=v.dtype, device=v.device).copy_(v)
