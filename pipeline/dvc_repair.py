"""Repair DVC's own state after a kill, before the next dvc command.

DVC rewrites `.dvc/tmp/rwlock` (which paths running stages read and write) in place, not atomically: a dvc process
killed during that write leaves an empty or cut JSON file, and every later dvc command in the repository stops with
"Unable to read RWLock-file ... JSON structure is corrupted" until someone deletes it (treeverse/dvc#7615).
`scripts/kill_resume.py` hits this. Our entry points (`python -m pipeline run|stage`, the Prefect flow,
`scripts/run.sh`) call `repair_rwlock` first: it takes DVC's own guard lock on the file, so it never races a running
dvc command, and removes the file only when it is not valid JSON (DVC then starts from an empty lock table, which
is right: the processes that were in it are dead).
"""
from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

log = logging.getLogger("tokenmill.dvc")


def repair_rwlock(root: str | Path) -> bool:
    """Remove `<root>/.dvc/tmp/rwlock` when it is corrupt and no dvc command holds its guard. True if removed."""
    tmp = Path(root) / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if not path.is_file():
        return False
    with open(tmp / "rwlock.lock", "a") as guard:  # the lock DVC takes around every rwlock edit (zc.lockfile: flock)
        try:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a dvc command is editing it right now: not ours to touch
        try:
            try:
                json.loads(path.read_text(encoding="utf-8"))
                return False
            except ValueError:
                pass
            path.unlink()
            log.warning("removed %s: a killed dvc command left it corrupt (DVC writes it in place)", path)
            print(f"note: removed {path}: a killed dvc command left it corrupt", flush=True)
            return True
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)
