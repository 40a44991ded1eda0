"""Comparison tool (issue 11): frequency bands (closed-form cases, numpy reference), the equal-NFE plan
over real processes, and a tiny end-to-end run of benchmarks/compare.py (slow) incl. resuming."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.compare import plan, results_table
from diffproc.metrics.frequency import (band_areas, band_fractions, band_masks, band_power, power_spectrum,
                                        radial_frequency, radial_profile)
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess
from diffproc.processes.edge import EdgePreservingProcess
from diffproc.processes.interpolation import InterpolationProcess

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ frequency bands
def test_constant_image_all_power_in_dc_low_band():
    x = torch.full((3, 3, 16, 16), 0.7)
    p = power_spectrum(x)
    assert p[:, 0, 0].tolist() == pytest.approx([0.7 ** 2 * 256] * 3, rel=1e-6)  # orthonormal DFT: DC = mean * sqrt(HW)
    assert p.flatten(1)[:, 1:].abs().max() < 1e-20
    f = band_fractions(x)
    assert f.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-15)
    with pytest.raises(ValueError, match="zero power"):
        band_fractions(x, remove_dc=True)


def test_checkerboard_all_high():
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    x = (((i + j) % 2) * 2 - 1).float()[None, None].repeat(2, 3, 1, 1)  # ±1 checkerboard, zero mean
    f = band_fractions(x)
    assert f.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)
    assert radial_frequency(16, 16)[8, 8] == pytest.approx(math.sqrt(2))  # its only bin: the corner


def test_white_noise_fractions_equal_band_areas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, 16, 16, generator=g, dtype=torch.float64)
    areas = band_areas(16, 16)
    assert float(areas.sum()) == pytest.approx(1.0)
    assert band_fractions(x, mode="channels")[0].tolist() == pytest.approx(areas.tolist(), abs=0.01)
    # Parseval: the band powers sum to the mean squared norm of the images
    assert float(band_power(x).sum()) == pytest.approx(float(x.square().sum((1, 2, 3)).mean()), rel=1e-10)


def test_band_masks_partition_and_numpy_reference():
    h, w = 12, 16
    m = band_masks(h, w, (0.25, 0.5))
    assert m.sum(0).eq(1).all()  # every bin in exactly one band
    rho = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")) / 0.5
    assert np.array_equal(m[0].numpy(), rho < 0.25) and np.array_equal(m[2].numpy(), rho >= 0.5)
    x = torch.randn(4, 3, h, w, dtype=torch.float64)
    ref = np.abs(np.fft.fft2(x.numpy().mean(1), norm="ortho")) ** 2
    assert np.allclose(power_spectrum(x).numpy(), ref)
    bp = band_power(x, (0.25, 0.5)).numpy()
    assert np.allclose(bp, [(ref * mk.numpy()).sum((1, 2)).mean() for mk in m])
    with pytest.raises(ValueError, match="increasing"):
        band_masks(8, 8, (0.5, 0.25))


def test_radial_profile_of_a_single_frequency():
    n = 16
    j = torch.arange(n, dtype=torch.float64)
    x = torch.cos(2 * math.pi * 4 * j / n)[None, None, None, :].repeat(1, 1, n, 1)  # f_x = 1/4: rho = 0.5
    rho, prof = radial_profile(x)
    peak = int(torch.argmax(torch.nan_to_num(prof, nan=-1.0)))
    assert abs(float(rho[peak]) - 0.5) <= math.sqrt(2) / len(rho)
    assert float(torch.nan_to_num(prof).sum() - prof[peak]) < 1e-20


# ---------------------------------------------------------------------------------- equal-NFE plan
def test_plan_equal_nfe_and_skips():
    sie = plan(InterpolationProcess(), [10, 20, 3])
    by = {(r["solver"], r["target_nfe"]): r for r in sie}
    assert by[("heun", 20)]["steps"] == 10 and by[("rk4", 20)]["steps"] == 5 and by[("euler", 20)]["steps"] == 20
    assert by[("rk4", 3)]["skip"] and by[("rk4", 3)]["steps"] == 0 and by[("midpoint", 3)]["steps"] == 1
    blur = plan(BlurProcess(num_timesteps=100).set_geometry(8, 1), [10, 100])
    off = [r for r in blur if r["solver"] == "official"]
    assert len(off) == 2 and all("full chain only (99" in r["skip"] for r in off)
    assert all(r["skip"] == f"more steps than the chain has (99)" for r in blur if r["target_nfe"] == 100
               and r["solver"] != "official")
    epdm = plan(EdgePreservingProcess(num_timesteps=50), [10, 49])
    assert [r["solver"] for r in epdm] == ["ancestral", "ancestral", "ddim", "ddim"]  # DDIM on the core (issue 15)
    assert "strided" in epdm[0]["note"] and epdm[1]["note"] == "" and epdm[1]["skip"] is None
    assert all("ddim (extension" in r["note"] and r["skip"] is None for r in epdm[2:])
    assert [r["solver"] for r in plan(DDPMProcess(), [10], solvers=["ddim", "heun"])] == ["ddim"]


def test_results_table_rows():
    rows = [{"method": "a", "solver": "ddim", "target_nfe": 10, "nfe": 10, "steps": 10, "fid": 1.5, "kid_mean": 0.1,
             "kid_std": 0.01, "precision": 0.5, "recall": 0.25, "sec_per_image": 0.002, "note": "", "skip": None},
            {"method": "a", "solver": "official", "target_nfe": 10, "skip": "full chain only (999 steps = 999 NFE)"}]
    t = results_table(rows, {"a": {"sec_per_step": 0.125, "sec_per_step_source": "throughput"}}).splitlines()
    assert len(t) == 4 and t[2].split("|")[1:-1][4].strip() == "1.500" and "0.1250" in t[2]
    assert "skipped" in t[3] and "full chain only" in t[3]


# ------------------------------------------------------------------------------------ end to end
def _compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               DIFFPROC_CACHE=str(out.parent / "cache"))
    cmd = [sys.executable, "benchmarks/compare.py", "--configs", "configs/ddpm_shapes.yaml", "configs/sie_shapes.yaml",
           "--steps", "3", "--out", str(out), "--nfe", "2", "4", "--num-samples", "12", "--eval-batch-size", "12",
           "--image-size", "16", "--batch-size", "8", "--num-train", "64", "--freq-real", "12", "--grid-images", "4",
           "--device", "cpu", "--solvers", "ddim", "heun", "rk4", *extra,
           "--fit-args", "--data.init_args.num_val", "8", "--data.init_args.num_test", "12",
           "--trainer.limit_val_batches", "1", "--sample_grid.num_images", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_compare_end_to_end_and_resume(tmp_path):
    out = tmp_path / "cmp"
    p0 = _compare(out, "--fit-only")  # train only; the next call evaluates what it left
    assert "nothing evaluated" in p0.stdout and "sampling" not in p0.stdout and not (out / "results.json").exists()
    p1 = _compare(out)
    assert p1.stdout.count("not training again") == 2
    for f in ["results.md", "results.json", "fid_vs_nfe.png", "loss_vs_step.png", "freq_bands.md", "freq_bands.png",
              "grids/ddpm_shapes.png", "grids/sie_shapes.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for m in ("ddpm_shapes", "sie_shapes"):
        assert (out / "runs" / m / "version_0" / "checkpoints" / "last.ckpt").is_file()
        assert (out / "runs" / m / "fit.log").is_file()
    res = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["solver"], r["target_nfe"]): r for r in res["rows"]}
    # ddpm: ddim at 2 and 4; sie: ddim 2/4, heun 2 (1 step)/4 (2 steps), rk4 4 (1 step), rk4 2 skipped
    assert set(got) == {("ddpm_shapes", "ddim", 2), ("ddpm_shapes", "ddim", 4), ("sie_shapes", "heun", 2),
                        ("sie_shapes", "heun", 4), ("sie_shapes", "rk4", 2), ("sie_shapes", "rk4", 4),
                        ("sie_shapes", "ddim", 2), ("sie_shapes", "ddim", 4)}
    assert got[("sie_shapes", "rk4", 2)]["skip"] and got[("sie_shapes", "rk4", 4)]["nfe"] == 4
    assert got[("sie_shapes", "heun", 4)]["steps"] == 2 and got[("sie_shapes", "heun", 4)]["nfe"] == 4
    for r in res["rows"]:
        if not r["skip"]:
            assert math.isfinite(r["fid"]) and 0 <= r["precision"] <= 1 and r["sec_per_image"] > 0
    table = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(table) == 1 + 8
    assert set(res["freq_bands"]["results"]) == {"real", "ddpm_shapes", "sie_shapes"}
    assert all(sum(v["fractions"]) == pytest.approx(1.0) for v in res["freq_bands"]["results"].values())
    assert res["loss_curves"]["ddpm_shapes"], "train/loss read from the TensorBoard events"

    ckpt = out / "runs" / "ddpm_shapes" / "version_0" / "checkpoints" / "last.ckpt"
    mtime = ckpt.stat().st_mtime_ns
    p2 = _compare(out)
    assert ckpt.stat().st_mtime_ns == mtime
    assert p2.stdout.count("not training again") == 2 and "cached" in p2.stdout
    assert "sampling 12 images" not in p2.stdout  # every row came from results.json
    res2 = json.loads((out / "results.json").read_text())
    assert [r.get("fid") for r in res2["rows"]] == [r.get("fid") for r in res["rows"]]

    # the labelled panel of the same runs: the first images of compare.py's rows (samples 0.. of seed 0)
    from benchmarks.sample_panel import main as panel

    png = tmp_path / "panel.png"
    panel(["--nfe", "4", "--num-images", "4", "--out", str(png), "--run", "DDPM", str(out / "runs" / "ddpm_shapes"),
           "ddim", "process", "--run", "SIE", str(out / "runs" / "sie_shapes" / "version_0"), "heun", "uniform_t"])
    assert png.is_file() and png.stat().st_size > 0


def test_sample_panel_names_a_missing_run(tmp_path):
    from benchmarks.sample_panel import main as panel

    with pytest.raises(SystemExit, match="holds no config.yaml"):
        panel(["--nfe", "4", "--out", str(tmp_path / "p.png"), "--run", "X", str(tmp_path / "nope"), "ddim", "process"])
