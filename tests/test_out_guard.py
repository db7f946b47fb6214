"""Runs never cost the user's files: the out guard (paths DVC would delete), overlapping outs, a run refused while a
dvc stage runs, a failed run restoring only what it touched, SIGTERM undoing a run, damaged dvc.yaml, path errors."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, make_idx_dataset, make_project, tiny_params
from pipeline import dvc_graph, out_guard, run_checks, runs
from pipeline.dvc_deps import load_dvc_yaml
from pipeline.errors import UserError, main_guard

DVC_YAML = """stages:
  make:
    foreach: ${datasets}
    do:
      cmd: python -m stages.make --set ${key}
      deps:
        - ${item.path}
      outs:
        - ${make.out_dir}/${key}
  train:
    cmd: python -m stages.train
    outs:
      - ${train.out_dir}
    metrics:
      - ${train.metrics}
  mine:
    cmd: ./plot.sh
    outs:
      - ${train.out_dir}
"""


def params(**train):
    return {"datasets": {"a": {"path": "src/a"}}, "make": {"out_dir": "data/made"},
            "train": {"out_dir": "data/model", "metrics": "data/train.json", **train}}


@pytest.fixture
def proj(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(out_guard, "_cache_dir", lambda root: cache)
    return tmp_path


def refusal(proj, **train) -> str:
    with pytest.raises(UserError) as err:
        out_guard.check_outputs(proj, params(**train), "params.yaml")
    return str(err.value)


def test_outs_resolve_with_params_foreach_items_and_skip_user_stages(proj):
    assert out_guard.planned_outputs(proj, params()) == [
        ("make@a", "make", "data/made/a", ["make.out_dir"]), ("train", "train", "data/model", ["train.out_dir"]),
        ("train", "train", "data/train.json", ["train.metrics"])]
    assert out_guard.planned_outputs(proj, params(), ("deps",)) == [
        ("make@a", "make", "src/a", ["datasets.<name>.path"])]


def test_a_path_naming_a_value_params_lack_is_one_line(proj):
    bare = {**params(), "train": {}}  # `-S train={}`: tokenmill's defaults fill it in, DVC's interpolation cannot
    with pytest.raises(UserError) as err:
        out_guard.check_outputs(proj, bare, "params.yaml")
    assert str(err.value) == ("dvc.yaml: stage train uses ${train.out_dir}, which params.yaml does not set (DVC reads "
                              "it from params.yaml; tokenmill's defaults do not reach it)")


def test_an_existing_folder_is_refused_unless_its_stage_made_it(proj):
    (proj / "notes").mkdir()
    out_guard.check_outputs(proj, params(out_dir="notes"), "params.yaml")  # empty: nothing to lose
    (proj / "notes" / "a.txt").write_text("precious")
    assert refusal(proj, out_dir="notes") == (
        "params.yaml: notes (train.out_dir) exists and is a folder without a .tokenmill-stage marker, not an output "
        "of stage train; DVC deletes a stage's outputs before running it, so nothing was run: move it away or "
        "choose another path")
    (proj / "notes" / ".tokenmill-stage").write_text("make\n")
    assert "is a folder written by 'make', not an output of stage train" in refusal(proj, out_dir="notes")
    (proj / "notes" / ".tokenmill-stage").write_text("train\n")
    out_guard.check_outputs(proj, params(out_dir="notes"), "params.yaml")
    (proj / "link").symlink_to(proj / "notes")
    assert "link (train.out_dir) exists and is a symbolic link" in refusal(proj, out_dir="link")
    assert (proj / "notes" / "a.txt").read_text() == "precious"


def test_an_existing_file_is_refused_unless_dvc_holds_it_or_a_run_wrote_it(proj):
    (proj / "notes.txt").write_text("precious")
    assert "notes.txt (train.metrics) exists and is a file DVC's cache does not hold" in refusal(
        proj, metrics="notes.txt")
    digest = hashlib.md5(b"precious").hexdigest()
    (proj / "cache" / digest[:2]).mkdir()
    (proj / "cache" / digest[:2] / digest[2:]).write_text("precious")
    out_guard.check_outputs(proj, params(metrics="notes.txt"), "params.yaml")
    (proj / "m.json").write_text("{}")
    assert "m.json (train.metrics) exists" in refusal(proj, metrics="m.json")
    (proj / "m.run.json").write_text("{}")  # what write_metrics leaves beside a metrics file
    out_guard.check_outputs(proj, params(metrics="m.json"), "params.yaml")
    # another file out of the stage (its plots) written before that run log: the same run made it
    (proj / "dvc.yaml").write_text(DVC_YAML.replace("    metrics:\n", "    plots:\n      - ${train.plots}\n"
                                                    "    metrics:\n", 1))
    (proj / "p.tsv").write_text("step\n")
    os.utime(proj / "p.tsv", ns=(10**18, 10**18))
    out_guard.check_outputs(proj, params(metrics="m.json", plots="p.tsv"), "params.yaml")
    os.utime(proj / "p.tsv", ns=(4 * 10**18, 4 * 10**18))  # newer than the run: not that run's
    assert "p.tsv (train.plots) exists and is a file DVC's cache does not hold" in refusal(
        proj, metrics="m.json", plots="p.tsv")


def test_what_dvc_lock_records_for_the_stage_passes_and_git_tracked_paths_never(proj):
    (proj / "data" / "model").mkdir(parents=True)
    (proj / "data" / "model" / "w.bin").write_text("w")
    assert "data/model (train.out_dir) exists and is a folder without" in refusal(proj)
    lock = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "data/model", "md5": "x.dir"}]}}}
    (proj / "dvc.lock").write_text(json.dumps(lock))
    out_guard.check_outputs(proj, params(), "params.yaml")
    lock["stages"] = {"make@a": lock["stages"]["train"]}  # recorded, but as another stage's output
    (proj / "dvc.lock").write_text(json.dumps(lock))
    assert "not an output of stage train" in refusal(proj)
    (proj / "docs").mkdir()
    (proj / "docs" / "a.md").write_text("doc")
    (proj / "docs" / ".tokenmill-stage").write_text("train")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run(["git", "add", "docs/a.md"], cwd=proj, check=True)
    assert "docs (train.out_dir) exists and is tracked by git" in refusal(proj, out_dir="docs")


def test_overlapping_outs_and_a_stage_reading_its_own_output_are_one_line(proj):
    with pytest.raises(UserError, match=r"data/made/a \(make.out_dir\) of stage make@a and data \(train.out_dir\) "
                                        r"of stage train are the same path or one inside the other"):
        out_guard.check_overlaps(proj, params(out_dir="data"), "params.yaml")
    with pytest.raises(UserError, match=r"data/made/a \(make.out_dir\) of stage make@a and data/made/./a/m.json "
                                        r"\(train.metrics\) of stage train"):
        out_guard.check_overlaps(proj, params(metrics="data/made/./a/m.json"), "params.yaml")
    bad = {**params(), "datasets": {"a": {"path": "."}}}
    with pytest.raises(UserError, match=r"stage make@a would read \. \(datasets.<name>.path\), which holds its own "
                                        r"output data/made/a \(make.out_dir\)"):
        out_guard.check_overlaps(proj, bad, "params.yaml")
    out_guard.check_overlaps(proj, {**params(), "make": {"out_dir": "data/model2"}}, "params.yaml")  # a prefix only


def test_a_checkpoint_folder_stays_apart_from_every_output_input_and_other_checkpoint_folder(proj):
    """DVC never sees a checkpoint folder: inside another stage's output its files made that output 'modified' and
    blocked every later run; as its own stage's output, DVC deleted it before the run."""
    ckpt = [("train", "data/ckpt/train", "train.ckpt_dir"), ("make", "data/ckpt/make", "make.ckpt_dir")]
    out_guard.check_overlaps(proj, params(), "params.yaml", ckpt)
    for path, other in (("data/made/a", "data/made/a (make.out_dir) of stage make@a"),
                        ("data/model/ckpt", "data/model (train.out_dir) of stage train"),
                        ("data", "data/made/a (make.out_dir) of stage make@a"),
                        ("src/a/ck", "src/a (datasets.<name>.path) of stage make@a")):
        with pytest.raises(UserError) as err:
            out_guard.check_overlaps(proj, params(), "params.yaml", [("train", path, "train.ckpt_dir"), ckpt[1]])
        assert str(err.value) == (f"params.yaml: train.ckpt_dir = {path}, where stage train keeps its checkpoints, "
                                  f"and {other} are the same path or one inside the other (DVC would delete or "
                                  f"rewrite one with the other); give the checkpoints a folder of their own")
    with pytest.raises(UserError, match=r"^params.yaml: train.ckpt_dir and make.ckpt_dir are both data/ckpt; each "
                                        r"stage prunes the checkpoints in its folder, so give each its own$"):
        out_guard.check_overlaps(proj, params(), "params.yaml", [("train", "data/ckpt", "train.ckpt_dir"),
                                                                 ("make", "data/./ckpt", "make.ckpt_dir")])
    # nested checkpoint folders are fine: each stage prunes only the step files directly in its own
    out_guard.check_overlaps(proj, params(), "params.yaml", [("train", "data/ckpt", "train.ckpt_dir"), ckpt[1]])


