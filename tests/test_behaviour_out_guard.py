"""The out guard's details, each a case where a plausible slip lets DVC delete a user's files or misleads the user:
foreach copies named and resolved as DVC does, git-tracked paths however written, markers that are not UTF-8,
timestamps that tie, which run logs vouch for which files, which inputs count as stale, and what `dvc status` says
when it fails. Written from mutation testing (docs/mutation.md)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline import out_guard
from pipeline.errors import UserError

T0 = 10**18  # a fixed time in ns: ties and orders are set, never left to the file system's clock


def write(path: Path, text: str = "x", ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if ns is not None:
        os.utime(path, ns=(ns, ns))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty DVC cache, handed out only for this project's root (a guard asking about another root is a bug)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setattr(out_guard, "_cache_dir", lambda root: folder if Path(root) == tmp_path else None)
    return folder


def refusal(root: Path, params: dict, source: str = "params.yaml") -> str:
    with pytest.raises(UserError) as err:
        out_guard.check_outputs(root, params, source)
    return str(err.value)


FOREACH_YAML = """stages:
  own:
    cmd: ./mine.sh
    outs:
      - mine
  lit:
    foreach: [fast, slow]
    do:
      cmd: python -m stages.x ${item}
      outs:
        - out/${root}/${item}
  ld:
    foreach:
      - {p: a}
      - {p: b}
    do:
      cmd: python -m stages.y
      outs:
        - out/${item.p}:
            cache: false
  dd:
    foreach: ${sets}
    do:
      cmd: python -m stages.z
      outs:
        - z/${item}
  flags:
    foreach: [true, 3]
    do:
      cmd: python -m stages.w
      outs:
        - w/${item}
  named:
    foreach: ${datasets}
    do:
      cmd: python -m stages.v
      deps:
        - ${item.path}
      outs:
        - v/${key}/${root}
  gone:
    foreach: ${nothere}
    do:
      cmd: python -m stages.u
      outs:
        - u/${key}
"""


def test_foreach_copies_and_their_paths_resolve_as_dvc_resolves_them(tmp_path):
    """What `dvc stage list` printed for this dvc.yaml (DVC 3.67): a plain list keys each copy by its value (true as
    DVC writes it), a list of dicts by its index, a params dict by its keys; a one-part reference inside a copy is a
    params value, not the copy's key; an out written as a dict (`path: {cache: false}`) is its path; a user's own
    stage, first here, stops nothing after it. A foreach over a value params lack (`gone`, which `dvc stage list`
    was run without) makes no copies here; DVC stops at it with its own error."""
    (tmp_path / "dvc.yaml").write_text(FOREACH_YAML)
    params = {"root": "r", "sets": ["u", "v"], "datasets": {"Mx": {"path": "src/m"}}}
    assert out_guard.planned_outputs(tmp_path, params) == [
        ("lit@fast", "lit", "out/r/fast", ["root"]), ("lit@slow", "lit", "out/r/slow", ["root"]),
        ("ld@0", "ld", "out/a", []), ("ld@1", "ld", "out/b", []),
        ("dd@u", "dd", "z/u", ["sets.<name>"]), ("dd@v", "dd", "z/v", ["sets.<name>"]),
        ("flags@true", "flags", "w/true", []), ("flags@3", "flags", "w/3", []),
        ("named@Mx", "named", "v/Mx/r", ["root"])]
    assert out_guard.planned_outputs(tmp_path, params, ("deps",)) == [
        ("named@Mx", "named", "src/m", ["datasets.<name>.path"])]
    assert out_guard.planned_outputs(tmp_path / "elsewhere", params) == []  # no dvc.yaml: nothing planned


def test_a_path_git_tracks_is_refused_however_it_is_written(tmp_path, cache):
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python -m stages.train\n    outs:\n"
                                       "      - ${train.out_dir}\n    metrics:\n      - ${train.metrics}\n")
    write(tmp_path / "docs" / "a b.md")
    write(tmp_path / "docs" / ".tokenmill-stage", "train")  # the stage's own marker: only git makes it not ours
    write(tmp_path / "-d" / "a.md")  # a name git would read as an option
    write(tmp_path / "-d" / ".tokenmill-stage", "train")
    for name in ("notes.json", "notes.run.json", "free.json", "free.run.json"):  # each would pass as metrics
        write(tmp_path / name, "{}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "--", "docs/a b.md", "notes.json", "-d/a.md"], cwd=tmp_path, check=True)
    for out_dir, metrics, named in (("docs/", "m.json", "docs/ (train.out_dir)"),
                                    ("-d", "m.json", "-d (train.out_dir)"),
                                    ("model", "notes.json", "notes.json (train.metrics)"),
                                    ("model", "docs/a b.md", "docs/a b.md (train.metrics)")):
        text = refusal(tmp_path, {"train": {"out_dir": out_dir, "metrics": metrics}})
        assert text.startswith(f"params.yaml: {named} exists and is tracked by git, not an output"), text
    # an untracked file in a repository that tracks others is judged on its own
    out_guard.check_outputs(tmp_path, {"train": {"out_dir": "model", "metrics": "free.json"}}, "params.yaml")


LITERAL_YAML = """stages:
  make:
    cmd: python -m stages.make
    outs:
      - made
  train:
    cmd: python -m stages.train
    outs:
      - ${train.root}/${train.name}
    plots:
      - ${train.plots}
    metrics:
      - ${train.metrics}
  evaluate:
    cmd: python -m stages.evaluate
    metrics:
      - ${evaluate.metrics}
