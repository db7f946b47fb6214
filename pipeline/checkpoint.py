"""Training checkpoints: atomic, pickle-free, with fallback to the previous good one.

A checkpoint is a dict of tensors and plain types (state dicts, step, RNG state as a uint8 tensor), so
`torch.load(weights_only=True)` reads it. `save` writes `step-%08d.pt` under a temp name, renames it, then points
`last.pt` at it (hard link swapped in atomically). `load_latest` tries `last.pt` and then older step files (older
by the time they were written), warning with the name of any file it cannot read, so a truncated or corrupt
checkpoint costs one interval, not the run.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import tmp_name
from pipeline.errors import first_line

log = logging.getLogger("tokenmill.checkpoint")
# A checkpoint is resumed only when its run had the same identity; what each part of the identity stands for.
IDENTITY_PARTS = {"run_id": "params or input data (params section, data fingerprint, world size)",
                  "code": "code (a file in the stage's import closure changed)"}
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def step_files(ckpt_dir: Path) -> list[Path]:
    """Periodic checkpoints, newest written first (then by step, for files written within one clock tick).

    By time, not by step: a run with other params that stops at a lower step than an earlier run's files would
    otherwise see its own files as the oldest, prune each one right after writing it, and fall back to the
    earlier run's (which it may not resume) when its last.pt is damaged.
    """
    if not ckpt_dir.is_dir():
        return []
    files = []
    for p in ckpt_dir.iterdir():
        match = _STEP_RE.match(p.name)
        if match:
            try:
                files.append((p.stat().st_mtime_ns, int(match.group(1)), p))
            except FileNotFoundError:  # pruned by another process between listing and stat
                continue
    return [p for _, _, p in sorted(files, key=lambda t: (t[0], t[1]), reverse=True)]


def save(ckpt_dir: str | Path, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write checkpoint for `step` atomically, update last.pt, keep the `keep` newest step files."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    tmp = tmp_name(path)
    try:
        try:
            torch.save(state, tmp)
        except RuntimeError:
            # torch reports a full disk as an internal "enforce fail": say what it is, naming the file
            free, needed = shutil.disk_usage(ckpt_dir).free, _tensor_bytes(state)
            if free < needed + (1 << 20):
                raise OSError(errno.ENOSPC, f"no space left on device for a {needed / 2**20:.1f} MB checkpoint "
                              f"({free / 2**20:.1f} MB free)", str(path)) from None
            raise
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    last, last_tmp = ckpt_dir / "last.pt", tmp_name(ckpt_dir / "last.pt")
    last_tmp.unlink(missing_ok=True)
    os.link(path, last_tmp)
    os.replace(last_tmp, last)
    for old in step_files(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint without pickle (weights_only=True)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(ckpt_dir: str | Path, map_location: str | torch.device = "cpu",
                expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Newest readable checkpoint, or None. `expect`: identity keys whose values must match (run_id, code).

    A checkpoint written by another identity is not resumed from (it would continue a different run, or export
    weights that the current code did not make); one line names what changed, and the run starts fresh.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = ([ckpt_dir / "last.pt"] if (ckpt_dir / "last.pt").exists() else []) + step_files(ckpt_dir)
    for path in candidates:
        try:
            state = read(path, map_location)
        except Exception as exc:  # truncated file, bad zip, foreign pickle: never fatal, never executed
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, first_line(exc))
            continue
        mismatch = [k for k, v in (expect or {}).items() if state.get(k) != v]
        if mismatch:
            log.warning("checkpoint %s was made by a run with other %s; starting fresh", path,
                        " and ".join(IDENTITY_PARTS.get(k, k) for k in mismatch))
            return None
        return state
    return None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
