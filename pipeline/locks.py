"""Advisory file locks (flock) for writers that must not run twice at once: a run of the pipeline, the writer of
one token store. The kernel drops a lock when its process dies, so a killed writer never leaves one behind."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

_held: set[str] = set()  # locks held with nested=True: an `exclusive` on one of them inside is a no-op


def _open_locked(path: Path, what: str) -> int:
    """An fd holding the lock on the file that is at `path` now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # what the holder wrote ("pid N"), on one line whatever the file holds
            holder = " ".join(os.pread(fd, 200, 0).decode(errors="replace").split()) or "another process"
            os.close(fd)
            raise UserError(f"{what} is in use by {holder} (lock {path}); wait for it to finish") from None
        try:  # a holder that removes the file when done may have removed the one we opened: lock the current one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str, remove: bool = False, nested: bool = False) -> Iterator[None]:
    """Hold the lock file `path` while the body runs; if another process holds it, stop with one line naming
    `what` is busy and that process. `nested`: code run in the body may take the same lock again (an
    orchestrator that locks a store before preparing its input, then runs the stage that locks it); without it
    a second `exclusive` on the path is refused, in this process too. `remove`: delete the file when done (while
    still holding it; an opener waiting on the old file re-checks), so a command run in a user's folder leaves no
    lock file there, nor one a killed run left."""
    path = Path(path)
    key = os.path.abspath(path)
    if key in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, what)
    if nested:
        _held.add(key)
    try:
        os.ftruncate(fd, 0), os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        _held.discard(key)
        if remove:
            path.unlink(missing_ok=True)
        else:
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