"""


def literal_params(**train) -> dict:
    return {"train": {"root": "data", "name": "model", "plots": "p.tsv", "metrics": "m.json", **train},
            "evaluate": {"metrics": "e.json"}}


def test_refusals_name_the_path_and_every_key_that_set_it(tmp_path, cache):
    (tmp_path / "dvc.yaml").write_text(LITERAL_YAML)
    write(tmp_path / "made" / "notes.txt")  # a literal out path: no key to name
    assert refusal(tmp_path, literal_params()).startswith(
        "params.yaml: made exists and is a folder without a .tokenmill-stage marker, not an output of stage make;")
    (tmp_path / "made" / "notes.txt").unlink()
    write(tmp_path / "data" / "model" / "w.bin")
    assert refusal(tmp_path, literal_params(), "run.yaml").startswith(
        "run.yaml: data/model (train.root, train.name) exists and is a folder without")


def test_a_marker_that_is_not_utf8_is_another_stages_folder_not_a_crash(tmp_path, cache):
    (tmp_path / "dvc.yaml").write_text(LITERAL_YAML)
    write(tmp_path / "data" / "model" / "w.bin")
    (tmp_path / "data" / "model" / ".tokenmill-stage").write_bytes(b"tr\xffin\n")
    assert "data/model (train.root, train.name) exists and is a folder written by 'tr\ufffdin', not an output" in (
        refusal(tmp_path, literal_params()))


def test_run_logs_vouch_only_for_files_of_their_own_stage_up_to_the_same_instant(tmp_path, cache):
    """A plots file is the run's when it is no newer than the `.run.json` its stage's metrics got, written last:
    equal times count (coarse file system clocks give ties); another stage's run log vouches for nothing."""
    (tmp_path / "dvc.yaml").write_text(LITERAL_YAML)
    write(tmp_path / "e.json", "{}", T0)
    write(tmp_path / "e.run.json", "{}", T0 + 100)  # evaluate's run, later than the plots file below
    write(tmp_path / "p.tsv", "step\n", T0 + 5)
    assert "p.tsv (train.plots) exists and is a file DVC's cache does not hold" in refusal(tmp_path, literal_params())
    write(tmp_path / "m.json", "{}", T0 + 5)
    write(tmp_path / "m.run.json", "{}", T0 + 5)  # train's own run, the same instant as its plots
    out_guard.check_outputs(tmp_path, literal_params(), "params.yaml")


