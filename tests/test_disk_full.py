"""A full disk while a checkpoint is written: torch says "enforce fail ... unexpected pos"; the user reads one line
naming the file and the cause, and the previous checkpoint stays the one a re-run resumes from."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, small_disk_prefix

SCRIPT = """
import sys, torch
from pipeline import checkpoint
from pipeline.errors import main_guard
folder = sys.argv[1]
checkpoint.save(folder, {"w": torch.zeros(1000)}, 1)            # 4 kB: fits
try:
    main_guard(lambda: checkpoint.save(folder, {"w": torch.zeros(200000)}, 2))   # 800 kB: does not
finally:  # inside the mount namespace: the tmpfs is gone once the command ends
    import os
    print(sorted(os.listdir(folder)))
"""


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_good_one(tmp_path):
    disk = tmp_path / "disk"
    prefix = small_disk_prefix(disk, 256)
    if prefix is None:
        pytest.skip("needs root and unshare for a small tmpfs")
    proc = subprocess.run(prefix + [sys.executable, "-c", SCRIPT, str(disk / "ckpt")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {disk}/ckpt/step-00000002.pt: no space left on device for a 0.8 MB "
                               f"checkpoint") and lines[0].endswith("(free some space)")
    assert proc.stdout.strip() == "['last.pt', 'step-00000001.pt']"  # no half-written file; the last good one kept
