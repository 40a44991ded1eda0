"""The CLI end to end, as a user runs it (subprocesses), and its error messages."""

from pathlib import Path

import torch

from clitools import TINY, run_cli


def _ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_fit_resume_predict(tmp_path):
    common = ["--config", "configs/quickstart.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--checkpoint.every_n_train_steps", "2", "--sample_grid.every_n_steps", "3"]
    run_cli("fit", *common, "--trainer.max_steps", "4")
    run_dir = tmp_path / "quickstart" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and _ckpt_step(last) == 4
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "step_0000003.png").is_file()
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("ema_unet.") for k in state), "checkpoint must carry the EMA weights"
    # EMA differs from the raw weights after training
    k = next(k for k in state if k.startswith("unet.") and k.endswith("weight"))
    assert not torch.equal(state[k], state["ema_" + k])

    # resume: continues the global step in the same run directory
    run_cli("fit", *common, "--trainer.max_steps", "7", "--ckpt_path", "last")
    assert _ckpt_step(last) == 7
    assert not (tmp_path / "quickstart" / "version_1").exists()

    # predict writes the asked number of PNGs
    out = tmp_path / "pred"
    run_cli("predict", "--config", "configs/quickstart.yaml", *TINY,
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(last),
            "--model.init_args.predict_num_samples", "5", "--model.init_args.predict_batch_size", "2",
            "--model.init_args.predict_dir", str(out))
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    # the exponential integrators and time grids are CLI options like any solver
    out3 = tmp_path / "pred_3m"
    p = run_cli("predict", "--config", "configs/quickstart.yaml", *TINY,
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(last),
                "--model.init_args.predict_num_samples", "2", "--model.init_args.predict_dir", str(out3),
                "--model.init_args.sampling.solver", "dpmpp_3m", "--model.init_args.sampling.time_grid", "logsnr",
                "--model.init_args.sampling.num_steps", "4")
    assert sorted(q.name for q in out3.glob("0*.png")) == ["000000.png", "000001.png"]
    assert (out3 / "000000.png").read_bytes() != (out / "000000.png").read_bytes()


def test_fit_without_a_logger(tmp_path):
    """``--trainer.logger false`` fits (the LR monitor, which needs a logger, is left out) and still checkpoints."""
    run_cli("fit", "--config", "configs/quickstart.yaml", *TINY, "--trainer.logger", "false", "--trainer.max_steps",
            "2", "--trainer.default_root_dir", str(tmp_path), "--sample_grid.every_n_steps", "0")
    assert [_ckpt_step(p) for p in tmp_path.rglob("last.ckpt")] == [2]


def test_bad_inputs_give_one_clear_error(tmp_path):
    base = ["--config", "configs/quickstart.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_steps", "1"]
    # unknown config key
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rate: 0.1\n")
    p = run_cli("fit", *base, "--config", str(bad), check=False)
    assert p.returncode != 0 and "learning_rate" in p.stderr
    # image size the UNet cannot take (3 levels need a multiple of 4)
    p = run_cli("fit", *base, "--data.init_args.image_size", "18", check=False)
    assert p.returncode == 2
    assert "image_size=18" in p.stderr and "divisible by 4" in p.stderr and "Traceback" not in p.stderr
    # missing checkpoint
    p = run_cli("test", *base, "--ckpt_path", str(tmp_path / "nope.ckpt"), check=False)
    assert p.returncode == 2 and "checkpoint not found" in p.stderr and "nope.ckpt" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_or_corrupt_data_end_like_a_config_error(tmp_path):
    """Missing or corrupt data: the actionable ``error:`` block alone (no traceback), exit code 2 — also
    when the corrupt file is read in a DataLoader worker process."""
    import numpy as np
    from PIL import Image

    base = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    p = run_cli("fit", "--config", "configs/ddpm_cifar10.yaml", "--data.init_args.root", str(tmp_path / "nope"),
                *base, check=False)
    err = p.stderr[p.stderr.find("error:"):]
    assert p.returncode == 2 and err.startswith("error: CIFAR-10 not found") and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "cifar-10-batches-py" in err and "--data.init_args.root" in err

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    p = run_cli("fit", "--config", "configs/quickstart.yaml", "--data", "diffproc.data.folder.ImageFolderDataModule",
                "--data.init_args.root", str(folder), "--data.init_args.image_size", "16",
                "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1", *base, check=False)
    err = p.stderr[p.stderr.find("error:"):]
    assert p.returncode == 2 and "Traceback" not in p.stderr and "Original Traceback" not in err, p.stderr[-3000:]
    assert err.startswith("error: cannot decode image") and "bad.png" in err and "on_corrupt: skip" in err