def test_overlap_and_stale_input_refusals_name_the_source_they_were_given(tmp_path, cache):
    (tmp_path / "dvc.yaml").write_text(LITERAL_YAML)
    assert refusal(tmp_path, literal_params(name="../made"), "run.yaml").startswith(
        "run.yaml: made of stage make and data/../made (train.root, train.name) of stage train are the same path")
    assert refusal(tmp_path, {**literal_params(), "evaluate": {"metrics": "/"}}).startswith(  # the root holds all
        "params.yaml: made of stage make and / (evaluate.metrics) of stage evaluate are the same path")
    (tmp_path / "dvc.yaml").write_text(STALE_YAML)
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"sample": {"outs": [{"path": "data/s/old"}]}}}))
    text = refusal(tmp_path, stale_params(samples_dir="data/s/old"), "run.yaml")
    assert text.startswith("run.yaml: stage evaluate would read data/s/old (evaluate.samples_dir)"), text


def test_a_recorded_output_is_passed_and_the_next_path_still_judged(tmp_path, cache):
    (tmp_path / "dvc.yaml").write_text(LITERAL_YAML)
    write(tmp_path / "made" / "w.bin")
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"make": {"outs": [{"path": "made"}]}}}))
    write(tmp_path / "data" / "model" / "notes.txt")
    assert "data/model (train.root, train.name) exists and is a folder without" in refusal(tmp_path, literal_params())


def test_a_foreach_copys_recorded_file_is_looked_up_under_the_copys_name(tmp_path, cache):
    """dvc.lock records a foreach copy's outputs under `tok@a`, not `tok`: a file it recorded passes even with no
    cache copy and no run log beside it (an uncached metrics file DVC made); one recorded for another copy does
    not vouch for it."""
    (tmp_path / "dvc.yaml").write_text("stages:\n  tok:\n    foreach: ${datasets}\n    do:\n"
                                       "      cmd: python -m stages.tok\n      outs:\n        - m/${key}.json:\n"
                                       "            cache: false\n")
    write(tmp_path / "m" / "a.json", "{}")
    params = {"datasets": {"a": {"path": "src/a"}, "b": {"path": "src/b"}}}
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"tok@a": {"outs": [{"path": "m/a.json"}]}}}))
    out_guard.check_outputs(tmp_path, params, "params.yaml")
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"tok@b": {"outs": [{"path": "m/a.json"}]}}}))
    assert "m/a.json exists and is a file DVC" in refusal(tmp_path, params)


STALE_YAML = """stages:
  prep:
    foreach: ${datasets}
    do:
      cmd: python -m stages.prep
      deps:
        - ${item.path}
      outs:
        - data/p/${key}
  sample:
    cmd: python -m stages.sample
    outs:
      - ${sample.out_dir}
    metrics:
      - ${sample.metrics}
  evaluate:
    cmd: python -m stages.evaluate
    deps:
      - ${evaluate.samples_dir}
"""


def stale_params(**evaluate) -> dict:
    return {"datasets": {"a": {"path": "data/p/old/x"}, "b": {"path": "src/b"}},
            "sample": {"out_dir": "data/s/new", "metrics": "data/m.json"},
            "evaluate": {"samples_dir": "data/s/new", **evaluate}}


def stale_refusal(root: Path, **evaluate) -> str:
    with pytest.raises(UserError) as err:
        out_guard.check_stale_inputs(root, stale_params(**evaluate), "params.yaml")
    return str(err.value)


