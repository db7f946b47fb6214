"""User-facing errors: one clear line, no traceback."""
from __future__ import annotations

import errno
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


def resource_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a file"
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    return f"{where}: {exc.strerror or exc} ({hint})"


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
        if exc.errno not in RESOURCE_ERRNOS:
            raise
        _close_progress_bars()
        print(f"error: {resource_message(exc)}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
