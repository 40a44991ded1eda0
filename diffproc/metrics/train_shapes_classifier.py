"""Train the ``shapes`` feature extractor: ``python -m diffproc.metrics.train_shapes_classifier``.

A small CNN (:class:`diffproc.metrics.features.ShapesNet`) learns the shape kind (label) of the
embedded dataset (:func:`diffproc.data.shapes.generate_shapes`). Training images are rendered at
16, 32 and 64 px and brought to 32 px exactly as the extractor does at metric time, with random
horizontal flips. Writes ``weights/shapes_classifier.pt`` (float32 state dict, ~0.5 MB) and
``weights/shapes_classifier.json`` (setup and accuracy on the held-out test split at each size).
Deterministic for a fixed seed on CPU; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffproc.data.shapes import SHAPE_CLASSES, SPLIT_START, generate_shapes
from diffproc.metrics.features import SHAPES_WEIGHTS, ShapesExtractor, ShapesNet

SIZES = (16, 32, 64)


def make_split(num: int, start: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images per size in ``SIZES``, preprocessed to 32 px float [-1,1]."""
    xs, ys = [], []
    for k, size in enumerate(SIZES):
        img, lab = generate_shapes(num, size, seed=seed, start=start + k * num)
        xs.append(ShapesExtractor.preprocess(img))
        ys.append(lab)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def accuracy(net: ShapesNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_train", type=int, default=6000, help="training images per size (16, 32, 64 px)")
    ap.add_argument("--num_test", type=int, default=1000, help="test-split images per size")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=SHAPES_WEIGHTS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    # dataset seed 0 = ShapesDataModule's default; train/test are its disjoint index ranges
    x, y = make_split(args.num_train, SPLIT_START["train"], seed=0)
    xt, yt = make_split(args.num_test, SPLIT_START["test"], seed=0)
    print(f"data: {len(x)} train / {len(xt)} test images ({time.perf_counter() - t0:.0f}s)")

    net = ShapesNet(len(SHAPE_CLASSES), args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(len(x) // args.batch_size):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / (len(x) // args.batch_size):.4f}, "
              f"test acc {accuracy(net, xt, yt):.4f} ({time.perf_counter() - t0:.0f}s)")

    net.eval()
    n = args.num_test
    per_size = {f"{s}px": accuracy(net, xt[k * n : (k + 1) * n], yt[k * n : (k + 1) * n]) for k, s in enumerate(SIZES)}
    info = {
        "classes": list(SHAPE_CLASSES),
        "test_accuracy": accuracy(net, xt, yt),
        "test_accuracy_by_size": per_size,
        "test_split": f"generate_shapes(seed=0, start=SPLIT_START['test'] + k*{n}) at sizes {list(SIZES)}",
        "input": "uint8 -> [-1,1] -> 32x32 bilinear (no antialias)",
        "features": f"{4 * args.width}-d penultimate (global average pool)",
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "num_classes": len(SHAPE_CLASSES), "width": args.width}, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