def test_stale_inputs_name_the_writer_and_what_it_writes_now_and_skip_dataset_sources(tmp_path):
    """A dataset source inside an old output is the user's choice (add-dataset from old samples), checked no further;
    the stage input after it still is. The writer's name is the foreach copy's; what its stage writes now is its
    outs, not its metrics; a stage gone from dvc.yaml writes nothing."""
    (tmp_path / "dvc.yaml").write_text(STALE_YAML)
    write(tmp_path / "dvc.lock", json.dumps({"stages": {
        "prep@old": {"outs": [{"path": "data/p/old"}]}, "sample": {"outs": [{"path": "data/s/old"}]},
        "gone": {"outs": [{"path": "data/g"}]}}}))
    out_guard.check_stale_inputs(tmp_path, stale_params(), "params.yaml")
    for samples_dir, writer, now in (("data/p/old", "prep@old", "prep now writes data/p/a, data/p/b"),
                                     ("data/s/old", "sample", "sample now writes data/s/new"),
                                     ("data/g/x", "gone", "gone now writes nothing")):
        assert stale_refusal(tmp_path, samples_dir=samples_dir) == (
            f"params.yaml: stage evaluate would read {samples_dir} (evaluate.samples_dir), which dvc.lock records as "
            f"an output of {writer} but no stage makes under these params ({now}); point it at the output it should "
            f"read")


def test_equal_times_are_what_the_stage_wrote(tmp_path):
    out = tmp_path / "out"
    write(out / "a.bin", "a", T0)
    write(out / ".tokenmill-stage", "s", T0)  # written in the same clock tick as the last file
    assert not out_guard.changed_after_written(out)
    metrics = write(tmp_path / "m.json", "{}", T0)
    write(tmp_path / "m.run.json", "{}", T0)
    assert not out_guard.changed_after_written(metrics)


def fake_status(monkeypatch, root: Path, status, returncode: int = 0, stdout: str | None = None) -> None:
    def run(cmd, **kw):
        # the guard parses DVC's text output, and only of this project
        assert kw == {"cwd": root, "capture_output": True, "text": True}, kw
        return subprocess.CompletedProcess(cmd, returncode, json.dumps(status) if stdout is None else stdout, "")
    monkeypatch.setattr(out_guard.subprocess, "run", run)


def unrecorded_refusal(root: Path) -> str:
    with pytest.raises(UserError) as err:
        out_guard.check_unrecorded_changes(root)
    return str(err.value)


def test_modified_outputs_are_judged_one_by_one_whatever_else_dvc_status_lists(tmp_path, cache, monkeypatch):
    """Entries `dvc status --json` writes as plain strings ("always changed"), deleted outputs, a stage's own
    rewrite (its marker, nothing newer) listed first: none stops the check before the output the user changed."""
    write(tmp_path / "own" / "w.bin", "w", T0)
    write(tmp_path / "own" / ".tokenmill-stage", "s", T0 + 1)  # the stage's name without the copy's key
    write(tmp_path / "m.json", "user edit")  # a file output: its bytes are in no cache
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"s@a": {"outs": [
        {"path": "own"}, {"path": "gone"}, {"path": "m.json"}]}}}))
    status = {"u": ["always changed"], "s@a": ["changed checksum", {"changed outs": {
        "gone": "deleted", "own": "modified", "m.json": "modified"}}]}
    fake_status(monkeypatch, tmp_path, status)
    assert unrecorded_refusal(tmp_path).startswith(
        "dvc.lock: m.json, an output of stage s@a, holds m.json, which DVC's cache does not hold;")
    (tmp_path / "m.json").unlink()
    (tmp_path / "own" / ".tokenmill-stage").write_bytes(b"s\xff")  # not UTF-8: not the stage's, and no crash
    os.utime(tmp_path / "own" / ".tokenmill-stage", ns=(T0 + 1, T0 + 1))
    assert "own, an output of stage s@a, holds own/" in unrecorded_refusal(tmp_path)


def test_a_modified_folder_without_a_marker_names_its_uncached_file(tmp_path, cache, monkeypatch):
    write(tmp_path / "out" / "a.bin", "user's")
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"s": {"outs": [{"path": "out"}]}}}))
    fake_status(monkeypatch, tmp_path, {"s": [{"changed outs": {"out": "modified"}}]})
    assert unrecorded_refusal(tmp_path).startswith("dvc.lock: out, an output of stage s, holds out/a.bin, which")


@pytest.mark.parametrize("returncode, stdout, said", [
    (1, "", "ERROR: unexpected error - Expecting value: line 1 column 1"), (0, "not json", "not json"),
    (0, "[]", "[]")])
