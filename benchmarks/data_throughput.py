"""Images/s per DataModule through its train loader (decode + crop/resize + flip + collate).

By default each file-based DataModule reads a fixture written to a temp dir in its native format
(CIFAR pickles, CelebA JPEGs 178x218, LSUN lmdb of WebP 256x341, AFHQ JPEGs 512x512, a folder of
mixed JPEG/PNG/WebP). ``--dataset NAME --root PATH`` measures a real dataset instead. Compare the
numbers with a GPU training step's images/s to see whether ``--num-workers`` is enough.

    python benchmarks/data_throughput.py --num-workers 0 2
    python benchmarks/data_throughput.py --dataset celeba --root /data --image-size 64 --num-workers 8
    python benchmarks/data_throughput.py --dataset mnist fmnist --root data --vs-config configs/ddpm_fmnist.yaml

``--vs-config`` also times training steps of that config's model (the config's UNet, batch and image size; loss,
backward, clipping, AdamW, EMA: ``benchmarks/step_time.py``'s step) in the same run, on a batch of its data, and
prints loader images/s / training images/s.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffproc.data.afhq import AFHQDataModule  # noqa: E402
from diffproc.data.celeba import CelebADataModule  # noqa: E402
from diffproc.data.cifar10 import CIFAR10DataModule  # noqa: E402
from diffproc.data.folder import ImageFolderDataModule  # noqa: E402
from diffproc.data.lsun import LSUNDataModule  # noqa: E402
from diffproc.data.mnist import FashionMNISTDataModule, MNISTDataModule, idx_bytes  # noqa: E402
from diffproc.data.shapes import ShapesDataModule  # noqa: E402

MODULES = {"shapes": ShapesDataModule, "cifar10": CIFAR10DataModule, "celeba": CelebADataModule,
           "lsun": LSUNDataModule, "afhq": AFHQDataModule, "folder": ImageFolderDataModule,
           "mnist": MNISTDataModule, "fmnist": FashionMNISTDataModule}
DEFAULT_SIZE = {"shapes": 32, "cifar10": 32, "celeba": 64, "lsun": 64, "afhq": 128, "folder": 64, "mnist": 32,
                "fmnist": 32}


def _photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like content (smooth field + noise) so encoded sizes and decode costs are realistic."""
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_fixtures(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    c = root / "cifar-10-batches-py"
    c.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(c / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n))}, f, protocol=2)
    ce = root / "celeba" / "img_align_celeba"
    ce.mkdir(parents=True)
    lines = []
    for i in range(n):
        (ce / f"{i + 1:06d}.jpg").write_bytes(_save(_photo(218, 178, rng), "JPEG", quality=95))
        lines.append(f"{i + 1:06d}.jpg {0 if i < n - 2 else 1 + i % 2}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    import lmdb
    (root / "lsun").mkdir()
    for split, m in (("train", n), ("val", 4)):
        env = lmdb.open(str(root / "lsun" / f"church_outdoor_{split}_lmdb"), map_size=1 << 30)
        with env.begin(write=True) as txn:
            for i in range(m):
                txn.put(f"{i:040x}".encode(), _save(_photo(256, 341, rng), "WEBP", quality=75))
        env.close()
    for split, m in (("train", n // 4), ("val", 2)):
        for cls in ("cat", "dog", "wild"):
            d = root / "afhq" / split / cls
            d.mkdir(parents=True)
            for i in range(m):
                (d / f"flickr_{cls}_{i:06d}.jpg").write_bytes(_save(_photo(512, 512, rng), "JPEG", quality=95))
    for sub in ("MNIST", "FashionMNIST"):  # idx files, as `python -m diffproc.data.get` leaves them
        raw = root / sub / "raw"
        raw.mkdir(parents=True)
        for prefix, m in (("train", n), ("t10k", n)):
            arrays = {"images-idx3-ubyte": rng.integers(0, 256, (m, 28, 28), dtype=np.uint8),
                      "labels-idx1-ubyte": rng.integers(0, 10, m).astype(np.uint8)}
            for name, arr in arrays.items():
                (raw / f"{prefix}-{name}").write_bytes(idx_bytes(arr))
    f = root / "folder"
    for i in range(n):
        sub = f / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        (sub / f"{i}.{ext}").write_bytes(_save(_photo(96, 128, rng), fmt))


def measure(dm, max_images: int, warmup_batches: int = 1) -> tuple[float, int]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(warmup_batches):  # worker start-up and first decode excluded
        next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < max_images:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0), seen


def training_images_per_sec(config: str, root: str | None, steps: int) -> float:
    """Training images/s of ``config`` as it is (its UNet, batch, image size), on this machine, now."""
    from benchmarks.step_time import time_it, train_step_fn
    from diffproc.cli import DiffprocCLI

    extra = ["--data.init_args.root", root] if root else []
    cli = DiffprocCLI(args=["--config", config, "--trainer.logger", "false", *extra], run=False)
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    step = train_step_fn(model, x, "fp32")
    step()  # warm-up
    sec = time_it(step, steps, "cpu")
    print(f"training ({config}): batch {x.shape[0]} of {tuple(x.shape[1:])}, {sec:.3f} s/step, "
          f"{x.shape[0] / sec:.0f} images/s ({torch.get_num_threads()} threads)")
    return x.shape[0] / sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(MODULES), nargs="*", help="default: all (on fixtures)")
    ap.add_argument("--root", help="real dataset root (then --dataset is required)")
    ap.add_argument("--image-size", type=int, help="default: the papers' size per dataset")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, nargs="+", default=[0])
    ap.add_argument("--images", type=int, default=512, help="images timed per measurement")
    ap.add_argument("--fixture-size", type=int, default=128, help="images per fixture split")
    ap.add_argument("--vs-config", default=None, help="also time training steps of this config; print the ratio")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps for --vs-config")
    args = ap.parse_args()
    if args.root and not args.dataset:
        ap.error("--root needs --dataset")
    names = args.dataset or list(MODULES)
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffproc_bench_")
        t = time.perf_counter()
        write_fixtures(Path(tmp.name), args.fixture_size)
        print(f"fixtures written to {tmp.name} in {time.perf_counter() - t:.1f} s")
    train_ips = None
    if args.vs_config:
        train_ips = training_images_per_sec(args.vs_config, root, args.train_steps)
    print(f"{'dataset':10s} {'source':26s} {'size':>5s} {'workers':>7s} {'images/s':>10s} {'ms/batch':>9s}"
          + ("  loader / training" if train_ips else ""))
    for name in names:
        size = args.image_size or DEFAULT_SIZE[name]
        data_root = root or (os.path.join(tmp.name, "folder") if name == "folder" else tmp.name)
        for w in args.num_workers:
            kw = dict(root=data_root, image_size=size, batch_size=args.batch_size, num_workers=w,
                      pin_memory=False)
            if name == "shapes":
                kw.update(num_train=max(args.images, args.batch_size * 4))
            dm = MODULES[name](**kw)
            ips, n = measure(dm, args.images)
            src = "in memory" if name in ("shapes", "mnist", "fmnist") and not args.root else (args.root and "real data" or "fixture")
            ratio = f"  {ips / train_ips:8.1f}x" if train_ips else ""
            print(f"{name:10s} {src:26s} {size:5d} {w:7d} {ips:10.0f} {1000 * args.batch_size / ips:9.1f}{ratio}",
                  flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
