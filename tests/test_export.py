"""Models in and out: export to diffusers folders (DDPM/DDIM pipelines, DiffprocPipeline), import of a diffusers
UNet with ``init_from``, and loading the exported folders offline in a fresh process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMPipeline, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

from clitools import REPO, TINY, run_cli
from diffproc.cli import main as cli_main
from diffproc.errors import ConfigError
from diffproc.interop.export import export_checkpoint, export_module
from diffproc.interop.export import main as export_main
from diffproc.interop.pipelines import DiffprocPipeline
from diffproc.nets.unet import shift_time_input
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.edge import EdgePreservingProcess
from diffproc.processes.interpolation import InterpolationProcess
from diffproc.nets.precond import EpsHead, VHead
from diffproc.processes.rng import sample_seed
from diffproc.samplers import SamplingSpec
from modules import build
from modules import gddm as gddm_module

ddpm_module, epdm_module, blur_module, sie_module = (partial(build, p) for p in (
    DDPMProcess, EdgePreservingProcess, BlurProcess, InterpolationProcess))

UNET = {"block_out_channels": [8, 16], "layers_per_block": 1}
SIZE, T, TOL = 8, 20, 1e-4

#: the methods that export to DiffprocPipeline (name, class, arguments); num_steps as cli.py predict uses them
GENERIC = [
    ("gddm", gddm_module, {"num_steps": 5}),
    ("gddm_poisson_net", gddm_module, {"num_steps": 5, "reconstruction": "poisson_net", "dc_mode": "dataset_mean"}),
    ("epdm", epdm_module, {"num_steps": 5}),
    ("blur", blur_module, {}),  # the paper's sampler: every one of the N - 1 steps
    ("sie", sie_module, {"solver": "heun", "num_steps": 4}),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _perturbed(module: L.LightningModule, seed: int = 0) -> L.LightningModule:
    """A "trained" tiny module: EMA weights (and any Poisson net / running mean) differ from the raw ones and from
    the initialisation (the Poisson net's last conv starts at zero, which would hide it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (module.ema_unet, getattr(module, "poisson_net", None)):
            if net is not None:
                for p in net.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        if hasattr(module, "dc_mean"):
            module.dc_mean.copy_(torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64))
            module.dc_count.fill_(64.0)
    return module.eval()


def _build(cls, **kw) -> L.LightningModule:
    torch.manual_seed(0)
    return cls(image_size=SIZE, channels=3, unet=UNET, num_timesteps=T, **kw)


def _save_ckpt(module: L.LightningModule, path: Path, global_step: int = 123) -> Path:
    """A checkpoint as ``cli.py fit`` writes it (state, hyperparameters with the class path, step)."""
    hp = dict(module.hparams)
    hp["_class_path"] = f"{type(module).__module__}.{type(module).__qualname__}"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp, "global_step": global_step, "epoch": 1,
                "pytorch-lightning_version": L.__version__}, path)
    return path


def _max_diff(images_01: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |difference| in diffproc's [-1, 1] units between pipeline images in [0, 1] and diffproc images."""
    return float((images_01 * 2 - 1 - reference).abs().max())


# --- the time shift ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [True, False])
def test_time_shift_folds_into_the_time_embedding(flip):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, layers_per_block=1,
                       flip_sin_to_cos=flip, freq_shift=0 if flip else 1).eval()
    shifted = shift_time_input(copy.deepcopy(unet), 1.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for t in (0.0, 7.0, 999.0):
            assert (shifted(x, torch.tensor([t, t])).sample - unet(x, torch.tensor([t + 1, t + 1])).sample).abs().max() < 1e-5
    back = shift_time_input(shifted, -1.0)
    assert torch.allclose(back.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight, atol=1e-6)


# --- export: DDPM/DDIM -> diffusers' own pipelines --------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"precond": VHead(), "schedule": "cosine", "variance": "fixedlarge"}],
                         ids=["eps-linear-fixedsmall", "v-cosine-fixedlarge"])
