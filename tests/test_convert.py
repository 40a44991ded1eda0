"""0.1 -> 0.2 converter (``python -m diffproc.convert``): checkpoints written by diffproc 0.1.0 (tests/data/v0_1,
made by its make.sh) convert, load and resume bit for bit; 0.1 configs convert to the injected-process form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clitools import assert_same_training_state, flat, load, run_cli
from diffproc.convert import STATE_KEYS, convert_config, convert_file, convert_model, main
from diffproc.interop.export import export_module, load_module
from diffproc.interop.pipelines import DiffprocPipeline
from diffproc.processes.interpolation import InterpolationProcess
from modules import build

DATA = Path(__file__).resolve().parent / "data" / "v0_1"


@pytest.mark.parametrize("name", ["ddpm", "gddm"])
def test_a_01_checkpoint_resumes_bitwise_under_02(tmp_path, name):
    """The converted step-3 checkpoint keeps every tensor (GDDM's σ_data buffers renamed to its ModeEDM head's);
    resumed to step 6 with the converted run config, it gives what 0.1.0 gave (weights, EMA, optimiser, LR schedule
    and loader state, bit for bit)."""
    old = DATA / f"{name}_step3.ckpt"
    ckpt = convert_file(old, tmp_path / "step3.ckpt")
    config = convert_file(DATA / f"{name}_run_config.yaml", tmp_path / "config.yaml")
    a, b = load(old), load(ckpt)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"):
        fa, fb = flat(a[key]), flat(b[key])
        if key == "state_dict":
            fa = {STATE_KEYS.get(k, k): v for k, v in fa.items()}
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), key
    hp = b["hyper_parameters"]
    assert "process" in hp and "sampler" not in hp and "sampling_steps" not in hp and "solver" not in hp
    assert set(hp["sampling"]) == {"solver", "num_steps", "time_grid", "ddim_eta", "seed", "strength"}
    assert "eta" not in hp["process"]["init_args"]
    rebuilt = load_module(ckpt)[0].process.config  # the export path builds the process from the hparams
    assert rebuilt["class_path"] == hp["process"]["class_path"]
    assert hp["process"]["init_args"].items() <= rebuilt["init_args"].items()

    run_cli("fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "6",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    resumed = next((tmp_path / "runs").glob("*/version_0/checkpoints/last.ckpt"))
    assert_same_training_state(resumed, convert_file(DATA / f"{name}_step6.ckpt", tmp_path / "step6.ckpt"))
    assert load(resumed)["loops"] == load(DATA / f"{name}_step6.ckpt")["loops"]


def test_01_configs_convert():
    """Method classes -> DiffusionModule/GDDM with the process under ``process``; former names and values; the
    split ``fault`` module; GDDM's diagnostics options -> the callback's section."""
    old = yaml.safe_load((DATA / "ddpm_run_config.yaml").read_text())
    old["trainer"]["plugins"] = [{"class_path": "diffproc.callbacks.fault.AtomicCheckpointIO"}]
    old["trainer"]["callbacks"] = [{"class_path": "diffproc.callbacks.fault.NonFiniteGuard"},
                                   {"class_path": "diffproc.callbacks.fault.ImageThroughputMonitor"}]
    old["sample_grid"]["sampler"] = "ancestral"
    new = convert_config(old)
    assert [p["class_path"] for p in new["trainer"]["plugins"] + new["trainer"]["callbacks"]] == [
        "diffproc.callbacks.atomic_io.AtomicCheckpointIO", "diffproc.callbacks.nonfinite.NonFiniteGuard",
        "diffproc.callbacks.throughput.ImageThroughputMonitor"]
    model = new["model"]
    assert model["class_path"] == "diffproc.methods.base.DiffusionModule"
    assert model["init_args"]["process"]["class_path"] == "diffproc.processes.ddpm.DDPMProcess"
    assert model["init_args"]["process"]["init_args"]["num_timesteps"] == 100
    spec = model["init_args"]["sampling"]
    assert spec["solver"] == "ddim" and spec["num_steps"] == 5 and spec["ddim_eta"] == 0.0
    assert not {"sampler", "solver", "num_steps", "seed"} & set(model["init_args"])
    assert "eta" not in model["init_args"]["process"]["init_args"]
    assert new["sample_grid"]["sampling"]["solver"] == "ancestral" and "solver" not in new["sample_grid"]
    assert convert_config(new) == new  # a 0.2 config stays as it is

    gddm = convert_config(yaml.safe_load((DATA / "gddm_tiny.yaml").read_text()))
    process = gddm["model"]["init_args"]["process"]["init_args"]
    assert process["clip_image"] is True and process["objective"] == "head"
    assert not {"prediction", "network_view", "loss_weighting", "sigma_data", "noise"} & set(process)
    head = gddm["model"]["init_args"]["precond"]
    assert head["class_path"] == "diffproc.nets.precond.ModeEDM"
    assert (head["init_args"]["parameterisation"], head["init_args"]["weighting"]) == ("x0", "edm")
    assert gddm["gddm_diagnostics"]["every_n_val"] == 2 and "diagnostics_every_n_val" not in gddm["model"]["init_args"]


def test_01_method_arguments_convert():
    _, args, _ = convert_model("diffproc.methods.sie.SIE", {"spacing": "ddim_quad", "heads": "eps", "lr": 1e-3})
    assert args == {"process": {"class_path": "diffproc.processes.interpolation.InterpolationProcess",
                                "init_args": {"heads": "eps", "spacing": "quad"}}, "lr": 1e-3}
    _, args, _ = convert_model("diffproc.methods.blur.BlurDiffusion", {"beta_schedule": "cosine", "image_size": 8})
    assert args["process"]["init_args"] == {"schedule": "cosine"} and args["image_size"] == 8
    path, args, _ = convert_model("diffproc.methods.gddm.GDDM", {"dc_mode": "dataset_mean", "reconstruction": "dct"})
    assert path == "diffproc.methods.gddm.GDDM" and args["reconstruction"] == "dct"
    assert args["process"]["init_args"]["clip_image"] is False  # 0.1 GDDM clipped the image only with dc_mode aux
    with pytest.raises(ValueError, match="disagree"):
        convert_model("diffproc.methods.ddpm.DDPM", {"sampler": "ddim", "solver": "ancestral"})
    data = convert_config({"data": {"class_path": "diffproc.data.strokes.StrokesDataModule",
                                    "init_args": {"sdedit_steps": 20, "sdedit_sampler": "ddim"}}})
    assert data["data"]["init_args"] == {} and data["model"]["init_args"]["sampling"] == {"num_steps": 20,
                                                                                         "solver": "ddim"}


def test_a_folder_exported_before_pipelines_moved_converts_and_loads(tmp_path):
    """diffusers names the scheduler's module in model_index.json and imports it on load: a folder that names the
    former ``diffproc.pipelines`` loads after ``python -m diffproc.convert OLD NEW``, and samples what it did."""
    torch.manual_seed(0)
    module = build(InterpolationProcess, image_size=8, channels=3, num_timesteps=20, ema_decay=0, solver="heun",
                   num_steps=2, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    out = export_module(module.eval(), tmp_path / "now")
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():  # the folder as it was written before the move
        if f.is_dir():
            shutil.copytree(f, old / f.name)
        else:
            (old / f.name).write_text(f.read_text().replace("diffproc.interop.pipelines", "diffproc.pipelines"))
    assert json.loads((old / "model_index.json").read_text())["scheduler"][0] == "diffproc.pipelines"
    with pytest.raises(ValueError, match=r"diffproc\.pipelines"):  # diffusers loads only modules imported before
        DiffprocPipeline.from_pretrained(old)
    main([str(old), str(tmp_path / "new")])
    new = tmp_path / "new"
    assert (new / "model_index.json").read_text() == (out / "model_index.json").read_text()
    assert (new / "README.md").read_text() == (out / "README.md").read_text()
    got = DiffprocPipeline.from_pretrained(new)(batch_size=2, seed=3, output_type="pt").images
    assert torch.equal(got, DiffprocPipeline.from_pretrained(out)(batch_size=2, seed=3, output_type="pt").images)


def test_separate_sampling_options_convert_to_the_spec(tmp_path):
    """The layout before the sampling spec (module-level solver/num_steps/time_grid/seed, the process's eta, the
    callbacks' solver/num_steps/seed, the strokes DataModule's SDEdit options) converts, configs and checkpoints;
    the result builds and a converted config is left as it is."""
    old = {"model": {"class_path": "diffproc.methods.base.DiffusionModule", "init_args": {
               "process": {"class_path": "diffproc.processes.ddpm.DDPMProcess",
                           "init_args": {"num_timesteps": 50, "eta": 0.3}},
               "solver": "ddim", "num_steps": 10, "time_grid": "logsnr", "seed": 4, "lr": 1e-3}},
           "sample_grid": {"every_n_steps": 5, "num_steps": 20, "solver": "ancestral", "seed": 1},
           "metrics": {"num_samples": 10, "seed": 2, "seeds": [0, 100], "num_steps": 5},
           "fid": {"solver": "ddim"},
           "gddm_diagnostics": {"num": 2, "num_steps": 3},
           "data": {"class_path": "diffproc.data.strokes.StrokesDataModule",
                    "init_args": {"strokes_from": "shapes", "strength": 0.4, "sdedit_num_steps": 8, "sdedit_seed": 7}}}
    new = convert_config(old)
    args = new["model"]["init_args"]
    assert args["sampling"] == {"solver": "ddim", "num_steps": 8, "time_grid": "logsnr", "seed": 7, "ddim_eta": 0.3,
                                "strength": 0.4}  # the strokes options drove the predict run: they win
    assert args["process"]["init_args"] == {"num_timesteps": 50} and args["lr"] == 1e-3
    assert new["sample_grid"] == {"every_n_steps": 5, "sampling": {"num_steps": 20, "solver": "ancestral", "seed": 1}}
    assert new["metrics"] == {"num_samples": 10, "seeds": [0, 100], "sampling": {"seed": 2, "num_steps": 5}}
    assert new["fid"] == {"sampling": {"solver": "ddim"}}
    assert new["gddm_diagnostics"] == {"num": 2, "sampling": {"num_steps": 3}}
    assert new["data"]["init_args"] == {"strokes_from": "shapes", "kmeans_seed": 7}
    assert convert_config(new) == new
    with pytest.raises(ValueError, match="t0"):
        convert_config({"data": {"init_args": {"t0": 30}}})
    with pytest.raises(ValueError, match="disagree"):
        convert_config({"model": {"class_path": "x.Y", "init_args": {"solver": "ddim",
                                                                     "sampling": {"solver": "ancestral"}}}})

    # a checkpoint of that layout: hyperparameters move, tensors stay; the module builds from it
    from diffproc.methods.base import DiffusionModule

    m = DiffusionModule(process={"class_path": "diffproc.processes.ddpm.DDPMProcess", "init_args": {"num_timesteps": 50}},
                        image_size=8, channels=3, ema_decay=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    hp = {k: v for k, v in dict(m.hparams).items() if k != "sampling"}
    hp.update(solver="ddim", num_steps=10, time_grid="logsnr", seed=4, _class_path="diffproc.methods.base.DiffusionModule")
    hp["process"] = {**hp["process"], "init_args": {**hp["process"]["init_args"], "eta": 0.3}}
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hp}, tmp_path / "old.ckpt")
    ckpt = load(convert_file(tmp_path / "old.ckpt", tmp_path / "new.ckpt"))
    assert ckpt["hyper_parameters"]["sampling"] == {"solver": "ddim", "num_steps": 10, "time_grid": "logsnr",
                                                    "ddim_eta": 0.3, "seed": 4, "strength": None}
    assert not {"solver", "num_steps", "time_grid", "seed"} & set(ckpt["hyper_parameters"])
    module = load_module(tmp_path / "new.ckpt")[0]
    assert module.sampling.ddim_eta == 0.3 and module.sampling.time_grid == "logsnr" and module.sampling.seed == 4
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in m.state_dict().items())
