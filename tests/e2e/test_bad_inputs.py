"""What a user types wrong, run through ``cli.py`` as a subprocess (issue 29): every case ends with one ``error:``
block, exit code 2, no traceback, a message that names the problem, and an earlier run's ``last.ckpt`` untouched.

One tiny quickstart fit makes that run; each case then runs against the same log folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from clitools import TINY, run_cli

QUICK = ["--config", "configs/quickstart.yaml", *TINY]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 2-step quickstart run (its last.ckpt is what every case must leave byte-identical) and the bad files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run_cli("fit", *QUICK, "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(root / "runs"))
    last = root / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "image.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (root / "notes.ckpt").write_text("step 2, looked fine\n")
    (root / "empty_folder").mkdir()
    (root / "empty_folder" / "README.txt").write_text("images go here\n")
    (root / "unknown_key.yaml").write_text("model:\n  init_args:\n    learning_rate: 0.1\n")
    (root / "broken.yaml").write_text("model:\n  init_args: {lr: 0.1\n  unet: [\n")
    return {"root": root, "last": last, "sha": hashlib.sha256(data).hexdigest()}


def _ckpt(name: str):
    return lambda r: str(r["root"] / name) if name != "last" else str(r["last"])


# (id, subcommand, arguments (callables get the fixture), a word of the message)
CASES = [
    ("unknown config key", "fit", [*QUICK, lambda r: "--config", lambda r: str(r["root"] / "unknown_key.yaml")],
     "learning_rate"),
    ("typo in a flag", "fit", ["--model.init_args.num_stepz", "3"], "num_stepz"),
    ("config file missing", "fit", ["--config", "configs/ddpm_shapez.yaml"], "ddpm_shapez.yaml"),
    ("malformed yaml", "fit", [lambda r: "--config", lambda r: str(r["root"] / "broken.yaml")], "broken.yaml"),
    ("wrong type", "fit", ["--trainer.max_steps", "ten"], "max_steps"),
    ("negative batch size", "fit", ["--data.init_args.batch_size", "-4"], "batch_size"),
    ("image size the UNet cannot take", "fit", ["--data.init_args.image_size", "18"], "divisible by 4"),
    ("unknown schedule", "fit", ["--model.init_args.process.init_args.schedule", "cosinus"], "cosinus"),
    ("negative learning rate", "fit", ["--model.init_args.lr", "-0.001"], "lr"),
    ("EMA decay above 1", "fit", ["--model.init_args.ema_decay", "1.5"], "ema_decay"),
    ("unknown data class", "fit", ["--data", "diffproc.data.shapes.ShapeDataModule"], "ShapeDataModule"),
    ("no GPU on this machine", "fit", ["--trainer.accelerator", "gpu"], "gpu"),
    ("sample grid asks more steps than the process has", "fit", ["--sample_grid.sampling.num_steps", "5000"], "5000"),
    ("image folder missing", "fit", ["--data", "diffproc.data.folder.ImageFolderDataModule",
                                     lambda r: "--data.init_args.root", lambda r: str(r["root"] / "no_such_folder")],
     "not found"),
    ("image folder without images", "fit", ["--data", "diffproc.data.folder.ImageFolderDataModule",
                                            lambda r: "--data.init_args.root", lambda r: str(r["root"] / "empty_folder")],
     "holds no images"),
    ("unknown solver", "predict", ["--model.init_args.sampling.solver", "dpm++", "--ckpt_path", _ckpt("last")], "dpm++"),
    ("more sampling steps than the process has", "predict",
     ["--model.init_args.sampling.num_steps", "5000", "--ckpt_path", _ckpt("last")], "1000 or fewer"),
    ("zero sampling steps", "predict", ["--model.init_args.sampling.num_steps", "0", "--ckpt_path", _ckpt("last")], "num_steps"),
    ("no images to predict", "predict", ["--model.init_args.predict_num_samples", "0", "--ckpt_path", _ckpt("last")],
     "predict_num_samples"),
    ("checkpoint missing", "test", ["--ckpt_path", _ckpt("nope.ckpt")], "not found"),
    ("checkpoint truncated", "test", ["--ckpt_path", _ckpt("truncated.ckpt")], "truncated"),
    ("checkpoint is an image", "test", ["--ckpt_path", _ckpt("image.ckpt")], "not a PyTorch checkpoint"),
    ("checkpoint is a text file", "validate", ["--ckpt_path", _ckpt("notes.ckpt")], "not a PyTorch checkpoint"),
    ("checkpoint of another process", "test", ["--config", "configs/sie_shapes.yaml", *TINY, "--ckpt_path", _ckpt("last")],
     "written with the process diffproc.processes.ddpm.DDPMProcess"),
    ("checkpoint of another method", "test", ["--config", "configs/gddm_shapes.yaml", *TINY, "--ckpt_path", _ckpt("last")],
     "written by diffproc.methods.base.DiffusionModule"),
    ("a 0.1 checkpoint", "test", ["--ckpt_path", str(Path(__file__).parents[1] / "data/v0_1/ddpm_step3.ckpt")],
     "python -m diffproc.convert"),
    ("a 0.1 option", "fit", ["--model.init_args.sampling_steps", "3"], "sampling_steps"),
    ("checkpoint of another network", "test",
     ["--model.init_args.unet.block_out_channels", "[16, 32, 32]", "--ckpt_path", _ckpt("last")], "block_out_channels"),
    ("checkpoint without EMA weights asked for", "fit",
     ["--model.init_args.ema_decay", "0", "--trainer.max_steps", "4", "--ckpt_path", _ckpt("last")], "ema_decay"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_error_and_keeps_the_checkpoint(run, case):
    _, sub, args, word = case
    args = [a(run) if callable(a) else a for a in args]
    base = [] if any(a in ("--config", "--config=") for a in args) else QUICK  # a case with its own config
    p = run_cli(sub, *base, *args, "--trainer.logger.init_args.save_dir", str(run["root"] / "runs"), check=False)
    assert p.returncode == 2, f"exit code {p.returncode}:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "error:" in p.stderr and word in p.stderr[p.stderr.find("error:"):], p.stderr[-3000:]
    assert hashlib.sha256(run["last"].read_bytes()).hexdigest() == run["sha"], "the earlier last.ckpt changed"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20
