"""Constructor signatures: a process's signature is the only config surface of its math (no module re-declares a
process parameter), and no constructor in diffproc/ is longer than 40 lines."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import diffproc.methods
import diffproc.processes
from diffproc.methods.base import DiffusionModule
from diffproc.processes.base import DiffusionProcess

PACKAGE = Path(diffproc.methods.__file__).resolve().parents[1]
MAX_CONSTRUCTOR_LINES = 40


def _classes(package, base: type) -> list[type]:
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted({c for c in found if c.__module__.startswith(package.__name__) and not inspect.isabstract(c)},
                  key=lambda c: c.__qualname__)


def parameters(cls: type) -> set[str]:
    """Keyword parameters of ``cls``'s constructor, following ``**kwargs`` to the base classes'."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


MODULES = _classes(diffproc.methods, DiffusionModule)
PROCESSES = _classes(diffproc.processes, DiffusionProcess)


def test_the_classes_are_found():
    assert {c.__name__ for c in MODULES} >= {"DiffusionModule", "GDDM"}
    assert {c.__name__ for c in PROCESSES} >= {"DDPMProcess", "BlurProcess", "InterpolationProcess",
                                               "EdgePreservingProcess", "GradientDomainProcess", "VPSDEProcess"}


@pytest.mark.parametrize("module", MODULES, ids=lambda c: c.__name__)
def test_no_module_redeclares_a_process_parameter(module):
    own = parameters(module) - {"process"}
    clashes = {p.__name__: sorted(own & parameters(p)) for p in PROCESSES if own & parameters(p)}
    assert not clashes, f"{module.__name__} re-declares process parameters: {clashes}"


def test_modules_take_their_process_injected():
    for module in MODULES:
        assert "process" in inspect.signature(module.__init__).parameters, module


def test_no_constructor_is_longer_than_40_lines():
    lengths = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                        lengths[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = fn.end_lineno - fn.lineno + 1
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] <= MAX_CONSTRUCTOR_LINES, f"{longest}: {lengths[longest]} lines"
