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

from pipeline.errors import UserError, first_line


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
def atomic_path(path: str | Path, stamp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on success it is renamed to `path`, on error removed.

    `stamp`: a file whose access and modification times the temp takes before it appears under `path` (a stage's
    plots file takes its run log's: the out guard reads a file no newer than the run log as that run's, so the rule
    holds at every instant of a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if stamp is not None:
            st = os.stat(stamp)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, stamp: str | os.PathLike | None = None) -> None:
    with atomic_path(path, stamp=stamp) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any, stamp: str | os.PathLike | None = None) -> None:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) so reruns are byte-identical."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), stamp=stamp)


def read_json(path: str | Path) -> Any:
    """A JSON file a stage wrote; a damaged one is a one-line error naming it, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({first_line(exc)}); the file is damaged: re-run the stage that "
                        f"writes it") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


OWNER_FILE = ".tokenmill-stage"  # inside every output folder: the stage that wrote it


def check_replaceable(final_dir: str | Path, owner: str) -> None:
    """Refuse (one-line UserError) to replace anything at `final_dir` that stage `owner` did not write: an output
    folder may only take the place of an empty folder or of a folder carrying `owner`'s marker. Stages call this
    before they start work, and `replace_dir` again right before the swap."""
    final_dir = Path(final_dir)
    if not final_dir.exists() and not final_dir.is_symlink():
        return
    if final_dir.is_symlink() or not final_dir.is_dir():
        raise UserError(f"{final_dir}: exists and is not a folder written by {owner}; refusing to replace it "
                        f"(move it away or choose another output path)")
    marker = final_dir / OWNER_FILE
    if marker.is_file() and marker.read_text().strip() == owner:
        return
    if not any(final_dir.iterdir()):
        return
    why = f"written by {marker.read_text().strip()!r}" if marker.is_file() else f"no {OWNER_FILE} marker"
    raise UserError(f"{final_dir}: exists and was not written by {owner} ({why}); refusing to replace it "
                    f"(move it away or choose another output path)")


def new_partial_dir(final_dir: str | Path) -> Path:
    """An empty work folder `.<name>.partial` beside `final_dir`, where an output folder is built."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp_dir: Path, final_dir: Path, owner: str) -> None:
    """Swap a fully written folder into place, marked as `owner`'s (the old content is removed only after the
    new one is in place, and only if `owner` wrote it: see check_replaceable)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    check_replaceable(final_dir, owner)
    (tmp_dir / OWNER_FILE).write_text(owner + "\n")
    remove_stale_temps(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