def test_the_real_stages_checkpoint_folders_are_found_from_their_params(tmp_path):
    from pipeline.config import apply_overrides, load_params
    base = load_params(ROOT / "params.yaml")
    with pytest.raises(UserError, match=r"train_vqgan.ckpt_dir = data/vqgan, where stage train_vqgan keeps its "
                                        r"checkpoints, and data/vqgan \(train_vqgan.out_dir\) of stage train_vqgan"):
        run_checks.check_params_dict(apply_overrides(base, ["train_vqgan.ckpt_dir=data/vqgan"]), "params.yaml", ROOT)
    with pytest.raises(UserError, match=r"train_vqgan.ckpt_dir and train_transformer.ckpt_dir are both data/ck;"):
        run_checks.check_params_dict(apply_overrides(base, ["train_vqgan.ckpt_dir=data/ck",
                                                      "train_transformer.ckpt_dir=data/ck"]), "params.yaml", ROOT)


STALE_YAML = """stages:
  sample:
    cmd: python -m stages.sample
    deps:
      - ${sample.model_dir}
    outs:
      - ${sample.out_dir}
  evaluate:
    cmd: python -m stages.evaluate
    deps:
      - ${evaluate.samples_dir}
      - ${evaluate.extra}/x.json
    metrics:
      - ${evaluate.metrics}
"""


