"""Speed options of ``DiffusionModule`` (issue 20): ``compile_train`` / ``compile_sample``, ``channels_last``,
``fused_optimizer``.

* numerical guard: each option gives the eager loss, gradients, trained weights and samples on a tiny model
  (CPU) within the stated tolerances;
* checkpoints: one written with the options loads, resumes and exports without them, and the reverse; no
  ``_orig_mod.`` prefixes, the EMA is carried;
* every method's config takes the options (``--model.init_args.<option>``).

``torch.compile`` on a CPU spends minutes compiling a first graph (inductor's C++ build; seconds once its
on-disk cache is warm), so the compile tests are marked slow; channels-last and fused AdamW run in the default
suite.
"""

from __future__ import annotations

import copy
import json
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from diffproc.cli import DiffprocCLI
from diffproc.interop.export import export_module
from diffproc.errors import ConfigError
from diffproc.methods.base import DiffusionModule
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.edge import EdgePreservingProcess
from diffproc.processes.gradient import GradientDomainProcess
from diffproc.processes.interpolation import InterpolationProcess
from diffproc.samplers import SamplingSpec
from modules import GDDM_MEASURED, build

UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
SIZE = 8
#: the numerical guard's tolerances (float32, CPU): a memory format or a fused/compiled kernel changes the
#: order of float additions, never the math
LOSS_RTOL = 1e-5          # loss, relative
GRAD_ATOL = 1e-5          # gradients, absolute (relative 1e-4)
TRAJ_RTOL = 1e-5          # the losses of 3 AdamW steps, relative
WEIGHT_ATOL = 1e-6        # weights after 3 AdamW steps at lr 1e-3 from the same gradients (fused vs not, layouts)
# Weights after steps from each path's own gradients are not compared: Adam divides by the gradient's running
# RMS, so where a gradient is rounding noise (the attention key bias, zero by symmetry: softmax ignores it)
# a 1e-9 difference becomes an lr-sized step. The loss trajectory is the well-conditioned check.
SAMPLE_ATOL = 1e-4        # images in [-1, 1] after a 5-step sampler

OPTIONS = {"channels_last": True, "fused_optimizer": True}
METHODS = [("ddpm", DDPMProcess, {"num_timesteps": 50}),
           ("gddm", GradientDomainProcess, {"num_timesteps": 50, **GDDM_MEASURED}),
           ("lddm", GradientDomainProcess, {"num_timesteps": 50, "domain": "laplacian", **GDDM_MEASURED}),
           ("epdm", EdgePreservingProcess, {"num_timesteps": 50}),
           ("blur", BlurProcess, {"num_timesteps": 50, "solver": "ddim"}), ("sie", InterpolationProcess, {"num_timesteps": 50})]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _make(cls=DDPMProcess, seed: int = 0, **kw) -> DiffusionModule:
    torch.manual_seed(seed)
    args = dict(image_size=SIZE, channels=3, unet=UNET, num_steps=5, lr=1e-3, warmup_steps=0, ema_decay=0.9)
    args.update(kw)
    return build(cls, **args)


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _loss_and_grads(m: DiffusionModule, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    loss = m.compute_loss(x, m.unet, generator=torch.Generator().manual_seed(5))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def _train(m: DiffusionModule, x: torch.Tensor, steps: int = 3) -> tuple[list[float], dict]:
    opt = m.configure_optimizers()["optimizer"]
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = m.compute_loss(x, m.unet, generator=torch.Generator().manual_seed(i))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_matches_eager(options: dict, cls=DDPMProcess, **kw) -> None:
    x = _images()
    ref, opt = _make(cls, **kw), _make(cls, **kw, **options)
    l0, g0 = _loss_and_grads(ref, x)
    l1, g1 = _loss_and_grads(opt, x)
    torch.testing.assert_close(l1, l0, rtol=LOSS_RTOL, atol=0)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=GRAD_ATOL, msg=k)
    s0 = ref.sample(4, SamplingSpec(seed=3), progress=False).images
    s1 = opt.sample(4, SamplingSpec(seed=3), progress=False).images
    torch.testing.assert_close(s1, s0, rtol=0, atol=SAMPLE_ATOL)
    (loss0, w0), (loss1, w1) = _train(ref, x), _train(opt, x)
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss0), rtol=TRAJ_RTOL, atol=0)
    assert list(w1) == list(w0)


