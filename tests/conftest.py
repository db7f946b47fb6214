"""Shared fixtures: small synthetic datasets and a corpus of bad image inputs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.sandbox import ROOT, make_idx_dataset, make_project, write_idx  # noqa: F401 (used by the tests)

CORPUS = ROOT / "tests" / "corpus"  # the checked-in bad-input corpus (tests/corpus/make_corpus.py)
sys.path.insert(0, str(CORPUS))
from make_corpus import generated_inputs, png_bytes  # noqa: E402,F401 (png_bytes: used by the tests)


def make_good_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(20, 24)) -> Path:
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(root / c / f"{i}.png")
    return root


def make_bad_corpus(root: Path) -> dict[str, str]:
    """The checked-in image corpus (tests/corpus/images) plus the generated bomb, as one class folder under `root`.
    Returns {file name: expected outcome ("kept" or "skipped")}."""
    import json
    import shutil

    shutil.copytree(CORPUS / "images", root, dirs_exist_ok=True)
    shutil.copy2(generated_inputs(root.parent / "generated")["bomb"], root / "things" / "bomb.png")
    return json.loads((CORPUS / "expected.json").read_text())["images"]


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_dataset(tmp_path / "idx")


# The venv's bin (dvc, prefect) must be on PATH for subprocesses even when pytest runs without activation.
os.environ["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def crash_after_first_checkpoint(run, monkeypatch) -> None:
    """Call `run()` with a crash (KeyboardInterrupt) right after its first checkpoint is saved, like a kill between
    two steps, then restore checkpointing so the caller can resume."""
    import pytest

    from pipeline import checkpoint as ckpt
    real_save = ckpt.save

    def save_then_die(ckpt_dir, state, step, keep=2):
        real_save(ckpt_dir, state, step, keep)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(ckpt, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ckpt, "save", real_save)


def files_under(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`: equal dicts mean equal trees, byte for byte."""
    from pipeline.atomic import sha256_file
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_params(datasets: dict[str, Path], resolution: int = 16) -> str:
    lines = ["datasets:"]
    for name, path in datasets.items():
        lines += [f"  {name}:", "    source: idx", f"    path: {path}", f"    resolution: {resolution}",
                  "    channels: 1"]
    lines += ["prepare:", "  out_dir: data/prepared", "  shard_size: 25"]
    return "\n".join(lines) + "\n"