def test_an_input_only_an_earlier_run_left_is_refused(tmp_path):
    """`-S sample.out_dir=data/s/other` alone: evaluate would score the old samples left at data/s/default, and DVC
    would call it unchanged, so the new samples were given the old gFID. A copy of the user's is theirs to read."""
    (tmp_path / "dvc.yaml").write_text(STALE_YAML)
    old = tmp_path / "data" / "s" / "default"
    old.mkdir(parents=True)
    (old / ".tokenmill-stage").write_text("sample\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  sample:\n    outs:\n    - path: data/s/default\n")
    shutil.copytree(old, tmp_path / "data" / "keep")  # the user's frozen copy: marker and all, not in dvc.lock
    (tmp_path / "mine").mkdir()

    def check(**kw):
        p = {"sample": {"model_dir": "mine", "out_dir": "data/s/other"},
             "evaluate": {"samples_dir": "data/s/other", "extra": "mine", "metrics": "data/e.json"}}
        p["evaluate"].update(kw)
        out_guard.check_stale_inputs(tmp_path, p, "params.yaml")

    check()  # reads what sample makes now
    check(samples_dir="data/keep", extra="/elsewhere")  # a copy of the user's; a path outside the project
    for kw, dep in (({"samples_dir": "data/s/default"}, "data/s/default (evaluate.samples_dir)"),
                    ({"extra": "data/s/default/sub"}, "data/s/default/sub/x.json (evaluate.extra)")):
        with pytest.raises(UserError) as err:
            check(**kw)
        assert str(err.value) == (f"params.yaml: stage evaluate would read {dep}, which dvc.lock records as an output "
                                  f"of sample but no stage makes under these params (sample now writes data/s/other); "
                                  f"point it at the output it should read")


@pytest.mark.parametrize("text, message", [
    ("stages:\n  a: [\n", "not valid YAML"), ("[1, 2]\n", "no `stages:` mapping"), ("", "no `stages:` mapping"),
    ("stages:\n  a: 3\n", "stage 'a' is not a mapping")])