# --- numerical guard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"channels_last": True}, {"fused_optimizer": True}, OPTIONS],
                         ids=["channels_last", "fused", "both"])
def test_channels_last_and_fused_match_eager(options):
    _assert_matches_eager(options)


@pytest.mark.parametrize("name,cls,kw", METHODS[1:], ids=[m[0] for m in METHODS[1:]])
def test_every_method_matches_eager_with_the_options(name, cls, kw):
    _assert_matches_eager(OPTIONS, cls, **kw)


@pytest.mark.parametrize("options", [{"fused_optimizer": True}, {"channels_last": True}, OPTIONS],
                         ids=["fused", "channels_last", "both"])
def test_optimizer_steps_match_eager_on_the_same_gradients(options):
    """AdamW fused vs per-tensor, on channels-last vs contiguous weights: 3 steps fed the same gradients."""
    ref, opt = _make(), _make(**options)
    o0, o1 = ref.configure_optimizers()["optimizer"], opt.configure_optimizers()["optimizer"]
    assert all(bool(g.get("fused")) == bool(options.get("fused_optimizer")) for g in o1.param_groups)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p0, p1 in zip(ref.parameters(), opt.parameters()):
            if p0.requires_grad:
                p0.grad = torch.randn(p0.shape, generator=g)
                p1.grad = p0.grad.clone().to(memory_format=torch.channels_last) if p1.dim() == 4 and \
                    options.get("channels_last") else p0.grad.clone()
        o0.step(), o1.step()
    for (k, a), b in zip(ref.unet.state_dict().items(), opt.unet.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_channels_last_layout_and_contiguous_state():
    m = _make(**OPTIONS)
    conv = m.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert m.ema_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    state = m.state_dict()
    assert all(v.is_contiguous() for v in state.values())  # saved as an eager module saves them
    assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the live weights keep theirs
    assert list(state) == list(_make().state_dict())
    m2 = copy.deepcopy(m)
    assert all(v.is_contiguous() for v in m2.state_dict().values())


def test_bad_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="compile_sample must be one of"):
        _make(compile_sample="fast")


# --- checkpoints -------------------------------------------------------------------------------------------
def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     gradient_clip_val=1.0, num_sanity_val_steps=0)


def _loader() -> DataLoader:
    return DataLoader(_images(8, seed=2), batch_size=4)


def _fit_save(tmp_path, name: str, **options) -> tuple[str, dict]:
    m = _make(**options)
    trainer = _trainer(2)
    trainer.fit(m, _loader())
    path = str(tmp_path / f"{name}.ckpt")
    trainer.save_checkpoint(path)
    return path, torch.load(path, map_location="cpu", weights_only=True)


def _resume(path: str, **options) -> DiffusionModule:
    m = _make(seed=9, **options)  # other initial weights: the checkpoint must replace them all
    _trainer(3).fit(m, _loader(), ckpt_path=path)
    assert m.global_step == 3
    return m