def test_ddpm_export_samples_like_diffproc_in_ddpm_and_ddim_pipelines(tmp_path, kw):
    module = _perturbed(_build(ddpm_module, **kw))
    out = export_module(module, tmp_path / "ddpm")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    p = module.process
    assert sched["_class_name"] == "DDPMScheduler" and sched["num_train_timesteps"] == T
    assert sched["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[module.precond.name]
    assert sched["variance_type"] == {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}[p.variance]
    assert sched["beta_schedule"] == {"linear": "linear", "cosine": "squaredcos_cap_v2"}[kw.get("schedule", "linear")]
    assert sched["clip_sample"] is True and sched["clip_sample_range"] == 1.0
    diffs = {}
    for pipe_cls, solver, steps in ((DDPMPipeline, "ancestral", T), (DDPMPipeline, "ancestral", 10),
                                    (DDIMPipeline, "ddim", T), (DDIMPipeline, "ddim", 5)):
        pipe = pipe_cls.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
                   output_type="pt").images
        ref = module.sample(3, SamplingSpec(num_steps=steps, solver=solver), generator=torch.Generator().manual_seed(1),
                            progress=False).images
        diffs[f"{pipe_cls.__name__}/{steps}"] = _max_diff(got, ref)
    # per-sample generators = diffproc's per-sample seeds (what cli.py predict uses)
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(sample_seed(5, i)) for i in range(3)]
    diffs["DDPMPipeline/seeds"] = _max_diff(pipe(batch_size=3, generator=gens, num_inference_steps=T,
                                                 output_type="pt").images,
                                            module.sample(3, SamplingSpec(num_steps=T, solver="ancestral", seed=5),
                                                          progress=False).images)
    print("max abs diff (DDPM export)", kw, diffs)
    assert max(diffs.values()) <= TOL, diffs
    # the card names diffusers' scheduler of diffproc's DPM-Solver++ solvers, and the folder runs with it
    assert "DPMSolverMultistepScheduler" in (out / "README.md").read_text()
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_lu_lambdas=True)
    img = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=8, output_type="pt").images
    assert img.shape == (2, 3, SIZE, SIZE) and torch.isfinite(img).all()


# --- export: every other method -> DiffprocPipeline, against cli.py predict ----------------------------------
def _predict_config(module: L.LightningModule, path: Path) -> Path:
    hp = {k: v for k, v in json.loads(json.dumps(dict(module.hparams), default=list)).items()
          if v is not None and k not in ("image_size", "channels")}
    cfg = {"seed_everything": 0,
           "trainer": {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                       "accelerator": "cpu", "devices": 1, "default_root_dir": str(path.parent)},
           "model": {"class_path": f"{type(module).__module__}.{type(module).__qualname__}", "init_args": hp},
           "data": {"class_path": "diffproc.data.shapes.ShapesDataModule",
                    "init_args": {"image_size": SIZE, "num_train": 8, "num_val": 8, "num_test": 8}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name,cls,kw", GENERIC, ids=[g[0] for g in GENERIC])
def test_generic_export_samples_like_cli_predict(tmp_path, name, cls, kw):
    module = _perturbed(_build(cls, **kw))
    ckpt = _save_ckpt(module, tmp_path / "model.ckpt")
    out = export_checkpoint(ckpt, tmp_path / name)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DiffprocPipeline"
    pipe = DiffprocPipeline.from_pretrained(out)
    n, seed = 3, 11
    got = pipe(batch_size=n, seed=seed, output_type="pt").images
    # what cli.py predict computes for these indices (module.predict_step -> sample(seed, indices)), in floats
    diff = _max_diff(got, module.sample(n, SamplingSpec(seed=seed), progress=False).images)
    # and cli.py predict itself: its 8-bit PNGs lie within half a level of the pipeline's images
    pred = tmp_path / "pred"
    cli_main(["predict", "--config", str(_predict_config(module, tmp_path / "cfg.yaml")), "--ckpt_path", str(ckpt),
              "--model.init_args.sampling.seed", str(seed), "--model.init_args.predict_num_samples", str(n),
              "--model.init_args.predict_batch_size", "2", "--model.init_args.predict_dir", str(pred)])
    png = torch.stack([torch.from_numpy(np.asarray(Image.open(pred / f"{i:06d}.png").convert("RGB"), dtype=np.float32))
                       .permute(2, 0, 1) / 255 for i in range(n)])
    png_diff = float((png - got).abs().max())
    print(f"max abs diff ({name}): pipeline vs diffproc sampler {diff:.3g}; vs cli.py predict PNG {png_diff:.4g}")
    assert diff <= TOL
    assert png_diff <= 0.5 / 255 + TOL
    # diffusers' own per-sample generator list gives the same images as the seed
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
    assert _max_diff(pipe(batch_size=n, generator=gens, output_type="pt").images, module.sample(
        n, SamplingSpec(seed=seed), progress=False).images) <= TOL


def test_export_command_model_card_and_raw_weights(tmp_path):
    module = _perturbed(_build(sie_module, num_steps=4))
    run = tmp_path / "run" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = _save_ckpt(module, run / "checkpoints" / "last.ckpt", global_step=777)
    (run / "metrics.json").write_text(json.dumps({"metrics": {"shapes_fid": 12.5, "shapes_kid": 0.01},
                                                  "protocol": {"num_samples": 2000}}))
    out = tmp_path / "export"
    export_main([str(ckpt), str(out), "--raw"])
    card = (out / "README.md").read_text()
    for needle in ("diffproc.processes.interpolation.InterpolationProcess", "training steps: 777", "shapes_fid | 12.5", "DiffprocPipeline",
                   "init_args:", "num_timesteps: 20"):
        assert needle in card, needle
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    raw = UNet2DModel.from_pretrained(out, subfolder="unet_raw")
    ema = UNet2DModel.from_pretrained(out, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), module.unet.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), module.ema_unet.state_dict().values()))
    with pytest.raises(SystemExit):  # a non-empty folder is not overwritten silently
        export_main([str(ckpt), str(out)])


