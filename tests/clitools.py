"""Helpers to run ``cli.py`` as a subprocess in tests (tiny shapes runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: overrides that shrink any shapes config to a few-second CPU run
TINY = [
    "--data.init_args.image_size", "16", "--data.init_args.num_train", "64",
    "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--data.init_args.batch_size", "8",
    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--sample_grid.num_images", "4",
    "--model.init_args.num_steps", "3",
]


def run_cli(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` from the repo root with one thread; raise with the output on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
