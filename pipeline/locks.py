"""Advisory file locks (flock) for writers that must not run twice at once: a run of the pipeline, the writer of
one token store. The kernel drops a lock when its process dies, so a killed writer never leaves one behind."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` while the body runs; if another process holds it, stop with one line naming
    `what` is busy and that process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(f"{what} is in use by {holder} (lock {path}); wait for it to finish") from None
        fh.seek(0), fh.truncate(), fh.write(f"pid {os.getpid()}"), fh.flush()
        try:
            yield
        finally:
            fh.seek(0), fh.truncate(), fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
