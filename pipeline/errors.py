"""User-facing errors: one clear line, no traceback."""
from __future__ import annotations

import logging
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (params, files, paths). Printed as one line; exit code 2."""


def main_guard(fn: Callable[[], None]) -> None:
    """Run a CLI entry point; turn UserError into `error: <message>` on stderr and exit code 2."""
    try:
        fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr so stdout stays quiet enough to read."""
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