def test_dvc_status_that_fails_stops_the_run_naming_dvcs_error(tmp_path, cache, monkeypatch, returncode, stdout, said):
    """Unknown is not unchanged: a scripts/run.sh that went on after a failed `dvc status` (a corrupt table of
    running stages) let `dvc repro` delete a file of the user's in an output."""
    write(tmp_path / "m.json", "user edit")
    write(tmp_path / "dvc.lock", json.dumps({"stages": {"s": {"outs": [{"path": "m.json"}]}}}))

    def run(cmd, **kw):
        err = "Traceback: x\nERROR: unexpected error - Expecting value: line 1 column 1\n" if returncode else ""
        return subprocess.CompletedProcess(cmd, returncode, stdout, err)
    monkeypatch.setattr(out_guard.subprocess, "run", run)
    assert unrecorded_refusal(tmp_path) == (
        f"dvc.lock: `dvc status --json` failed ({said}), so whether a recorded output holds files of yours is "
        f"unknown; nothing was run")
    assert (tmp_path / "m.json").read_text() == "user edit"


def test_dvc_status_kept_out_by_another_dvc_command_says_so(tmp_path, cache, monkeypatch):
    write(tmp_path / "dvc.lock", json.dumps({"stages": {}}))
    monkeypatch.setattr(out_guard.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated"))
    assert unrecorded_refusal(tmp_path) == (f"a dvc command is running in {tmp_path}; nothing was run (run again when "
                                            f"it has finished)")


def test_the_cache_is_where_dvc_keeps_a_files_bytes(tmp_path):
    """The guard finds a file's bytes by DVC 3's layout (md5 of the content, files/md5/<2>/<30> under the cache
    folder DVC reports); a DVC that stored them elsewhere would make every output look like the user's."""
    run = dict(cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    subprocess.run(["dvc", "init", "--no-scm", "-q"], **run)
    kept, other = write(tmp_path / "kept.bin", "stored"), write(tmp_path / "other.bin", "never added")
    subprocess.run(["dvc", "add", "-q", "kept.bin"], **run)
    cache = out_guard._cache_dir(tmp_path)
    assert cache.is_relative_to(tmp_path / ".dvc" / "cache")
    assert out_guard._in_cache(kept, cache) and not out_guard._in_cache(other, cache)


def test_each_plots_file_of_the_real_pipeline_is_vouched_for_by_its_stage_s_run_log(tmp_path, cache):
    """The project's own dvc.yaml and params.yaml: every plots file that no run recorded yet (a kill after the stage
    wrote it, before DVC recorded it) is the run's when its stage's run log is as new, however the metrics path
    is built (tokenize's comes from `tokenize.metrics_dir`, not a key named `metrics`: scripts/kill_resume.py
    found its code-usage plot refused). Without the run log it is refused."""
    import shutil

    from helpers import ROOT
    from pipeline.config import load_params

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = load_params(ROOT / "params.yaml")
    metrics = {s: p for s, _, p, _ in out_guard.planned_outputs(tmp_path, params, ("metrics",))}
    plots = [(s, p) for s, _, p, _ in out_guard.planned_outputs(tmp_path, params, ("plots",))]
    assert {s.split("@")[0] for s, _ in plots} == {"train_vqgan", "tokenize", "train_transformer"}
    for stage, plot in plots:
        write(tmp_path / plot, "plot", T0 + 5)
        run_log = (tmp_path / metrics[stage]).with_name(f"{Path(metrics[stage]).stem}.run.json")
        write(tmp_path / metrics[stage], "{}", T0 + 5)
        write(run_log, "{}", T0 + 5)
        out_guard.check_outputs(tmp_path, params, "params.yaml")
        (tmp_path / metrics[stage]).unlink()  # DVC removed the metrics file, then was killed: still the run's
        out_guard.check_outputs(tmp_path, params, "params.yaml")
        run_log.unlink()
        assert f"{plot} " in refusal(tmp_path, params) and "a file DVC's cache does not hold" in refusal(
            tmp_path, params)
        write(run_log, "{}", T0 + 5)
