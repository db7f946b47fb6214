"""User-facing errors: one clear line, no traceback."""
from __future__ import annotations

import errno
import re
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (params, files, paths). Printed as one line; exit code 2."""
    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (an empty file's EOFError)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/Inf. The run stops with the step named; the last good checkpoint is kept. Exit code 3."""
    exit_code = 3


# The file system refused: a read-only or foreign-owned folder, a full disk or quota. The user's to fix, not a bug.
RESOURCE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
# A path that cannot be what it was given as (a file where a folder is needed, a name too long, a symlink loop):
# with the path named, the user's to fix too. Without a file name it is left a traceback (more likely a bug).
PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST}


def resource_message(exc: OSError) -> str:
    where = str(exc.filename) if exc.filename is not None else "a file"
    where = where if where.isprintable() else repr(where)  # a newline in a path must not split the line
    if exc.errno in PATH_ERRNOS:
        return f"{where}: {exc.strerror or exc} (check the path)"
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    return f"{where}: {exc.strerror or exc} ({hint})"


_ALLOC_BYTES = re.compile(r"tried to allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]?i?B)")


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for a failed allocation (a model or batch far larger than the machine), else None.

    torch's CPU allocator raises a RuntimeError saying "can't allocate memory", CUDA a torch.OutOfMemoryError
    (a RuntimeError) saying "out of memory", numpy a MemoryError; all of them come from sizes in params.yaml."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or isinstance(exc, RuntimeError)
            and ("can't allocate memory" in text or "out of memory" in text)):
        return None
    match = _ALLOC_BYTES.search(text)
    if match and match.group(1):
        n, unit = int(match.group(1)) / 2**30, "GiB"
        for bigger in ("TiB", "PiB", "EiB"):
            if n >= 1024:
                n, unit = n / 1024, bigger
        size = f"{n:.1f} {unit}"
    else:
        size = match.group(2) if match else None
    what = f"could not allocate {size}" if size else first_line(exc)
    device = "GPU memory" if "CUDA" in text else "memory"
    return (f"out of {device}: {what} (lower the model sizes, batch_size or the images held in memory in "
            f"params.yaml)")


def _close_progress_bars() -> None:
    """End any progress bar the failure left open, so the error starts its own line and is the last one printed."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()


def main_guard(fn: Callable[[], None]) -> None:
    """Run a CLI entry point; turn UserError / NonFiniteLoss / a refused write into `error: <message>` on stderr
    and their exit code (2 for the user's mistakes and a refused write, 3 for a non-finite loss)."""
    try:
        fn()
    except (UserError, NonFiniteLoss) as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in RESOURCE_ERRNOS and not (exc.errno in PATH_ERRNOS and exc.filename is not None):
            raise
        _close_progress_bars()
        print(f"error: {resource_message(exc)}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory_message(exc)
        if message is None:
            raise
        _close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()  # Ctrl-C during a stage: "interrupted" on its own line, not after the bar
        print("interrupted", file=sys.stderr)
        sys.exit(130)
