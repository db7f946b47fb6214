"""Checkpoints (pipeline/checkpoint.py) observed from outside: which file a run resumes from, which it refuses, what
is kept on disk, and that reading one never runs code."""
from __future__ import annotations

import errno
import logging
import os
import pathlib
from collections import namedtuple

import pytest
import torch

from pipeline import checkpoint


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_names_links_and_prunes(tmp_path):
    folder = tmp_path / "a" / "b" / "ckpt"  # parents are made
    paths = [checkpoint.save(folder, {"step": s, "w": torch.full((2,), float(s))}, s) for s in (1, 2, 3)]
    assert [p.name for p in paths] == ["step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]
    # the two newest step files by default, and last.pt the same file as the newest (a hard link, not a copy)
    assert _names(folder) == ["last.pt", "step-00000002.pt", "step-00000003.pt"]
    assert os.path.samefile(folder / "last.pt", folder / "step-00000003.pt")
    checkpoint.save(folder, {"step": 4}, 4, keep=1)
    assert _names(folder) == ["last.pt", "step-00000004.pt"]
    checkpoint.save(folder, {"step": 5}, 5, keep=3)
    assert _names(folder) == ["last.pt", "step-00000004.pt", "step-00000005.pt"]


def test_step_files_orders_by_write_time_then_step_and_ignores_other_names(tmp_path):
    assert checkpoint.step_files(tmp_path / "missing") == []
    for name in ["step-00000010.pt", "step-00000009.pt", "step-00000100.pt", "last.pt", "step-1.pt",
                 ".step-00000011.pt.tmp-7", "step-00000012.pt.bak", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, ns=(10**18, 10**18))  # one clock tick: by step
    assert [p.name for p in checkpoint.step_files(tmp_path)] == [
        "step-00000100.pt", "step-00000010.pt", "step-00000009.pt"]
    os.utime(tmp_path / "step-00000009.pt", ns=(10**18 + 1, 10**18 + 1))  # written later: newer, whatever its step
    assert [p.name for p in checkpoint.step_files(tmp_path)] == [
        "step-00000009.pt", "step-00000100.pt", "step-00000010.pt"]


def test_a_shorter_run_keeps_its_own_files_and_falls_back_to_them(tmp_path, caplog):
    """An earlier run with other params left step 590 and 600; a new run saving steps 10, 20, 30 used to prune each
    of its own files as 'the oldest', and with its last.pt damaged, fall back to step 600 of the other run and
    start fresh. Its own files are the newest written: they are kept, the other run's pruned."""
    for s in (590, 600):
        checkpoint.save(tmp_path, {"step": s, "run_id": "old"}, s)
        os.utime(tmp_path / f"step-{s:08d}.pt", ns=(10**18 + s, 10**18 + s))  # long ago
    for s in (10, 20, 30):
        checkpoint.save(tmp_path, {"step": s, "run_id": "new"}, s)
    assert _names(tmp_path) == ["last.pt", "step-00000020.pt", "step-00000030.pt"]
    (tmp_path / "step-00000030.pt").write_bytes(b"truncated")  # last.pt is the same file
    with caplog.at_level(logging.WARNING, logger="tokenmill.checkpoint"):
        assert checkpoint.load_latest(tmp_path, expect={"run_id": "new"})["step"] == 20
    assert "starting fresh" not in caplog.text


def test_load_latest_prefers_last_and_falls_back_past_unreadable_files(tmp_path, caplog):
    assert checkpoint.load_latest(tmp_path) is None  # nothing yet: a fresh start
    for s in (1, 2):
        checkpoint.save(tmp_path, {"step": s}, s)
    assert checkpoint.load_latest(tmp_path)["step"] == 2
    # last.pt and the newest step file damaged (they are one file): the older one is resumed, and the log says why
    (tmp_path / "step-00000002.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="tokenmill.checkpoint"):
        state = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("is unreadable" in w and "trying an older one" in w for w in warned)
    assert str(tmp_path / "last.pt") in warned[0] and str(tmp_path / "step-00000002.pt") in warned[1]
    caplog.clear()
    (tmp_path / "step-00000001.pt").write_bytes(b"")  # an empty file: torch's EOFError has no message
    with caplog.at_level(logging.WARNING, logger="tokenmill.checkpoint"):
        assert checkpoint.load_latest(tmp_path) is None  # none readable: a fresh start, not a crash
    assert (f"checkpoint {tmp_path / 'step-00000001.pt'} is unreadable (EOFError); trying an older one"
            in [r.getMessage() for r in caplog.records])  # (rewritten just now: it may be tried before step 2)


def test_load_latest_without_last_pt_reads_the_newest_step_file(tmp_path):
    for s in (3, 4):
        checkpoint.save(tmp_path, {"step": s}, s)
    (tmp_path / "last.pt").unlink()
    assert checkpoint.load_latest(tmp_path)["step"] == 4


@pytest.mark.parametrize("changed, says", [
    ({"run_id": "other"}, "other params or input data (params section, data fingerprint, world size)"),
    ({"code": "other"}, "other code (a file in the stage's import closure changed)"),
    ({"run_id": "other", "code": "other"}, "other params or input data (params section, data fingerprint, world "
                                           "size) and code (a file in the stage's import closure changed)"),
    ({"seed_kind": "other"}, "other seed_kind"),  # a key without a description is named as it is
])
def test_load_latest_resumes_only_the_same_identity(tmp_path, caplog, changed, says):
    identity = {"run_id": "r1", "code": "c1"}
    checkpoint.save(tmp_path, {"step": 7, **identity}, 7)
    assert checkpoint.load_latest(tmp_path, expect=identity)["step"] == 7
    assert checkpoint.load_latest(tmp_path, expect={"run_id": "r1"})["step"] == 7  # only the keys asked for
    with caplog.at_level(logging.WARNING, logger="tokenmill.checkpoint"):
        assert checkpoint.load_latest(tmp_path, expect={**identity, **changed}) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {tmp_path / 'last.pt'} was made by a run with {says}; starting fresh"]


def test_a_checkpoint_of_another_identity_is_not_passed_over_for_an_older_one(tmp_path):
    checkpoint.save(tmp_path, {"step": 1, "code": "c1"}, 1)
    checkpoint.save(tmp_path, {"step": 2, "code": "c2"}, 2)
    # the newest is another run's: starting fresh, not resuming the older file of the same code, which the newer
    # run's outputs have already replaced
    assert checkpoint.load_latest(tmp_path, expect={"code": "c1"}) is None


class _Payload:
    """Unpickling this object would create a file: the proof that a checkpoint was executed, not read."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_reading_never_runs_pickled_code(tmp_path, caplog):
    marker = tmp_path / "executed"
    torch.save({"step": 3, "evil": _Payload(marker)}, tmp_path / "last.pt")
    with pytest.raises(Exception):
        checkpoint.read(tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING, logger="tokenmill.checkpoint"):
        assert checkpoint.load_latest(tmp_path) is None
    assert not marker.exists() and "is unreadable" in caplog.text
    torch.save({"t": (torch.ones(1), 2)}, tmp_path / "ok.pt")  # plain containers of tensors and numbers are fine
    assert checkpoint.read(tmp_path / "ok.pt")["t"][1] == 2


def test_read_maps_to_the_cpu_by_default(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    assert checkpoint.read(tmp_path / "c.pt")["w"].device.type == "cpu"
    assert checkpoint.read(tmp_path / "c.pt", map_location="meta")["w"].device.type == "meta"


def test_a_full_disk_names_the_sizes_and_other_errors_pass_through(tmp_path, monkeypatch):
    state = {"w": torch.zeros(3 << 18), "more": [torch.zeros(1 << 18, dtype=torch.float64), (torch.zeros(8),)],
             "step": 1}  # 3 MiB + 2 MiB + 32 bytes
    Usage = namedtuple("Usage", "total used free")

    def enforce_fail(obj, f, *a, **kw):
        pathlib.Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos")

    def disk_with(free):
        def usage(path):
            assert path == tmp_path  # the checkpoint folder's disk
            return Usage(1 << 30, 0, free)
        return usage

    monkeypatch.setattr(checkpoint.torch, "save", enforce_fail)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_with(1 << 19))
    with pytest.raises(OSError) as exc:
        checkpoint.save(tmp_path, state, 5)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / "step-00000005.pt")
    assert exc.value.strerror == "no space left on device for a 5.0 MB checkpoint (0.5 MB free)"
    assert _names(tmp_path) == []  # the half-written temp is gone
    # a full disk means less free than the tensors plus 1 MiB of slack (the archive's own overhead): at the boundary,
    # torch's own error is not disguised as a full disk
    needed = (5 << 20) + 32
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_with(needed + (1 << 20) - 1))
    with pytest.raises(OSError, match="no space left"):
        checkpoint.save(tmp_path, state, 5)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_with(needed + (1 << 20)))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.save(tmp_path, state, 5)
    assert _names(tmp_path) == []


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(11)
    saved = checkpoint.rng_state()
    first = torch.rand(4)
    checkpoint.save(tmp_path, {"rng": saved}, 1)
    torch.rand(10)  # move on, as training would
    checkpoint.set_rng_state(checkpoint.load_latest(tmp_path)["rng"])
    assert torch.equal(torch.rand(4), first)
