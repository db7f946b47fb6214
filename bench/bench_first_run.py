"""The first run (`python -m pipeline tiny`) from nothing: a fresh project folder, every stage, timed.

Target (issue 14): <= 5 minutes wall on a 2-core CPU. Prints the wall time, the ratio to the target and the load
average, so a figure measured on a shared machine says how shared it was.

  python bench/bench_first_run.py
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300.0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a `timeout`) ends like Ctrl-C, so the temporary project is removed on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help, and no stray arguments
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="tokenmill-first-run-") as tmp:
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "pipeline", "tiny", "--dest", str(Path(tmp) / "tiny")], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.monotonic() - start
    print(f"first run (python -m pipeline tiny, fresh folder): {wall:.0f} s wall on {os.cpu_count()} cores; "
          f"target {TARGET_S:.0f} s: ratio {wall / TARGET_S:.2f} ({'met' if wall <= TARGET_S else 'MISSED'}); "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (the temporary project is removed)")
