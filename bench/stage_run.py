"""Run one stage as its own command line with a params file (what the compare benchmarks do for every variant)."""
from __future__ import annotations

import os
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
