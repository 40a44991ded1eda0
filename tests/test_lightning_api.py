"""diffproc's uses of Lightning's private API all sit in diffproc/callbacks/lightning_api.py; this test names the
first one an upgrade of Lightning or TensorBoard removes, and what to adapt."""

import re
from pathlib import Path

from diffproc.callbacks import lightning_api

REPO = Path(__file__).resolve().parents[1]


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
