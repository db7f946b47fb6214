"""Run one stage as its own command line with a params file (what the compare benchmarks do for every variant)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(name: str, params: Path) -> float:
    """`python -m stages.<name> --params <params>` from the project root; its wall seconds. Exits on failure."""
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed with {params} (exit {proc.returncode})")
    return time.monotonic() - t


def tag_problem(tag: str | None) -> str | None:
    """Why `tag` cannot name a variant's folder (None when it can): a plain name, no separators or dot-dot."""
    if tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
        return f"--tag {tag!r}: use letters, digits, '_', '.', '-' (it becomes a folder name)"
    return None
