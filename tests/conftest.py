"""Shared fixtures: small synthetic datasets and a corpus of bad image inputs."""
from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0))


def make_idx_dataset(root: Path, n_train: int = 40, n_val: int = 10, seed: int = 0) -> Path:
    """Fashion-MNIST layout (4 IDX .gz files) with random 28x28 images and 10 classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_val)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def make_good_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(20, 24)) -> Path:
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(root / c / f"{i}.png")
    return root


def make_bad_corpus(root: Path) -> dict[str, str]:
    """One class folder of inputs that must be converted or skipped. Returns {file name: expected outcome}."""
    d = root / "things"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    good = png_bytes(Image.fromarray(rgb, "RGB"))
    expected = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (d / name).write_bytes(data)
        expected[name] = outcome

    put("good.png", good, "kept")
    put("zero.png", b"", "skipped")
    put("truncated.png", good[: len(good) // 2], "skipped")
    put("text.jpg", b"this is not an image at all\n" * 10, "skipped")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)], axis=2)
    put("rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), "kept")
    put("palette.png", png_bytes(Image.fromarray(rgb, "RGB").convert("P")), "kept")
    pal_t = Image.fromarray(rgb, "RGB").convert("P")
    pal_t.info["transparency"] = 0
    put("palette_transparent.png", png_bytes(pal_t, transparency=0), "kept")
    put("grey16.png", png_bytes(Image.fromarray(rng.integers(0, 65535, (16, 16)).astype(np.uint16))), "kept")
    cmyk = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert("CMYK").save(cmyk, format="JPEG")
    put("cmyk.jpg", cmyk.getvalue(), "kept")
    put("tiny.png", png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))), "skipped")
    # A bomb: a small file whose header claims a huge image (mostly zeros compress away).
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(bomb, format="PNG", optimize=True)
    put("bomb.png", bomb.getvalue(), "skipped")
    put("notes.txt", b"hello", "skipped")
    return expected


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_dataset(tmp_path / "idx")


# The venv's bin (dvc, prefect) must be on PATH for subprocesses even when pytest runs without activation.
os.environ["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

PROJECT_FILES = ("dvc.yaml", "pipeline", "stages", "models", "pyproject.toml")


def make_project(dest: Path, params_text: str, stages: tuple[str, ...] | None = None) -> Path:
    """A throwaway copy of the project (code + dvc.yaml) in its own git + DVC repo, with the given params.

    `stages`: keep only these dvc.yaml stages (so the params need only their sections); None keeps all.
    """
    import shutil
    import subprocess

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
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    return dest


def tiny_params(datasets: dict[str, Path], resolution: int = 16) -> str:
    lines = ["datasets:"]
    for name, path in datasets.items():
        lines += [f"  {name}:", "    source: idx", f"    path: {path}", f"    resolution: {resolution}",
                  "    channels: 1"]
    lines += ["prepare:", "  out_dir: data/prepared", "  shard_size: 25"]
    return "\n".join(lines) + "\n"
