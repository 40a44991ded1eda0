"""Architecture: the rooms of ``diffproc/`` import only downward (the processes layer stays below the samplers, nets,
methods and Lightning; no import hidden inside a function), and 0.2 has no former spellings. The rooms' own tests:
``test_gaussian_core.py``, ``test_samplers.py``, ``test_callbacks.py``, ``test_module_base.py``."""

from __future__ import annotations

import ast

import pytest

from clitools import REPO, run_cli
from diffproc.methods.base import DiffusionModule
from diffproc.processes.blur import BlurProcess
from diffproc.processes.ddpm import DDPMProcess


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_processes_import_no_samplers_lightning_or_nn():
    """The dependency runs one way (samplers -> processes): no module under diffproc/processes imports
    diffproc.samplers, lightning or torch.nn, at top level or inside a function."""
    files = sorted((REPO / "diffproc" / "processes").glob("*.py"))
    assert len(files) >= 8
    forbidden = ("diffproc.samplers", "diffproc.nets", "diffproc.methods", "diffproc.callbacks", "diffproc.interop",
                 "lightning", "pytorch_lightning", "torch.nn")
    bad = {f.name: sorted(n for n in _imports(f.read_text()) if any(n == b or n.startswith(b + ".") for b in forbidden))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad
    # the walk sees imports hidden inside functions too
    assert "diffproc.samplers.sample_loop" in _imports("def f():\n    from diffproc.samplers import sample_loop\n")


#: rooms and what they never import (docs/core.md, "Layers"): Run -> Callbacks -> Methods -> (Nets, Samplers) ->
#: Processes -> Ops; Interop -> (Methods, Nets, Samplers, Processes); nothing imports upward
UPWARD = {
    "nets": ("diffproc.methods", "diffproc.samplers", "diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "samplers.py": ("diffproc.methods", "diffproc.nets", "diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "methods": ("diffproc.callbacks", "diffproc.interop", "diffproc.cli"),
    "callbacks": ("diffproc.interop", "diffproc.cli"),
}


def test_rooms_import_only_downward():
    """nets, samplers, methods and callbacks import no room above them, and nothing in diffproc imports interop."""
    pkg = REPO / "diffproc"
    bad = {}
    for f in sorted(pkg.rglob("*.py")):
        room = f.relative_to(pkg).parts[0]
        forbidden = UPWARD.get(room, ()) + (() if room == "interop" else ("diffproc.interop",))
        names = [n for n in _imports(f.read_text()) if any(n == b or n.startswith(b + ".") for b in forbidden)]
        if names:
            bad[str(f.relative_to(REPO))] = sorted(names)
    assert not bad, bad


def test_no_import_inside_a_function():
    """Every import of the package stands at module level (an optional dependency in a module-level try)."""
    bad = []
    for f in sorted((REPO / "diffproc").rglob("*.py")):
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{f.relative_to(REPO)}:{n.lineno}" for n in ast.walk(fn)
                        if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not bad, bad


def test_former_spellings_are_gone():
    """One name per concept (solver, num_steps, schedule, spacing values): 0.2 has no former spellings (0.1 files
    convert with ``python -m diffproc.convert``)."""
    from diffproc.callbacks.sample_grid import SampleGrid
    from diffproc.processes.interpolation import InterpolationProcess

    tiny = dict(image_size=8, channels=3, ema_decay=0, unet={"block_out_channels": [8, 16], "layers_per_block": 1})
    with pytest.raises(TypeError, match="sampler"):
        DiffusionModule(process=DDPMProcess(), sampler="ddim", **tiny)
    with pytest.raises(TypeError, match="sampling_steps"):
        SampleGrid(sampling_steps=4)
    with pytest.raises(TypeError, match="beta_schedule"):
        BlurProcess(beta_schedule="cosine")
    with pytest.raises(ValueError, match="spacing"):
        InterpolationProcess(spacing="ddim_quad")
    p = run_cli("fit", "--config", "configs/quickstart.yaml", "--model.init_args.sampler", "ancestral",
                "--print_config", check=False)
    assert p.returncode != 0 and "sampler" in p.stderr