# --- fresh process, offline, diffusers' API ----------------------------------------------------------------
LOADER = textwrap.dedent("""
    import sys, torch
    from diffusers import DDIMPipeline, DDPMPipeline
    ddpm, generic, out = sys.argv[1:4]
    res = {}
    for cls, steps in ((DDPMPipeline, 20), (DDIMPipeline, 5)):
        pipe = cls.from_pretrained(ddpm)
        pipe.set_progress_bar_config(disable=True)
        res[cls.__name__] = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps,
                                 output_type="pt").images
    assert not any(m == "diffproc" or m.startswith("diffproc.") for m in sys.modules), "DDPM folder needed diffproc"
    from diffproc.interop.pipelines import DiffprocPipeline
    res["DiffprocPipeline"] = DiffprocPipeline.from_pretrained(generic)(batch_size=2, seed=3, output_type="pt").images
    torch.save(res, out)
""")


def test_exported_folders_load_offline_in_a_fresh_process(tmp_path):
    ddpm = _perturbed(_build(ddpm_module))
    export_checkpoint(_save_ckpt(ddpm, tmp_path / "ddpm.ckpt"), tmp_path / "ddpm")
    gddm = _perturbed(_build(gddm_module, num_steps=5))
    export_main([str(_save_ckpt(gddm, tmp_path / "gddm.ckpt")), str(tmp_path / "gddm")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), DIFFUSERS_VERBOSITY="error")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ddpm"), str(tmp_path / "gddm"),
                           str(tmp_path / "res.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = torch.load(tmp_path / "res.pt")
    ref = {"DDPMPipeline": ddpm.sample(2, SamplingSpec(num_steps=T, solver="ancestral"), generator=torch.Generator().manual_seed(3),
                                       progress=False).images,
           "DDIMPipeline": ddpm.sample(2, SamplingSpec(num_steps=5, solver="ddim"), generator=torch.Generator().manual_seed(3),
                                       progress=False).images,
           "DiffprocPipeline": gddm.sample(2, SamplingSpec(seed=3), progress=False).images}
    diffs = {k: _max_diff(res[k], ref[k]) for k in ref}
    print("max abs diff (fresh process)", diffs)
    assert max(diffs.values()) <= TOL, diffs


# --- import: a diffusers folder as the backbone ----------------------------------------------------------------
def _random_unet_folder(path: Path, size: int = SIZE, in_ch: int = 3, out_ch: int = 3) -> Path:
    torch.manual_seed(1)
    UNet2DModel(sample_size=size, in_channels=in_ch, out_channels=out_ch, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                layers_per_block=1).save_pretrained(path)
    return path


def test_init_from_loads_a_diffusers_folder(tmp_path):
    folder = _random_unet_folder(tmp_path / "unet")
    ref = UNet2DModel.from_pretrained(folder).eval()
    sie = sie_module(image_size=SIZE, channels=3, num_timesteps=T, precond=EpsHead(min_alpha=1e-4), gamma=0.0,
                     init_from=str(folder))
    for net in (sie.unet, sie.ema_unet):  # no diffusers scheduler for SIE: weights as they are
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    ddpm = ddpm_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(folder)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():  # DDPM: diffproc's t is diffusers' timestep t - 1
        got = ddpm.denoiser(ddpm.sampling_net).raw(x, torch.tensor([7, 7]))
        assert (got - ref(x, torch.tensor([6, 6])).sample).abs().max() < 1e-5
    # round trip: export -> import gives the same network back
    out = export_module(ddpm, tmp_path / "export")
    again = ddpm_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(out))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again.unet.state_dict().values(),
                                                                ddpm.unet.state_dict().values()))


def test_init_from_says_what_does_not_fit(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ddpm_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        ddpm_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(tmp_path / "empty"))
    folder = _random_unet_folder(tmp_path / "unet", out_ch=6)
    with pytest.raises(ConfigError, match=r"out_channels=6 \(this model needs 3\)"):
        ddpm_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(folder))
    sie_module(image_size=SIZE, channels=3, num_timesteps=T, init_from=str(folder))  # dual heads: 2C outputs fit
    with pytest.raises(ConfigError, match=r"sample_size=8 \(this model needs 16\)"):
        sie_module(image_size=16, channels=3, num_timesteps=T, init_from=str(folder))


def test_cli_test_evaluates_a_diffusers_folder(tmp_path):
    folder = _random_unet_folder(tmp_path / "unet", size=16)
    run_cli("test", "--config", "configs/ddpm_shapes.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.init_from", str(folder), "--model.init_args.process.init_args.num_timesteps", "20",
            "--metrics.num_samples", "16", "--metrics.batch_size", "16", "--metrics.num_reference", "64",
            "--metrics.cache_dir", str(tmp_path / "cache"),
            "--trainer.limit_test_batches", "1")
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["protocol"]["num_samples"] == 16 and np.isfinite(metrics["metrics"]["shapes_fid"])
    assert (tmp_path / "ddpm_shapes" / "version_0" / "config.yaml").read_text().count(str(folder)) == 1
