"""Throwaway copies of the project: a small IDX dataset and a project folder with its own git + DVC repo.

Used by the fault-injection script (scripts/kill_resume.py) and the tests, which run real `dvc repro` in a copy so
the checkout's data/ and dvc.lock are never touched.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "pipeline", "stages", "models", "training", "pyproject.toml")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train", "t10k")


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (the MNIST format), gzipped with a fixed mtime so equal arrays give equal bytes."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0))


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_idx_dataset(root: Path, n_train: int = 40, n_val: int = 10, seed: int = 0) -> Path:
    """Fashion-MNIST layout (4 IDX .gz files) with random 28x28 images and 10 classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in zip(IDX_STEMS, (n_train, n_val)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def fashion_mnist_subset(root: Path, n_train: int, n_val: int, source: Path = FASHION_MNIST) -> Path:
    """The first n_train / n_val images of Fashion-MNIST in its own IDX files (random images when it is absent)."""
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        return make_idx_dataset(root, n_train, n_val)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in zip(IDX_STEMS, (n_train, n_val)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{stem}-{kind}-ubyte.gz"
            write_idx(root / name, read_idx(source / name)[:n])
    return root


def make_project(dest: Path, params_text: str, stages: tuple[str, ...] | None = None) -> Path:
    """A copy of the project (code + dvc.yaml) in its own git + DVC repo, with the given params.

    `stages`: keep only these dvc.yaml stages (so the params need only their sections); None keeps all.
    """
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(params_text)
    if stages is not None:
        full = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
        (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: full[k] for k in stages}}, sort_keys=False))
    (dest / ".gitignore").write_text("/data/\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True)
    return dest


def read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix under which `folder` is read-only, or None when that cannot be arranged here.

    A normal user gets chmod 555 (undo with chmod 755); root ignores permissions, so root gets a read-only bind mount
    in a private mount namespace (`unshare -m`, which needs CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, "sh"]
    try:
        probe = subprocess.run(prefix + ["touch", str(folder / ".probe")], capture_output=True, text=True)
    except FileNotFoundError:  # no unshare
        return None
    return prefix if probe.returncode != 0 and "Read-only" in probe.stderr else None
