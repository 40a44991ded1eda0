"""Helpers to run ``cli.py`` as a subprocess in tests (tiny shapes runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

#: overrides that shrink any shapes config to a few-second CPU run
TINY = [
    "--data.init_args.image_size", "16", "--data.init_args.num_train", "64",
    "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--data.init_args.batch_size", "8",
    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--sample_grid.num_images", "4",
    "--model.init_args.sampling.num_steps", "3",
]


def run_cli(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` from the repo root with one thread; raise with the output on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# --- checkpoints and TensorBoard logs of such runs (issue 16) ------------------------------------

def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def flat(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) of a nested checkpoint entry, by path."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}{i}."))
    elif torch.is_tensor(obj):
        out[prefix[:-1]] = obj
    elif isinstance(obj, (int, float)):
        out[prefix[:-1]] = torch.tensor(obj)
    return out


def assert_same_training_state(a: Path, b: Path) -> None:
    """Bitwise equality of the weights (raw ``unet.*`` and EMA ``ema_unet.*``), the optimiser state and the
    LR schedulers of two checkpoints."""
    ca, cb = load(a), load(b)
    assert ca["global_step"] == cb["global_step"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        fa, fb = flat(ca[key]), flat(cb[key])
        assert fa.keys() == fb.keys(), (key, set(fa) ^ set(fb))
        unequal = [k for k in fa if not torch.equal(fa[k], fb[k])]
        assert not unequal, (f"{key}: {len(unequal)} of {len(fa)} tensors differ, e.g. {unequal[0]}: max |diff| "
                             f"{(fa[unequal[0]].double() - fb[unequal[0]].double()).abs().max().item():.3g}")
    names = flat(ca["state_dict"]).keys()
    assert any(k.startswith("unet.") for k in names) and any(k.startswith("ema_unet.") for k in names)
    assert len(flat(ca["optimizer_states"])) > 0


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalar curves TensorBoard shows for a log directory (all its event files, restarts applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