def test_a_damaged_dvc_yaml_is_one_line(tmp_path, text, message):
    (tmp_path / "dvc.yaml").write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_dvc_yaml(tmp_path / "dvc.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'dvc.yaml'}: ") and "\n" not in str(err.value)
    if "stages" not in text:  # another DVC file of the user's, met under `dvc repro`: not ours to judge
        assert load_dvc_yaml(tmp_path / "dvc.yaml", require_stages=False) == {"stages": {}}


def test_live_processes_in_dvcs_table_of_running_stages_count_dead_ones_not(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    table = tmp_path / ".dvc" / "tmp" / "rwlock"
    assert runs.running_stage_commands(tmp_path) == []
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        table.write_text(json.dumps({"write": {"data/a": {"pid": dead.pid, "cmd": "dvc repro old"}},
                                     "read": {"x": [{"pid": live.pid, "cmd": "dvc repro b"}]}}))
        assert runs.running_stage_commands(tmp_path) == ["dvc repro b"]
        table.write_text(json.dumps({"write": {"data/a": {"pid": os.getpid(), "cmd": "me"}}}))
        assert runs.running_stage_commands(tmp_path) == []
        table.write_text('{"write": {"data/a"')  # DVC writes it in place: cut short means a dvc command is writing
        assert runs.running_stage_commands(tmp_path) == ["(DVC is writing its table of running stages)"]
    finally:
        live.kill()
        live.wait()  # reaped here, not by whatever process runs the tests (mutmut's os.wait() takes any child)


def test_a_failed_run_restores_the_stages_whose_outputs_it_changed_only(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".tokenmill-stage").write_text(name)
    (tmp_path / "m.json").write_text("{}")
    lock = {"a": ["a"], "b": ["b", "m.json"], "c": ["c"]}
    (tmp_path / "dvc.lock").write_text(json.dumps({"stages": {s: {"outs": [{"path": p} for p in paths]}
                                                              for s, paths in lock.items()}}))
    before = runs.recorded_outputs(tmp_path)
    (tmp_path / "a" / "user-notes.txt").write_text("kept")  # a file of the user's in an output the run never ran
    os.utime(tmp_path / "a", ns=(1, before["a"][0][2]))
    time.sleep(0.01)
    (tmp_path / "m.json").write_text('{"new": 1}')  # b rewrote its metrics
    for name in ("c",):  # c was removed by DVC before its stage ran
        (tmp_path / name / ".tokenmill-stage").unlink()
        (tmp_path / name).rmdir()
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    runs.restore_outputs(tmp_path, before)
    assert calls == [["dvc", "checkout", "--force", "b", "c"]]
    calls.clear()
    runs.restore_outputs(tmp_path, runs.recorded_outputs(tmp_path))
    assert calls == []


def test_files_put_in_an_output_after_its_stage_wrote_it_are_seen(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin", ".tokenmill-stage"):  # the marker is what a stage writes last
        (out / name).write_text(name)
        os.utime(out / name, ns=(10**18, 10**18 + (name == ".tokenmill-stage")))
    assert not out_guard.changed_after_written(out)
    os.utime(out / "sub" / "b.bin", ns=(10**18, 10**18 + 2))  # edited since
    assert out_guard.changed_after_written(out)
    (out / "sub" / "b.bin").unlink()
    assert not out_guard.changed_after_written(out)
    (out / ".tokenmill-stage").unlink()
    assert out_guard.changed_after_written(out)  # no marker: nothing says what the stage wrote
    metrics, run_log = tmp_path / "m.json", tmp_path / "m.run.json"
    metrics.write_text("{}")
    run_log.write_text("{}")
    os.utime(metrics, ns=(10**18, 10**18))
    os.utime(run_log, ns=(10**18, 10**18 + 1))
    assert not out_guard.changed_after_written(metrics)
    os.utime(metrics, ns=(10**18, 10**18 + 5))
    assert out_guard.changed_after_written(metrics)


def test_a_modified_output_holding_bytes_dvc_lacks_stops_the_run(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for name in ("kept", "other_version", "by_hand"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".tokenmill-stage").write_text(name)
        (tmp_path / name / "w.bin").write_text(f"weights of {name}")
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    (tmp_path / "by_hand" / "manifest.json").write_text("{}")  # `python -m stages.x` ran; dvc.lock lacks stage s3
    (tmp_path / "dvc.lock").write_text(json.dumps({"stages": {"s1": {"outs": [{"path": "other_version"}]},
                                                              "s2": {"outs": [{"path": "kept"}]}}}))
    for f in [*(tmp_path / "kept").iterdir(), *(tmp_path / "other_version").iterdir()]:
        if f.name != "notes.txt":  # what DVC stored: every file of every recorded version, not the user's notes
            digest = hashlib.md5(f.read_bytes()).hexdigest()
            (cache / digest[:2]).mkdir(parents=True, exist_ok=True)
            (cache / digest[:2] / digest[2:]).write_bytes(f.read_bytes())
    monkeypatch.setattr(out_guard, "_cache_dir", lambda root: cache)
    status = {"s1": [{"changed outs": {"other_version": "modified"}}],  # e.g. after git checkout of an older lock
              "s3": [{"changed outs": {"by_hand": "modified"}}],  # what dvc status says of an unrecorded stage
              "s2": [{"changed deps": {"x": "modified"}}, {"changed outs": {"kept": "modified", "gone": "deleted"}}]}
    seen = []
    monkeypatch.setattr(out_guard.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, json.dumps(status), ""))
    with pytest.raises(UserError) as err:
        out_guard.check_unrecorded_changes(tmp_path, ["s2"])
    assert str(err.value) == ("dvc.lock: kept, an output of stage s2, holds kept/notes.txt, which DVC's cache does "
                              "not hold; DVC replaces the whole output when s2 runs: move it out, keep the output as "
                              "it is with `dvc commit s2`, or drop the changes with `dvc checkout --force s2`")
    assert seen == [["dvc", "status", "--json", "--with-deps", "s2"]]
    del status["s2"]
    out_guard.check_unrecorded_changes(tmp_path, ["s1"], with_deps=False)
    assert seen[-1] == ["dvc", "status", "--json", "s1"]


def test_a_recorded_stage_run_again_by_hand_is_its_own_output_until_a_file_is_added(tmp_path, monkeypatch):
    """`python -m stages.train_vqgan` after a params edit rewrites outputs dvc.lock records: none of the new bytes
    are in DVC's cache, yet nothing in them is the user's. A file added after the stage wrote them still is."""
    monkeypatch.setattr(out_guard, "_cache_dir", lambda root: tmp_path / "empty-cache")
    out, metrics = tmp_path / "data/vqgan", tmp_path / "data/metrics/train_vqgan.json"
    out.mkdir(parents=True)
    metrics.parent.mkdir(parents=True)
    (out / "model.safetensors").write_text("retrained")
    (out / ".tokenmill-stage").write_text("train_vqgan\n")
    metrics.write_text("{}")
    metrics.with_name("train_vqgan.run.json").write_text("{}")
    for i, f in enumerate([out / "model.safetensors", out / ".tokenmill-stage", metrics,
                           metrics.with_name("train_vqgan.run.json")]):
        os.utime(f, ns=(10**18 + i, 10**18 + i))  # in the order the stage writes them
    (tmp_path / "dvc.lock").write_text(json.dumps({"stages": {"train_vqgan": {"outs": [
        {"path": "data/vqgan"}, {"path": "data/metrics/train_vqgan.json"}]}}}))
    status = {"train_vqgan": [{"changed outs": {"data/vqgan": "modified", "data/metrics/train_vqgan.json":
                                               "modified"}}]}
    monkeypatch.setattr(out_guard.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, json.dumps(status), ""))
    out_guard.check_unrecorded_changes(tmp_path)
    (out / "notes.txt").write_text("mine")
    os.utime(out / "notes.txt", ns=(10**18 + 9, 10**18 + 9))
    with pytest.raises(UserError, match=r"data/vqgan, an output of stage train_vqgan, holds data/vqgan/notes.txt"):
        out_guard.check_unrecorded_changes(tmp_path)
    (out / "notes.txt").unlink()
    (out / ".tokenmill-stage").write_text("sample\n")  # another stage's folder under this stage's path
    os.utime(out / ".tokenmill-stage", ns=(10**18 + 1, 10**18 + 1))
    with pytest.raises(UserError, match=r"holds data/vqgan/\.tokenmill-stage|holds data/vqgan/model"):
        out_guard.check_unrecorded_changes(tmp_path)


def test_a_failed_run_removes_what_it_made_at_new_paths_only(tmp_path):
    (tmp_path / "dvc.lock").write_text(json.dumps({"stages": {"s": {"outs": [{"path": "recorded"}]}}}))
    for name in ("made", "recorded", "foreign"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    (tmp_path / "made" / ".tokenmill-stage").write_text("s")
    (tmp_path / "recorded" / ".tokenmill-stage").write_text("s")
    (tmp_path / "m.json").write_text("{}")
    new = {"made", "recorded", "foreign", "m.json", "never-made"}
    assert runs.remove_new_outputs(tmp_path, new) == ["m.json", "made"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.lock", "foreign", "recorded"]


@pytest.mark.parametrize("exc, line", [
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/tmp/x.txt/sub"),
     "error: /tmp/x.txt/sub: Not a directory (check the path)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/x\ny"),
     "error: '/proc/x\\ny': No such file or directory (check the path)")])
def test_a_path_the_os_refuses_is_one_line(exc, line, capsys):
    def fail():
        raise exc

    with pytest.raises(SystemExit) as stop:
        main_guard(fail)
    assert stop.value.code == 2 and capsys.readouterr().err == line + "\n"
    with pytest.raises(FileNotFoundError):  # no path named: more likely a bug than the user's mistake
        main_guard(lambda: (_ for _ in ()).throw(FileNotFoundError(errno.ENOENT, "gone")))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("guard")
    src = make_idx_dataset(base / "src", n_train=40, n_val=10)
    return make_project(base / "project", tiny_params({"a": src}), stages=("prepare",))


def pipeline(project, *args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_cli_refuses_an_out_path_dvc_would_delete_and_leaves_it(project):
    assert pipeline(project, "run", "--no-prefect").returncode == 0
    (project / "mine" / "a").mkdir(parents=True)
    (project / "mine" / "a" / "notes.txt").write_text("precious")
    params = (project / "params.yaml").read_bytes()
    said = {}
    for args in (("run", "--no-prefect", "-S", "prepare.out_dir=mine"), ("run", "-S", "prepare.out_dir=mine"),
                 ("add-dataset", "b", "."), ("add-dataset", "b", "data")):
        proc = pipeline(project, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr, args
        said[args[-1]] = proc.stderr
    assert f"datasets.b.path = {project} is this project's folder or holds it" in said["."]
    assert f"stage prepare@b would read {project / 'data'} (datasets.<name>.path), which holds its own output" \
        in said["data"]
    assert pipeline(project, "run", "--no-prefect", "-S", "prepare.out_dir=mine").stderr.strip().endswith(
        "mine/a (prepare.out_dir) exists and is a folder without a .tokenmill-stage marker, not an output of stage "
        "prepare@a; DVC deletes a stage's outputs before running it, so nothing was run: move it away or choose "
        "another path")
    assert (project / "mine" / "a" / "notes.txt").read_text() == "precious"
    assert (project / "params.yaml").read_bytes() == params


def test_a_run_stops_before_dvc_would_replace_an_output_holding_the_users_files(project):
    out = project / "data" / "prepared" / "a"
    assert pipeline(project, "run", "--no-prefect").returncode == 0 and (out / ".tokenmill-stage").is_file()
    (out / "my-notes.txt").write_text("precious")
    for args in (("run", "--no-prefect", "-S", "prepare.shard_size=9"), ("stage", "prepare@a"), ("check",)):
        proc = pipeline(project, *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("error: dvc.lock: data/prepared/a, an output of stage prepare@a, holds "
                                      "data/prepared/a/my-notes.txt, which DVC's cache does not hold"), proc.stderr
    assert (out / "my-notes.txt").read_text() == "precious"
    (out / "my-notes.txt").unlink()
    assert subprocess.run(["dvc", "status", "-q"], cwd=project).returncode == 0
    # back to an older recorded version (what `git checkout` of params.yaml and dvc.lock does): not the user's
    before = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    assert pipeline(project, "run", "--no-prefect", "-S", "prepare.shard_size=9").returncode == 0
    for name, data in before.items():
        (project / name).write_bytes(data)
    proc = pipeline(project, "run", "--no-prefect")
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(["dvc", "status", "-q"], cwd=project).returncode == 0


def test_sigterm_undoes_a_run_like_ctrl_c(project):
    assert pipeline(project, "run", "--no-prefect").returncode == 0  # recorded outputs to undo to, run alone too
    params = (project / "params.yaml").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--no-prefect", "-S", "prepare.shard_size=7"],
                            cwd=project, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for _ in range(600):  # until the edit is in params.yaml
        if (project / "params.yaml").read_bytes() != params:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    assert (project / "params.yaml").read_bytes() == params
    assert subprocess.run(["dvc", "status", "-q"], cwd=project).returncode == 0  # outputs as dvc.lock records


def test_a_failed_first_run_leaves_the_project_as_it_found_it(tmp_path):
    a = make_idx_dataset(tmp_path / "src_a", n_train=40, n_val=10)
    (tmp_path / "src_b").mkdir()  # no images: prepare@b fails after prepare@a made and recorded its output
    project = make_project(tmp_path / "p", tiny_params({"a": a, "b": tmp_path / "src_b"}), stages=("prepare",))
    proc = pipeline(project, "run", "--no-prefect")
    assert proc.returncode == 2 and "prepare@b" in proc.stderr.splitlines()[-1], proc.stderr
    assert not (project / "dvc.lock").exists() and not (project / "data" / "prepared" / "a").exists()
    text = (project / "params.yaml").read_text().replace(str(tmp_path / "src_b"), str(a))  # b fixed
    # prepare@a comes back from DVC's run cache, not from a new run
    (project / "params.yaml").write_text(text)
    proc = pipeline(project, "run", "--no-prefect")
    assert proc.returncode == 0 and "Stage 'prepare@a' is cached - skipping run" in proc.stdout, proc.stdout


def test_a_metrics_file_never_exists_without_its_run_log_as_new(tmp_path, monkeypatch):
    """write_metrics, watched at every rename: whenever the metrics file is in place, its run log is beside it and no
    older (what the guard reads as "this run's"). Writing the metrics first left a first run, killed between the two
    renames, with a metrics file the next run refused (no run log, not in DVC's cache)."""
    from helpers import check_never_newer_than_run_log
    from pipeline.runlog import run_log_path, write_metrics

    metrics = tmp_path / "metrics" / "train.json"
    renamed = check_never_newer_than_run_log(monkeypatch, metrics, run_log_path(metrics))
    write_metrics(metrics, {"psnr": 24.5}, {"seconds": 3})
    write_metrics(metrics, {"psnr": 25.0}, {"seconds": 4})  # a second run over the first
    assert renamed == [str(run_log_path(metrics)), str(metrics)] * 2
    assert metrics.stat().st_mtime_ns == run_log_path(metrics).stat().st_mtime_ns


def test_the_planned_graph_is_dvcs_own_for_the_real_pipeline_and_a_second_dataset(tmp_path):
    """A run selects a stage's upstream from dvc.yaml under its params before they are written (a preset's new dataset
    is not DVC's yet): for the project's own dvc.yaml and params.yaml with a second dataset, the stages each stage
    depends on, directly or not, are those `dvc dag` gives once the params are written."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "pets").mkdir()
    params["datasets"]["pets"] = {**params["datasets"]["fashion_mnist"], "path": str(tmp_path / "pets")}
    root = make_project(tmp_path / "p", yaml.safe_dump(params))
    direct = out_guard.planned_parents(root, params)

    def ancestors(stage: str) -> set[str]:
        found = set(direct.get(stage, ()))
        for parent in direct.get(stage, ()):
            found |= ancestors(parent)
        return found

    dvcs = dvc_graph.upstream_stages(root)
    assert "tokenize@pets" in direct and direct["tokenize@pets"] == {"prepare@pets", "train_vqgan"}
    assert {stage: ancestors(stage) for stage in direct if ancestors(stage)} == dvcs
    # a dep that holds another stage's output (a folder around it) links them too, as in DVC's graph
    (root / "dvc.yaml").write_text("stages:\n"
                                   "  a:\n    cmd: python -m stages.prepare\n    outs: [data/x/a]\n"
                                   "  b:\n    cmd: python -m stages.fid_ref\n    deps: [data/x]\n    outs: [data/y]\n")
    assert out_guard.planned_parents(root, params) == {"b": {"a"}}
    assert dvc_graph.upstream_stages(root) == {"b": {"a"}}
