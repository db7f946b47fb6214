"""The atomic-write protocol (pipeline/atomic.py, pipeline/checkpoint.py), observed from outside: a final name
holds either the old complete content or the new complete content, never a partial one, and a failed write
leaves neither a changed final file nor a temp file behind.

Each test watches the final name at the moment the writer is busy (inside the block, or when the content is
half written) and at the rename, so writing straight to the final name fails them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import atomic, checkpoint
from pipeline.atomic import OWNER_FILE, atomic_path, replace_dir, write_bytes, write_json


class Crash(Exception):
    pass


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_final_name_is_untouched_until_the_block_commits(tmp_path, existing):
    final = tmp_path / "out.bin"
    if existing:
        final.write_bytes(b"old")
    with atomic_path(final) as tmp:
        assert tmp != final and tmp.parent == final.parent  # same folder: the rename cannot cross devices
        tmp.write_bytes(b"new content")
        # written but not committed: the final name still holds what it held before (or nothing)
        assert final.read_bytes() == b"old" if existing else not final.exists()
    assert final.read_bytes() == b"new content"
    assert siblings(final) == ["out.bin"]  # no temp left after the commit


@pytest.mark.parametrize("existing", [False, True])
def test_exception_keeps_old_content_and_removes_the_temp(tmp_path, existing):
    final = tmp_path / "out.bin"
    if existing:
        final.write_bytes(b"old")
    with pytest.raises(Crash):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half of the new")
            raise Crash
    assert final.read_bytes() == b"old" if existing else not final.exists()
    assert siblings(final) == (["out.bin"] if existing else [])


def test_temp_folder_is_removed_on_exception(tmp_path):
    final = tmp_path / "store"
    with pytest.raises(Crash):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x")
            raise Crash
    assert list(tmp_path.iterdir()) == []


def crash_mid_write(monkeypatch) -> None:
    """Path.write_bytes writes the first half, then the process 'dies' (an exception)."""
    def half_then_crash(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise Crash(f"killed while writing {self.name}")

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)


@pytest.mark.parametrize("writer,old,new", [
    (write_bytes, b"old bytes", b"0123456789" * 10),
    (write_json, {"a": 1}, {"b": list(range(50))}),
])
def test_crash_mid_write_leaves_the_old_file_whole(tmp_path, monkeypatch, writer, old, new):
    final = tmp_path / "f.json"
    writer(final, old)
    before = final.read_bytes()
    crash_mid_write(monkeypatch)
    with pytest.raises(Crash):
        writer(final, new)
    monkeypatch.undo()
    assert final.read_bytes() == before
    assert siblings(final) == ["f.json"]


def test_rename_is_the_commit(tmp_path, monkeypatch):
    """At the moment of os.replace the final name still holds the old content and the source holds the new."""
    final = tmp_path / "metrics.json"
    write_json(final, {"v": 1})
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).read_bytes(), Path(src).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    write_json(final, {"v": 2})
    assert len(seen) == 1
    src_name, final_then, src_then = seen[0]
    assert src_name != "metrics.json" and src_name.startswith(".metrics.json.tmp-")
    assert final_then == b'{\n  "v": 1\n}\n' and src_then == b'{\n  "v": 2\n}\n'
    assert final.read_bytes() == b'{\n  "v": 2\n}\n'


def test_replace_dir_swaps_whole_folders(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (final / OWNER_FILE).write_text("prepare\n")  # an earlier output of the same stage
    new = tmp_path / ".out.partial"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, final, "prepare")
    assert sorted(p.name for p in final.iterdir()) == [OWNER_FILE, "new.txt"]  # swapped, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-<pid> folder, no partial


def test_checkpoint_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1, "w": torch.ones(3)}, 1)
    real_save = torch.save

    def half_then_crash(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:  # the process dies with the file half written
            fh.truncate(os.path.getsize(f) // 2)
        raise Crash

    monkeypatch.setattr(checkpoint.torch, "save", half_then_crash)
    with pytest.raises(Crash):
        checkpoint.save(tmp_path, {"step": 2, "w": torch.zeros(3)}, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-00000001.pt"]
    state = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_replace_dir_into_a_new_name(tmp_path):
    new = tmp_path / ".out.partial"
    new.mkdir()
    (new / "a.txt").write_text("a")
    replace_dir(new, tmp_path / "out", "prepare")  # nothing to move aside first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "a"


def test_json_is_canonical_and_reads_back(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": {"d": [1, 2], "c": None}})
    assert (tmp_path / "m.json").read_bytes() == (
        b'{\n  "a": {\n    "c": null,\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n')
    assert atomic.read_json(tmp_path / "m.json") == {"b": 1, "a": {"d": [1, 2], "c": None}}


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_sha256_file_hashes_the_whole_file(tmp_path, chunk):
    import hashlib
    data = bytes(range(256)) * 41  # 10496 bytes: many chunks of 7, one of 1 MiB
    (tmp_path / "f").write_bytes(data)
    assert atomic.sha256_file(tmp_path / "f", chunk=chunk) == hashlib.sha256(data).hexdigest()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_pid_alive(monkeypatch):
    assert atomic.pid_alive(os.getpid()) and not atomic.pid_alive(dead_pid())

    def not_ours(pid, sig):
        raise PermissionError  # the process exists but belongs to another user

    monkeypatch.setattr(atomic.os, "kill", not_ours)
    assert atomic.pid_alive(12345)


def test_writer_removes_temps_of_dead_writers_only(tmp_path):
    """A killed writer leaves `.<name>.tmp-<pid>` (or a folder, or `.old-<pid>`); the next writer of the same name
    removes those whose process is gone, and nothing else."""
    final = tmp_path / "store"
    gone, live = dead_pid(), os.getppid()
    (tmp_path / f".store.tmp-{gone}").write_bytes(b"partial")
    (tmp_path / f".store.old-{gone}").mkdir()
    (tmp_path / f".store.old-{gone}" / "x").write_bytes(b"x")
    (tmp_path / "target").mkdir()
    (tmp_path / f".store.tmp-{gone}0").symlink_to(tmp_path / "target")  # another dead pid's temp, a symlink
    keep = [f".store.tmp-{live}", f".store.tmp-{os.getpid()}", f".other.tmp-{gone}", f".store.tmp-{gone}.bak",
            "store.tmp-1", "target"]
    for name in keep[:-1]:
        (tmp_path / name).write_bytes(b"not ours to remove")
    removed = atomic.remove_stale_temps(final)
    assert sorted(p.name for p in removed) == sorted([f".store.tmp-{gone}", f".store.old-{gone}",
                                                       f".store.tmp-{gone}0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert (tmp_path / "target").is_dir()  # the symlink was removed, not followed
    # a writer of `store` cleans up the same way before it writes
    (tmp_path / f".store.tmp-{os.getpid()}").unlink()  # (this process's own temp name is the one it writes)
    keep.remove(f".store.tmp-{os.getpid()}")
    (tmp_path / f".store.tmp-{gone}").write_bytes(b"partial")
    write_bytes(final, b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["store"])


def test_stale_temps_in_a_missing_folder():
    assert atomic.remove_stale_temps(Path("/nonexistent-folder/x")) == []


def test_two_cleaners_racing_for_the_same_stale_temps(tmp_path, monkeypatch):
    """Another writer of the same name may remove a stale temp between our check and our removal: not an error.
    The other cleaner strikes after our liveness check (the file) and just before our rmtree (the folder)."""
    import shutil
    gone = dead_pid()
    (tmp_path / f".store.tmp-{gone}").write_bytes(b"partial")
    (tmp_path / f".store.old-{gone}").mkdir()
    (tmp_path / f".store.old-{gone}" / "part").write_bytes(b"x")
    real_alive, real_rmtree = atomic.pid_alive, shutil.rmtree

    def other_cleaner_took_the_file(pid: int) -> bool:
        (tmp_path / f".store.tmp-{gone}").unlink(missing_ok=True)
        return real_alive(pid)

    def other_cleaner_took_the_folder(path, *args, **kwargs):
        real_rmtree(path, ignore_errors=True)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "pid_alive", other_cleaner_took_the_file)
    monkeypatch.setattr(shutil, "rmtree", other_cleaner_took_the_folder)
    atomic.remove_stale_temps(tmp_path / "store")
    assert list(tmp_path.iterdir()) == []


def test_stamp_gives_the_file_its_times_before_it_appears(tmp_path, monkeypatch):
    """The stamped file must hold the stamp's times from the instant its final name exists (a stamp applied after
    the rename leaves a window in which a kill keeps a file newer than its run log)."""
    stamp = tmp_path / "run.json"
    stamp.write_text("{}")
    os.utime(stamp, ns=(1_000_000_000_123, 2_000_000_000_456))  # far from "now" and from each other
    final = tmp_path / "plots.tsv"
    seen = []
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        st = os.stat(src)
        seen.append((st.st_atime_ns, st.st_mtime_ns))
        real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(final, stamp=stamp) as tmp:
        tmp.write_text("step\tloss\n")
    assert seen == [(1_000_000_000_123, 2_000_000_000_456)]
    assert final.stat().st_mtime_ns == 2_000_000_000_456 and final.read_text() == "step\tloss\n"


def test_a_missing_stamp_fails_the_write_and_leaves_nothing(tmp_path):
    final = tmp_path / "plots.tsv"
    with pytest.raises(FileNotFoundError):
        with atomic_path(final, stamp=tmp_path / "absent.json") as tmp:
            tmp.write_text("x")
    assert siblings(final) == []
