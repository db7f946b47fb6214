"""Run one stage as its own command line with a params file (what the compare benchmarks do for every variant)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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


def with_earlier_runs(requested: list[str], known: tuple[str, ...] | list[str],
                      done: Callable[[str], bool]) -> list[str]:
    """The names this command runs, then every other known name whose run under the same tag is complete on disk.

    A tag's summary lists all of that tag's runs: without this, a second command with the same --tag (another
    family, or the last recipe) would rewrite summary-<tag>.json with its own rows only, and the figures that read
    it (bench/plot_fid_curves.py) would lose the earlier curves.
    """
    return list(requested) + [k for k in known if k not in requested and done(k)]
