"""Post-hoc EMA (EDM2): power-function profiles, snapshots during fit, reconstruction of any sigma_rel."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import TINY
from diffproc.cli import main as cli_main
from diffproc.interop.export import export_checkpoint, load_module
from diffproc.posthoc_ema import (PowerEMA, gamma_to_sigma_rel, list_snapshots, power_beta, reconstruct,
                                  sigma_rel_to_gamma, step_weights)
from diffproc.posthoc_ema import main as posthoc_main

STEPS, EVERY = 40, 5
PROFILES, CHECK = [0.05, 0.10], 0.07  # EDM2's two profiles; the one tracked only to check the reconstruction


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_sigma_rel_and_gamma():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def test_power_ema_is_its_step_weights():
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(50, 7, generator=g, dtype=torch.float64).cumsum(0).float()  # theta(1..50)
    ema = PowerEMA(0.1, [traj[0]])
    for s in range(1, 51):
        ema.update([traj[s - 1]], s)
        w = torch.from_numpy(step_weights(ema.gamma, s, np.arange(1, s + 1)))
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(ema.ema[0].double(), (w[:, None] * traj[:s].double()).sum(0), atol=1e-5)


def _fit(save_dir: Path, max_steps: int, *extra: str) -> Path:
    cli_main(["fit", "--config", "configs/quickstart.yaml", *TINY,
              "--model.init_args.unet", json.dumps({"block_out_channels": [8, 16], "layers_per_block": 1}),
              "--model.init_args.process.init_args.num_timesteps", "20", "--model.init_args.warmup_steps", "0",
              "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_steps", str(max_steps),
              "--sample_grid.every_n_steps", "0", "--checkpoint.every_n_train_steps", "10",
              "--posthoc_ema.every_n_steps", str(EVERY), "--posthoc_ema.sigma_rels", json.dumps(PROFILES + [CHECK]),
              *extra])
    return save_dir / "quickstart" / "version_0"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One short fit (tiny UNet, 16x16 shapes) with the two profiles plus the check profile."""
    return _fit(tmp_path_factory.mktemp("phema"), STEPS)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _norm(state: dict) -> float:
    return float(sum((v.double() ** 2).sum() for v in state.values()).sqrt())


def test_reconstruction_matches_a_tracked_ema(run, tmp_path):
    snaps = list_snapshots(run / "posthoc_ema")
    assert sorted({s.step for s in snaps}) == list(range(EVERY, STEPS + 1, EVERY))
    rec, info = reconstruct(snaps, CHECK, profiles=PROFILES)
    assert info["step"] == STEPS and info["profiles"] == PROFILES
    tracked = _state(run / "posthoc_ema" / f"phema-{STEPS:09d}-{CHECK:.4f}.pt")
    nearest = _state(run / "posthoc_ema" / f"phema-{STEPS:09d}-{PROFILES[0]:.4f}.pt")
    err = _norm({k: rec[k] - tracked[k] for k in tracked})
    rel = err / _norm(tracked)
    print(f"post-hoc EMA sigma_rel {CHECK} from {PROFILES}: relative weight error {rel:.3g}; "
          f"error / |EMA(0.07) - EMA(0.05)| = {err / _norm({k: nearest[k] - tracked[k] for k in tracked}):.3g}")
    assert rel <= 1e-3

    # the command writes a checkpoint that predict and export take
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "phema.ckpt"
    posthoc_main(["--ckpt", str(ckpt), "--sigma_rel", str(CHECK), "--out", str(out), "--profiles", *map(str, PROFILES)])
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert written["posthoc_ema"]["sigma_rel"] == CHECK and written["global_step"] == STEPS
    assert all(torch.equal(written["state_dict"]["ema_unet." + k], v) for k, v in rec.items())
    module, _ = load_module(out)
    assert all(torch.equal(module.ema_unet.state_dict()[k], v) for k, v in rec.items())
    export_checkpoint(out, tmp_path / "export")
    pred = tmp_path / "pred"
    cli_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(out), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.predict_num_samples", "2", "--model.init_args.predict_dir", str(pred)])
    assert sorted(p.name for p in pred.glob("0*.png")) == ["000000.png", "000001.png"]


def test_profiles_continue_after_resume(run, tmp_path):
    """A resumed fit continues the profiles saved in the checkpoint: one step after resuming at step 40, each
    profile is exactly lerp(profile_40, theta_41, 1 - beta_41) (a restart would begin again from the raw weights)."""
    shutil.copytree(run.parent.parent, tmp_path, dirs_exist_ok=True)
    before = torch.load(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = _fit(tmp_path, STEPS + 1, "--ckpt_path", "last")
    newest = max((resumed / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)  # moved run: last-v1
    after = torch.load(newest, weights_only=True)
    assert after["global_step"] == STEPS + 1
    saved = before["callbacks"]["PostHocEMA"]
    assert saved["step"] == STEPS and saved["sigma_rels"] == PROFILES + [CHECK]
    names = list(_state(resumed / "posthoc_ema" / f"phema-{STEPS:09d}-{CHECK:.4f}.pt"))
    raw = [after["state_dict"]["unet." + n] for n in names]
    for sigma, ema in zip(saved["sigma_rels"], saved["profiles"]):
        snap = _state(resumed / "posthoc_ema" / f"phema-{STEPS + 1:09d}-{sigma:.4f}.pt")
        beta = power_beta(STEPS + 1, sigma_rel_to_gamma(sigma))
        for n, e, r in zip(names, ema, raw):
            assert torch.allclose(snap[n], torch.lerp(e, r, 1 - beta), atol=1e-7, rtol=0)
