"""WebDataset tar shards: a deterministic writer and a safe reader.

Writer: fixed member metadata (mtime 0, uid/gid 0, mode 0644) so the same samples give byte-identical tars;
each shard is written under a temp name and renamed when complete. Reader: iterates members in memory (never
extracts), refuses links, absolute and `..` names, skips directory entries (`tar cf x.tar folder/` writes them),
groups files into samples by WebDataset key rules.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from pipeline.atomic import tmp_name

Sample = dict[str, bytes]  # extension -> payload, plus "__key__" -> key (as bytes-free str in the dict)

# WebDataset's rule: the key is everything up to the first dot of the last path component, so `photo.2023.01.png`
# and `photo.2023.02.png` are two files (extensions `2023.01.png`, `2023.02.png`) of one sample `photo`, as are
# `pair0.jpg` and `pair0.png`; a reader that wants one image per sample must say what it leaves out.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardWriter:
    """Write samples into `<dir>/<prefix>-%06d.tar`, `maxcount` samples per shard."""

    def __init__(self, out_dir: str | Path, prefix: str, maxcount: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount = prefix, maxcount
        self.shards: list[str] = []  # final file names, in order
        self.sizes: list[int] = []  # samples per shard
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._final = self.out_dir / name
        self._tmp = tmp_name(self._final)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self._final)
        self.shards.append(self._final.name)
        self.sizes.append(self._count)
        self._tar = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: `files` maps extension ('png', 'cls', 'json', ...) to bytes."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if self._tar is None:
            self._open()
        for ext in sorted(files):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.maxcount:
            self._close()

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        """Drop the shard in progress (its temp file), keeping completed shards."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def safe_member(member: tarfile.TarInfo) -> bool:
    """Regular files with relative names that stay inside the archive root."""
    name = member.name
    if not member.isfile() or name.startswith("/") or "\\" in name:
        return False
    return ".." not in Path(name).parts


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """Yield (key, {ext: bytes}, problems) per sample of a tar, in member order.

    `problems` lists members that were refused (links, unsafe names, a second member of the same name in a
    sample: the first is kept), each as "<member>: <reason>", so callers can report them. Directory entries carry
    no data and are passed over. Consecutive members with the same key form one sample (WebDataset semantics).
    """
    current_key, current, problems = None, {}, []
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not safe_member(member):
                problems.append(f"{member.name}: refused tar member (link, absolute or '..' name)")
                continue
            m = _KEY_RE.match(member.name)
            if not m:
                problems.append(f"{member.name}: no extension, not part of a sample")
                continue
            key, ext = m.group(1), m.group(2).lower()
            if key != current_key and current:
                yield current_key, current, problems
                current, problems = {}, []
            current_key = key
            if ext in current:
                problems.append(f"{member.name}: duplicate member name, the sample's first one is kept")
                continue
            fh = tar.extractfile(member)
            current[ext] = fh.read() if fh else b""
    if current or problems:
        yield current_key, current, problems
