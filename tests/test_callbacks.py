"""Room ``callbacks/``: what the Trainer runs beside the module. The adapter of Lightning's private API
(``lightning_api.py``), checkpoints (``Checkpoint``'s ``last.ckpt``, atomic writes, ``NonFiniteGuard``), sample grids
(``SampleGrid``), and the metric callbacks (``TestMetricsCallback``, ``FIDCallback``). Post-hoc EMA's callback is
tested with its reconstruction in test_posthoc_ema.py, the throughput monitor under 2 DDP ranks in test_scale.py,
SIGTERM handling (``stop_deadline``, ``Checkpoint.on_exception``) end to end in e2e/test_signals.py and
e2e/test_resume.py."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import lightning as L
import lightning.pytorch.callbacks.throughput_monitor as tm
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from clitools import REPO, TINY, run_cli
from diffproc.callbacks import lightning_api
from diffproc.callbacks.atomic_io import AtomicCheckpointIO
from diffproc.callbacks.checkpoint import Checkpoint
from diffproc.callbacks.nonfinite import NonFiniteGuard
from diffproc.callbacks.sample_grid import SampleGrid
from diffproc.callbacks.throughput import ImageThroughputMonitor
from diffproc.methods.base import DiffusionModule
from diffproc.metrics.features import INCEPTION_FILE
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.samplers import SamplingSpec

PY = sys.executable


# --- lightning_api: Lightning's private API in one place -------------------------------------------------------
def test_every_private_lightning_attribute_still_exists():
    gone = lightning_api.missing()
    assert not gone, "\n".join(gone)


def test_no_private_lightning_use_outside_the_adapter():
    """``trainer._x``, ``callback._x`` of ModelCheckpoint, ``writer._get_file_writer`` and ``from lightning... import
    _x`` appear only in the adapter (the CLI's ``_parse_ckpt_path`` override is listed there too)."""
    names = {path.split(".")[0] for _, path, _ in lightning_api.PRIVATE}
    pattern = re.compile(r"\.(%s)\b|from lightning\S* import .*\b_[a-z]" % "|".join(sorted(n for n in names)))
    offenders = []
    for f in [*sorted((REPO / "diffproc").rglob("*.py")), REPO / "cli.py", *sorted((REPO / "benchmarks").glob("*.py"))]:
        if f.name == "lightning_api.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) and "def _parse_ckpt_path" not in line:
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "private Lightning API outside diffproc/callbacks/lightning_api.py:\n" + "\n".join(offenders)


def test_a_removed_attribute_is_named_with_what_to_adapt(monkeypatch):
    monkeypatch.setattr(lightning_api, "PRIVATE", (("ModelCheckpoint", "_save_last_checkpoint_v9", "a future user"),))
    (line,) = lightning_api.missing()
    assert "ModelCheckpoint._save_last_checkpoint_v9 is gone" in line and "a future user" in line
    assert "lightning_api.py" in line and "pyproject.toml" in line


# --- checkpoints: atomic writes, the NaN guard -----------------------------------------------------------------
def test_atomic_save_survives_crash_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"global_step": 1, "state_dict": {"w": torch.arange(1000.0)}}
    io.save_checkpoint(good, path)

    def crash(obj, f, *a, **k):  # half a file written, then the process "dies"
        f.write(b"PK\x03\x04 half a zip archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    back = io.load_checkpoint(path)
    assert back["global_step"] == 1 and torch.equal(back["state_dict"]["w"], good["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # temp file removed

    # a real SIGKILL in the middle of writing big checkpoints, repeatedly
    script = ("import sys, torch\nfrom diffproc.callbacks.atomic_io import atomic_torch_save\n"
              "i = 0\nwhile True:\n    i += 1\n"
              "    atomic_torch_save({'i': i, 'w': torch.full((2_000_000,), float(i))}, sys.argv[1])\n"
              "    print(i, flush=True)\n")
    target = tmp_path / "big.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete save, then kill during later ones
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = torch.load(target, weights_only=True)
    assert ck["i"] >= 1 and torch.all(ck["w"] == float(ck["i"]))

    # weights_only loading: plain checkpoints load, pickled objects are refused with advice
    torch.save({"state_dict": {}, "obj": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(tmp_path / "pickled.ckpt")["obj"] == Path("x")


def test_nonfinite_guard_refuses_to_save_nan_weights():
    """The weight check (on a GPU the loss is checked only every log interval): a checkpoint due while the weights
    are NaN is refused with one message, before anything is written (the CLI run of the loss check:
    tests/test_scale.py)."""
    guard = NonFiniteGuard()
    trainer = types.SimpleNamespace(global_step=3)
    finite = {"state_dict": {"unet.w": torch.ones(3), "ema_unet.w": torch.ones(3)}}
    guard.on_save_checkpoint(trainer, None, finite)  # finite weights pass
    bad = {"state_dict": {"unet.w": torch.ones(3), "ema_unet.w": torch.tensor([1.0, float("nan"), 0.0])}}
    with pytest.raises(FloatingPointError, match="the weights became NaN/inf by global step 3"):
        guard.on_save_checkpoint(trainer, None, bad)


# --- sample grids ----------------------------------------------------------------------------------------------
def test_sample_grid_is_sized_to_the_cpu_budget(monkeypatch):
    """On the CPU a grid that would exceed ``cpu_budget_seconds`` draws fewer images, then fewer steps; a
    full-chain-only solver (blur's ``official``) gives way to a strided one for the preview."""
    tiny = dict(image_size=8, channels=3, ema_decay=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    m = DiffusionModule(process=DDPMProcess(num_timesteps=100), sampling=SamplingSpec(solver="ddim", num_steps=50),
                        **tiny)
    monkeypatch.setattr(type(m), "seconds_per_evaluation", lambda self, n: 0.01 * n)  # 10 ms per image and NFE
    spec = m.sampling
    assert SampleGrid(num_images=16, cpu_budget_seconds=100).size(m) == (16, spec)  # 8 s: as configured
    assert SampleGrid(num_images=64, cpu_budget_seconds=10).size(m) == (20, spec)  # 64 x 50 x 10 ms = 32 s
    num, small = SampleGrid(num_images=64, cpu_budget_seconds=1).size(m)  # 4 images x 25 steps = 1 s
    assert (num, small.num_steps, small.solver) == (4, 25, "ddim")
    assert SampleGrid(num_images=64, cpu_budget_seconds=0).size(m) == (64, spec)  # 0 = no budget
    b = DiffusionModule(process=BlurProcess(num_timesteps=100), **tiny)  # solver "official": 99 steps, full chain only
    monkeypatch.setattr(type(b), "seconds_per_evaluation", lambda self, n: 0.01 * n)
    num, small = SampleGrid(num_images=16, cpu_budget_seconds=1).size(b)
    assert (num, small.solver) == (4, "ancestral") and small.num_steps == 25 and b.planned_nfe(small) == 25


def test_sample_grids_and_last_checkpoint_of_a_fit(tmp_path):
    """What a user finds in the run directory after ``fit``: a sample grid every ``every_n_steps`` and one at the end
    of fit, as ``samples/step_XXXXXXX.png`` (8-pixel images upscaled to ``min_tile``) and as the TensorBoard image
    ``samples`` at the same steps; ``checkpoints/last.ckpt`` holding the final state (raw and EMA weights) although
    ``max_steps`` is not a multiple of ``every_n_train_steps`` (Lightning's ModelCheckpoint alone leaves step 4's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    m = DiffusionModule(process=DDPMProcess(num_timesteps=20), image_size=8, channels=3, ema_decay=0.9,
                        warmup_steps=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1},
                        sampling=SamplingSpec(solver="ddim", num_steps=2))
    callbacks = [SampleGrid(every_n_steps=2, num_images=4, min_tile=32, cpu_budget_seconds=0, progress=False),
                 Checkpoint(every_n_train_steps=2, save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, "run", 0),
                        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    trainer.fit(m, DataLoader(images, batch_size=4))
    run = tmp_path / "run" / "version_0"
    assert sorted(q.name for q in (run / "samples").iterdir()) == [f"step_{k:07d}.png" for k in (2, 4, 5)]
    assert Image.open(run / "samples" / "step_0000005.png").size == (2 * 33 + 1,) * 2  # 2 x 2 tiles of 32 px
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4, 5]
    assert sorted(q.name for q in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    final = m.state_dict()
    assert last["state_dict"].keys() == final.keys() and any(k.startswith("ema_unet.") for k in final)
    assert all(torch.equal(v, final[k]) for k, v in last["state_dict"].items())


def test_throughput_monitor_times_only_the_logging_steps(tmp_path, monkeypatch):
    """ImageThroughputMonitor reads the clock (on CUDA: syncs host and device) only on the steps that log, and
    its rate spans the last ``window_size`` batches: with a clock that advances 1 s per reading, a log every 3
    steps gives exactly 3 batches/s (timing every step, as Lightning's monitor does, would give 1)."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(tm, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    torch.manual_seed(0)
    m = DiffusionModule(process=DDPMProcess(num_timesteps=20), image_size=8, ema_decay=0.0,
                        unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    trainer = L.Trainer(max_steps=15, log_every_n_steps=3, logger=CSVLogger(tmp_path),
                        callbacks=[ImageThroughputMonitor(window_size=6)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, DataLoader(torch.rand(64, 3, 8, 8) * 2 - 1, batch_size=4))
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r["train/device/batches_per_sec"]]
    assert [int(r["step"]) for r in rows] == [8, 11, 14]  # the window (6 batches = 3 readings) is full from step 8
    assert all(float(r["train/device/batches_per_sec"]) == 3.0 for r in rows)
    assert all(float(r["train/device/samples_per_sec"]) == 12.0 for r in rows)  # 4 images per batch


# --- metric callbacks under the Trainer (diffproc/callbacks/metrics.py) ----------------------------------------
_DUMMY = '''
import json, sys
import lightning as L
import torch
from diffproc.data.shapes import ShapesDataModule
from diffproc.callbacks.metrics import TestMetricsCallback

class Dummy(L.LightningModule):
    """sample(): real train images blended with generator noise (deterministic per generator)."""
    def __init__(self, fail=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.fail = fail

    def sampling_spec(self, spec=None, where="sampling"):
        from diffproc.samplers import SamplingSpec
        return (spec or SamplingSpec()).over(SamplingSpec(solver="ddim", num_steps=7, seed=0))

    def sample(self, num, spec=None, generator=None, progress=True, indices=None):
        from diffproc.processes.rng import PerSampleGenerator, rand
        from diffproc.samplers import SampleResult
        assert not self.fail, "sampling started before the metric set-up failed"
        g = PerSampleGenerator(spec.seed or 0, indices)
        pool = self.trainer.datamodule.dataset("train").images[:64].float() / 127.5 - 1
        idx = (rand((num,), g) * 64).long()
        noise = rand((num, 3, 16, 16), g) * 2 - 1
        x = (0.8 * pool[idx] + 0.2 * noise).clamp(-1, 1)
        return SampleResult(sample=x, nfe=7, images=x)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.w.sum() + 1.0)

def run(devices, out, extractor, seeds, output="metrics.json"):
    cb = TestMetricsCallback(num_samples=90, batch_size=16, extractor=extractor, cache_dir=out + "/cache",
                             num_reference_features=80, progress=False, seeds=seeds, output=output)
    dm = ShapesDataModule(image_size=16, num_train=160, num_val=8, num_test=16, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=[cb],
                        default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(Dummy(fail=extractor == "inception"), datamodule=dm)

if __name__ == "__main__":
    devices, out, extractor = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    seeds = sys.argv[4] if len(sys.argv) > 4 else None
    run(devices, out, extractor, seeds)
    if devices == 1 and seeds is not None:  # the same samples as one block each: single-block runs
        for s in seeds.split(","):
            run(devices, out, extractor, None if s == "0" else s, output=f"metrics_single{s}.json")
'''


def _run_dummy(tmp_path: Path, devices: int, extractor: str = "shapes", seeds: str | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "dummy_test.py"
    script.write_text(_DUMMY)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_HOME=str(tmp_path / "torch_home"))
    out = tmp_path / f"run{devices}"
    return subprocess.run([PY, str(script), str(devices), str(out), extractor, *([seeds] if seeds else [])], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


SHAPES_KEYS = {"shapes_fid", "shapes_kid_mean", "shapes_kid_std", "shapes_is_mean", "shapes_is_std", "shapes_precision",
               "shapes_recall"}


def test_test_callback_ddp_matches_single_process_with_seed_blocks(tmp_path):
    """``cli.py test``'s callback on 2 gloo CPU ranks gives the metrics of 1 rank, for every seed block (2 blocks
    of 90 samples at seeds 0 and 100, batches of 16 dealt to the ranks round-robin); each block equals a
    single-block run at that seed; metrics.json carries the blocks, mean, std (ddof=1) and min. ~30 s."""
    rows = {}
    for devices in (1, 2):
        proc = _run_dummy(tmp_path, devices, seeds="0,100")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[devices] = json.loads((tmp_path / f"run{devices}" / "metrics.json").read_text())
        assert (tmp_path / f"run{devices}" / "samples.png").is_file()
    one, two = rows[1], rows[2]
    assert [b["seed"] for b in one["blocks"]] == [b["seed"] for b in two["blocks"]] == [0, 100]
    worst = {"fid": 0.0, "others": 0.0}
    for b1, b2 in zip(one["blocks"], two["blocks"]):
        assert set(b1["metrics"]) == SHAPES_KEYS
        for k, v in b1["metrics"].items():
            # features are bitwise equal (KID/IS/PR exactly equal); FID differs only by the float64 summation order
            w = "fid" if k == "shapes_fid" else "others"
            worst[w] = max(worst[w], abs(b2["metrics"][k] - v) / max(abs(v), 1e-12))
            assert b2["metrics"][k] == pytest.approx(v, rel=1e-9 if k == "shapes_fid" else 1e-12, abs=1e-12), k
    print(f"2 ranks vs 1 rank: max relative difference FID {worst['fid']:.2e} (tolerance 1e-9), "
          f"others {worst['others']:.2e} (tolerance 1e-12)")
    a, b = (blk["metrics"] for blk in one["blocks"])
    assert a != b, "two seed blocks are different samples"
    for k in SHAPES_KEYS:
        assert one["metrics"][k] == pytest.approx((a[k] + b[k]) / 2, rel=1e-12)
        assert one["std"][k] == pytest.approx(abs(a[k] - b[k]) / 2 ** 0.5, rel=1e-9, abs=1e-15)
        assert one["min"][k] == min(a[k], b[k])
    for s, blk in zip((0, 100), one["blocks"]):  # block s == a single-block run of the samples s..s+89
        single = json.loads((tmp_path / "run1" / f"metrics_single{s}.json").read_text())
        assert single["metrics"] == pytest.approx(blk["metrics"], rel=1e-12)
        assert "std" not in single and [x["seed"] for x in single["blocks"]] == [s]
    p = one["protocol"]
    assert (p["extractor"], p["num_samples"], p["solver"], p["steps"], p["nfe"], p["seed"], p["seeds"]) == (
        "shapes", 90, "ddim", 7, 7, 0, [0, 100])
    assert p["reference"].startswith("shapes_train_16px_shapes-") and p["headline_protocol"] is False
    assert two["protocol"]["world_size"] == 2


def test_seed_blocks_parse_and_must_not_overlap():
    from types import SimpleNamespace

    from diffproc.callbacks.metrics import TestMetricsCallback, aggregate_blocks

    assert TestMetricsCallback(seeds="0,50000 100000").block_seeds == [0, 50000, 100000]
    assert TestMetricsCallback(seeds=[5]).block_seeds == [5] and TestMetricsCallback().block_seeds == [0]
    for bad in ([], [0, 0], [-1], "a,b"):
        with pytest.raises(ValueError, match="seeds"):
            TestMetricsCallback(seeds=bad)
    cb = TestMetricsCallback(num_samples=100, seeds=[0, 50], extractor="shapes")
    cb._build = lambda trainer: setattr(cb, "suite", SimpleNamespace(extractor=SimpleNamespace(name="shapes")))
    with pytest.raises(ValueError, match="overlap"):
        cb.setup(SimpleNamespace(), None, "test")
    agg = aggregate_blocks([{"fid": 1.0}, {"fid": 3.0}, {"fid": 2.0}])
    assert agg == {"metrics": {"fid": 2.0}, "std": {"fid": 1.0}, "min": {"fid": 1.0}}
    assert aggregate_blocks([{"fid": 1.5}]) == {"metrics": {"fid": 1.5}}


@pytest.mark.slow
def test_test_callback_fails_before_sampling_without_inception_weights(tmp_path):
    proc = _run_dummy(tmp_path, 1, extractor="inception")
    assert proc.returncode != 0
    assert INCEPTION_FILE in proc.stderr and "feature_extractor_weights_path" in proc.stderr
    assert "sampling started" not in proc.stderr


def test_callback_setup_fails_fast_offline(tmp_path, monkeypatch):
    """The callback builds the extractor in ``setup`` (before any sample): offline -> one message."""
    from types import SimpleNamespace

    from diffproc.callbacks.metrics import FIDCallback, TestMetricsCallback

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(name="celeba64_ddim", image_size=64))
    for cb, stage in ((TestMetricsCallback(), "test"), (FIDCallback(every_n_epochs=1), "fit")):
        with pytest.raises(FileNotFoundError, match=INCEPTION_FILE.replace(".", r"\.")):
            cb.setup(trainer, None, stage)
    TestMetricsCallback().setup(trainer, None, "fit")  # other stages: nothing built, nothing fails
    with pytest.raises(ValueError, match="Unknown metrics"):
        TestMetricsCallback(metrics=["fid", "lpips"])


@pytest.mark.slow
def test_cli_fit_with_fid_then_test_writes_metrics_json(tmp_path):
    """``cli.py fit`` with the in-training FID, then ``cli.py test`` on the checkpoint (2 seed blocks) -> metrics.json."""
    cache = tmp_path / "cache"
    common = ["--config", "configs/quickstart.yaml", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    run_cli("fit", *common, "--trainer.max_steps", "2", "--sample_grid.every_n_steps", "0",
            "--fid.every_n_train_steps", "2", "--fid.num_samples", "24", "--fid.batch_size", "12",
            "--fid.metrics", "[fid, kid]", "--fid.cache_dir", str(cache))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run0 = tmp_path / "quickstart" / "version_0"
    tags = EventAccumulator(str(run0)).Reload().Tags()["scalars"]
    assert "gen/shapes_fid" in tags and "gen/shapes_kid_mean" in tags, tags
    ckpt = run0 / "checkpoints" / "last.ckpt"
    run_cli("test", *common, "--ckpt_path", str(ckpt), "--metrics.num_samples", "40",
            "--metrics.batch_size", "16", "--metrics.cache_dir", str(cache), "--metrics.progress", "false",
            "--model.init_args.sampling.num_steps", "2", "--metrics.seeds", "0,40")
    files = list((tmp_path / "quickstart").glob("version_*/metrics.json"))
    assert len(files) == 1, files
    row = json.loads(files[0].read_text())
    assert set(row["metrics"]) == {"shapes_fid", "shapes_kid_mean", "shapes_kid_std", "shapes_is_mean",
                                   "shapes_is_std", "shapes_precision", "shapes_recall"}
    assert all(np.isfinite(v) for v in row["metrics"].values())
    assert [b["seed"] for b in row["blocks"]] == [0, 40] and set(row["std"]) == set(row["min"]) == set(row["metrics"])
    p = row["protocol"]
    assert p["num_samples"] == 40 and p["steps"] == 2 and p["solver"] == "ddim" and p["ema"] is True
    assert p["checkpoint"] == str(ckpt) and p["dataset"] == "shapes" and p["image_size"] == 16
    assert (files[0].parent / "samples.png").is_file()
