"""Every paper config starts on its real dataset: a 1-step ``cli.py fit`` of each config against a tiny
dataset written here in the dataset's official on-disk layout, with the sanity validation and the
end-of-fit sample grid on, finishes in under 3 minutes on the CPU with visible progress.

The only overrides are the data root, ``batch_size 4`` (one training step of a paper-size UNet at the
paper's batch, 64-128 images of 128², alone takes minutes on two CPU cores) and the grid's CPU budget
(10 s instead of 60 s, so that the 29 configs fit in CI). Everything else (UNet, process, schedules,
validation cadence, callbacks, DataLoader workers) is the config's own. Measured: epdm_afhq_cat.yaml
(146M-parameter UNet, 128²) takes 140 s with the default 60 s grid budget on two busy cores; with a 20 s
budget and the machine oversubscribed (load 4-8 on 2 cores) all 29 configs ran in 59 min, 24 under
3 min and the 128² / LSUN ones at 191-238 s.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import REPO
from diffproc.data.mnist import idx_bytes

pytestmark = pytest.mark.slow

PAPER_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                       if "shapes" not in p.name and p.name != "quickstart.yaml")
BUDGET_S = 180.0


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR))


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _lmdb(path: Path, n: int, seed: int) -> None:
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(f"{seed:02d}{i:06d}".encode(), _encode(_rgb(96, 128, seed * 100 + i), "WEBP"))
    env.close()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """CIFAR-10 pickles, CelebA (img_align_celeba + partition file), CelebAMask-HQ images, AFHQ and LSUN
    lmdbs, MNIST / Fashion-MNIST idx files, each in its official layout, 8-16 images per split."""
    root = tmp_path_factory.mktemp("data")
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{b}", 8) for b in range(1, 6)] + [("test_batch", 8)]:
        entry = {"batch_label": name, "labels": list(range(n)), "filenames": [f"{i}.png" for i in range(n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (cifar / name).write_bytes(pickle.dumps(entry, protocol=2))
    (cifar / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))
    celeba = root / "celeba" / "img_align_celeba"
    celeba.mkdir(parents=True)
    lines = []
    for i in range(1, 17):
        (celeba / f"{i:06d}.jpg").write_bytes(_encode(_rgb(218, 178, i), "JPEG"))
        lines.append(f"{i:06d}.jpg {0 if i <= 12 else (1 if i <= 14 else 2)}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    hq = root / "CelebAMask-HQ" / "CelebA-HQ-img"
    hq.mkdir(parents=True)
    for i in range(16):
        (hq / f"{i}.jpg").write_bytes(_encode(_rgb(256, 256, 50 + i), "JPEG"))
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("cat", "dog"):
            d = root / "afhq" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"flickr_{cls}_{i:06d}.jpg").write_bytes(_encode(_rgb(160, 160, 80 + i), "JPEG"))
    for sub in ("MNIST", "FashionMNIST"):  # idx files in torchvision's layout (python -m diffproc.data.get)
        raw = root / sub / "raw"
        raw.mkdir(parents=True)
        for prefix, n in (("train", 16), ("t10k", 8)):
            for name, arr in (("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                              ("labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))):
                (raw / f"{prefix}-{name}").write_bytes(idx_bytes(arr))
    (root / "lsun").mkdir()
    for k, cat in enumerate(("church_outdoor", "bedroom")):
        _lmdb(root / "lsun" / f"{cat}_train_lmdb", 12, 2 * k)
        _lmdb(root / "lsun" / f"{cat}_val_lmdb", 4, 2 * k + 1)
    return root


def _root_for(config: str, data_root: Path) -> Path:
    text = (REPO / config).read_text()
    return data_root / "CelebAMask-HQ" / "CelebA-HQ-img" if "CelebAMask-HQ" in text else data_root


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_one_step_fit_of_every_paper_config(config, data_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "cli.py", "fit", "--config", config, "--data.init_args.root", str(_root_for(config, data_root)),
           "--data.init_args.batch_size", "4", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--sample_grid.cpu_budget_seconds", "10"]
    start = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{config} failed ({p.returncode}):\n{out[-4000:]}"
    assert seconds < BUDGET_S, f"{config}: {seconds:.0f} s > {BUDGET_S:.0f} s"
    run = next(tmp_path.glob("*/version_0"))
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1
    assert "Sanity Checking" in out, "the validation path must run (sanity check)"
    # the end-of-fit grid is announced, shows progress and is written
    assert "sample grid at step 1:" in out and "sample grid (step 1)" in out
    assert (run / "samples" / "step_0000001.png").is_file()
    print(f"{config}: {seconds:.0f} s")