@pytest.mark.parametrize("saved,loaded", [(OPTIONS, {}), ({}, OPTIONS)], ids=["options->eager", "eager->options"])
def test_checkpoints_load_and_resume_across_options(tmp_path, saved, loaded):
    path, ckpt = _fit_save(tmp_path, "a", **saved)
    state = ckpt["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    assert any(k.startswith("ema_unet.") for k in state)
    assert all(v.is_contiguous() for v in state.values())
    for st in ckpt["optimizer_states"][0]["state"].values():
        assert all(v.is_contiguous() for v in st.values() if isinstance(v, torch.Tensor))
    fresh = _make(**loaded)
    assert list(fresh.state_dict()) == list(state)
    fresh.load_state_dict(state, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    m = _resume(path, **loaded)
    # the configured implementation and layout won over the checkpoint's
    opt = m.trainer.optimizers[0]
    assert all(bool(g.get("fused")) == bool(loaded.get("fused_optimizer")) for g in opt.param_groups)
    for p in m.unet.parameters():
        for v in opt.state[p].values():
            if v.shape == p.shape:
                assert v.stride() == p.stride()
    # its first step has the loss of the same resume with the checkpoint's own options (same weights, noise, data)
    same = _resume(path, **saved)
    torch.testing.assert_close(m.trainer.callback_metrics["train/loss"], same.trainer.callback_metrics["train/loss"],
                               rtol=TRAJ_RTOL, atol=0)


def test_export_with_channels_last(tmp_path):
    """A channels-last module exports the very weights it samples with, loadable by diffusers: every tensor
    bitwise, except the time embedding's first layer, into which the export folds diffusers' one-step timestep
    shift (so the exported net at diffusers' t is ours at t + 1)."""
    from diffusers import UNet2DModel

    from diffproc.nets.unet import diffusers_timestep_shift

    m = _make(**OPTIONS)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in m.sampling_net.parameters())
    out = export_module(m, tmp_path / "export")
    net = UNet2DModel.from_pretrained(out / "unet").eval()
    loaded, ours = net.state_dict(), m.sampling_net.state_dict()
    assert loaded.keys() == ours.keys()
    assert [k for k in ours if not torch.equal(loaded[k], ours[k])] == ["time_embedding.linear_1.weight"]
    x, t = _images(2), torch.tensor([3, 17])
    shift = diffusers_timestep_shift(m.process)
    assert shift == 1
    with torch.no_grad():
        torch.testing.assert_close(net(x, t).sample, m.sampling_net.eval()(x, t + shift).sample,
                                   rtol=1e-4, atol=1e-5)


# --- every method's config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["quickstart", "ddpm_shapes", "gddm_shapes", "lddm_shapes", "epdm_shapes",
                                    "blur_shapes", "sie_shapes"])
def test_every_config_takes_the_options(config):
    cli = DiffprocCLI(args=["--config", f"configs/{config}.yaml", "--trainer.logger", "false",
                            "--data.init_args.image_size", str(SIZE), "--model.init_args.unet", json.dumps(UNET),
                            "--model.init_args.compile_train", "default",
                            "--model.init_args.compile_sample", "reduce-overhead",
                            "--model.init_args.channels_last", "true", "--model.init_args.fused_optimizer", "true"],
                      run=False)
    m = cli.model
    assert (m.compile_train, m.compile_sample, m.channels_last, m.fused_optimizer) == (
        "default", "reduce-overhead", True, True)
    assert m.hparams.compile_sample == "reduce-overhead"


# --- torch.compile (slow on a CPU: the first compile builds C++ kernels) ------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compiled_matches_eager():
    """Compiled (``default`` mode) training and sampling, alone and with channels-last and fused AdamW, give
    the eager loss, gradients, samples and trained weights within the same tolerances."""
    torch._dynamo.reset()  # compile here, whatever ran before in this process
    _assert_matches_eager({"compile_train": "default", "compile_sample": "default"})
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # the compiled path ran
    _assert_matches_eager({"compile_train": "default", "compile_sample": "default", **OPTIONS})


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compiled_checkpoints_load_and_resume_across_options(tmp_path):
    """A fit with every option (compiled training step and sampling included) writes the eager checkpoint
    layout; it resumes without the options and an eager checkpoint resumes with them."""
    every = {"compile_train": "default", "compile_sample": "default", **OPTIONS}
    path, ckpt = _fit_save(tmp_path, "compiled", **every)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert list(ckpt["state_dict"]) == list(_make().state_dict())
    m = _resume(path)
    m.sample(2, SamplingSpec(seed=0), progress=False)
    eager_path, _ = _fit_save(tmp_path, "eager")
    m = _resume(eager_path, **every)
    assert torch.isfinite(m.sample(2, SamplingSpec(seed=0), progress=False).images).all()
