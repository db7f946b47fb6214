"""Write files so that a final name only ever holds complete content: temp name in the same folder, fsync, rename."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator


def tmp_name(path: Path) -> Path:
    """Hidden sibling temp name; DVC and readers never mistake it for the real file.

    A process killed mid-write leaves its temp behind; the next writer of the same final name removes it here,
    so killed runs leave no litter (temps of live processes, e.g. other DDP ranks, are kept)."""
    remove_stale_temps(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` / `.<name>.old-<pid>` siblings of `path` whose process is gone."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        m = TEMP_NAME.match(p.name)
        if m and m["name"] == path.name and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) so reruns are byte-identical."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written folder into place (old content is removed only after the new one is complete)."""
    remove_stale_temps(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
