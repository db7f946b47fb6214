"""Nothing lost: hostile files are never executed, refused writes are one-line errors that leave outputs intact,
and (slow) every long stage survives SIGKILLs at random points through scripts/kill_resume.py.

The other faults live beside the stage they hit: bad images (test_prepare), untrusted tars (test_prepare), damaged
token stores and the LMDB map ceiling (test_tokenize), corrupt checkpoints (test_train_vqgan), bad params
(test_config), a transient failure retried by Prefect (test_orchestration).
"""
from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from yaml.constructor import FullConstructor, SafeConstructor

from helpers import ROOT, files_under, make_idx_dataset
from pipeline import checkpoint
from pipeline.sandbox import read_only_prefix

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SOURCE_DIRS = ("pipeline", "stages", "models", "bench", "scripts")


# ---------------------------------------------------------------- untrusted files

def calls(name: str) -> list[tuple[str, ast.Call]]:
    """Every call of `<something>.<name>(...)` in the project's code, with its file:line."""
    found = []
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def keyword(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    return None if kw is None or not isinstance(kw.value, ast.Constant) else kw.value.value


def test_no_code_path_unpickles_data_or_checkpoints():
    loads = calls("load")
    torch_loads = [(w, c) for w, c in loads if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert torch_loads, "the scan found no torch.load at all: it is not looking at the code"
    assert [w for w, c in torch_loads if keyword(c, "weights_only") is not True] == []
    np_loads = [(w, c) for w, c in loads if isinstance(c.func.value, ast.Name) and c.func.value.id == "np"]
    assert [w for w, c in np_loads if keyword(c, "allow_pickle") is not False] == []
    for d in SOURCE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, path
    # yaml.load without a safe loader would build arbitrary objects: only a loader built on the safe constructor and
    # none of the fuller ones, named as Loader= (SafeLoader, libyaml's CSafeLoader, pipeline/config.py's subclass that
    # adds YAML 1.2 floats), may appear
    yaml_loads = [(w, c) for w, c in calls("load") if isinstance(c.func.value, ast.Name) and c.func.value.id == "yaml"]
    for where, call in yaml_loads:
        loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
        assert isinstance(loader, ast.Name) and len(call.args) == 1, where
        module = importlib.import_module(where.split(":")[0].removesuffix(".py").replace("/", "."))
        chosen = getattr(module, loader.id)
        assert issubclass(chosen, SafeConstructor) and not issubclass(chosen, FullConstructor), where
    assert issubclass(yaml.CLoader, FullConstructor) and issubclass(yaml.UnsafeLoader, FullConstructor)  # refused


class Boom:
    """Unpickling this would run os.system: a hostile checkpoint."""

    def __reduce__(self):
        return (os.system, ("touch hostile-code-ran",))


def test_hostile_checkpoint_is_refused_and_never_executed(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, {"step": torch.tensor(10), "run_id": "r"}, 10)
    torch.save({"step": 20, "run_id": "r", "payload": Boom()}, ckpt / "step-00000020.pt")  # a planted pickle
    os.replace(ckpt / "step-00000020.pt", ckpt / "last.pt")
    with caplog.at_level(logging.WARNING):
        state = checkpoint.load_latest(ckpt, expect={"run_id": "r"})
    assert int(state["step"]) == 10  # fell back to the good one
    assert not (tmp_path / "hostile-code-ran").exists()
    assert any("last.pt is unreadable" in r.message for r in caplog.records)


# ---------------------------------------------------------------- refused writes

def test_read_only_output_folder_is_one_line_and_keeps_outputs(tmp_path):
    src = make_idx_dataset(tmp_path / "idx", n_train=30, n_val=5)
    params = tmp_path / "params.yaml"

    def write_params(resolution: int) -> None:
        params.write_text(f"datasets:\n  a:\n    source: idx\n    path: {src}\n    resolution: {resolution}\n"
                          f"    channels: 1\nprepare:\n  out_dir: {tmp_path / 'out'}\n  shard_size: 25\n")

    stage = [sys.executable, "-m", "stages.prepare", "--dataset", "a", "--params", str(params)]
    write_params(16)
    subprocess.run(stage, cwd=ROOT, env=ENV, check=True, capture_output=True)
    before = files_under(tmp_path / "out")
    write_params(20)  # new params: the stage must rewrite its output
    prefix = read_only_prefix(tmp_path / "out")
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (root without mount namespaces)")
    try:
        proc = subprocess.run(prefix + stage, cwd=ROOT, env=ENV, capture_output=True, text=True)
    finally:
        (tmp_path / "out").chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'out'}"), proc.stderr
    assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]
    assert files_under(tmp_path / "out") == before  # the earlier output is intact


# ---------------------------------------------------------------- the whole corpus, through the users' commands

def test_every_bad_input_gives_its_expected_outcome(tmp_path):
    out = tmp_path / "bad_inputs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bad_inputs.py"), "--json", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    bad = [x for x in r["results"] if not x["ok"]]
    assert bad == [] and r["tracebacks"] == 0 and proc.returncode == 0
    expected = json.loads((ROOT / "tests/corpus/expected.json").read_text())
    covered = {x["input"] for x in r["results"]}
    assert set(expected["images"]) | set(expected["webdataset"]) | set(expected["params"]) <= covered
    assert {"empty folder", "truncated LMDB", "store of another codebook", "truncated last.pt", "zero-byte last.pt",
            "foreign VQGAN folder", "LMDB map ceiling too small", "read-only output folder"} <= covered


# ---------------------------------------------------------------- kill and resume (the whole pipeline)

@pytest.mark.slow
def test_kill_and_resume_every_long_stage(tmp_path):
    """Two SIGKILLs per long stage on the tiny preset (the script's default is ten; README figures)."""
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/kill_resume.py"), "--kills", "2", "--n-train", "300",
                           "--n-val", "80", "--json", str(out), "--seed", "1"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1800)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["kills"] == 2 * 6  # five long stages of kind ar, plus the GAN's training
    assert r["files_lost_or_corrupt"] == 0, r
    for kind in ("ar", "gan"):
        assert r[kind]["dvc_status_clean"] and not r[kind]["missing"] and not r[kind]["different"]
    assert proc.returncode == 0
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_corrupt_dvc_rwlock_is_repaired_only_when_nobody_holds_it(tmp_path):
    import fcntl

    from pipeline.dvc_repair import repair_rwlock
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "rwlock").write_text('{"read": {}, "write": {}}')
    assert not repair_rwlock(tmp_path) and (tmp / "rwlock").is_file()  # valid: kept
    (tmp / "rwlock").write_text('{"read": {"data/x": [{"pid": 1')  # cut short by a kill
    with open(tmp / "rwlock.lock", "a") as held:  # a running dvc command holds the guard
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert not repair_rwlock(tmp_path) and (tmp / "rwlock").is_file()
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert repair_rwlock(tmp_path) and not (tmp / "rwlock").exists()
