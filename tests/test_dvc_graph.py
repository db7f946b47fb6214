"""pipeline/dvc_graph.py on its own, without running dvc: which stages a run selects and reaches, how DVC's answers
(`dvc stage list`, `dvc dag --dot`, `dvc status --json`) are read, and the one-line reasons it gives."""
from __future__ import annotations

import json
import subprocess

import pytest

from pipeline import dvc_graph
from pipeline.errors import UserError

NAMES = ["prepare@a", "prepare@b", "seed", "train", "tokenize@a", "tokenize@b", "report"]

# prepare per dataset -> train on one of them (and a seed that reads nothing) -> tokenize every dataset with the
# model -> a report over all tokens
DVC_YAML = """stages:
  prepare:
    foreach: ${datasets}
    do:
      cmd: python -m stages.prepare --dataset ${key}
      deps:
        - src/${key}
      outs:
        - data/prepared/${key}
  seed:
    cmd: python -m stages.seed
    outs:
      - data/seed
  train:
    cmd: python -m stages.train
    deps:
      - data/prepared/${train.dataset}
      - data/seed
    outs:
      - data/model
  tokenize:
    foreach: ${datasets}
    do:
      cmd: python -m stages.tokenize --dataset ${key}
      deps:
        - data/prepared/${key}
        - data/model
      outs:
        - data/tokens/${key}
  report:
    cmd: python -m stages.report
    deps:
      - data/tokens
    outs:
      - report.md
"""
PARAMS = {"datasets": {"a": {}, "b": {}}, "train": {"dataset": "a"}}


def fake_run(monkeypatch, stdout: str = "", code: int = 0, stderr: str = "", root=None) -> list[list[str]]:
    """dvc answering `stdout` (or, given a dict, the answer for each subcommand); run in `root`, its output read as
    text (a bytes answer would not parse)."""
    calls: list[list[str]] = []

    def run(cmd, **kw):
        assert kw["cwd"] == root and kw["capture_output"] is True and kw["text"] is True, kw
        calls.append(cmd)
        out = stdout[cmd[1]] if isinstance(stdout, dict) else stdout
        return subprocess.CompletedProcess(cmd, code, out, stderr)

    monkeypatch.setattr(dvc_graph.subprocess, "run", run)
    return calls


def test_a_base_name_names_every_item_and_a_full_name_only_itself():
    assert dvc_graph.names_stage("prepare", "prepare@a") and dvc_graph.names_stage("prepare@a", "prepare@a")
    assert dvc_graph.names_stage("train", "train")
    assert not dvc_graph.names_stage("prepare@a", "prepare@ab")
    assert not dvc_graph.names_stage("prep", "prepare@a")
    assert not dvc_graph.names_stage("a", "prepare@a")  # the item key alone is no name
    assert not dvc_graph.names_stage("prepare@a", "prepare")


def test_select_keeps_dvc_order_and_names_the_first_unknown_stage():
    assert dvc_graph.select(NAMES, None) == NAMES and dvc_graph.select(NAMES, []) == NAMES
    assert dvc_graph.select(NAMES, ["report", "prepare"]) == ["prepare@a", "prepare@b", "report"]
    assert dvc_graph.select(NAMES, ["tokenize@b", "tokenize@b"]) == ["tokenize@b"]
    with pytest.raises(UserError) as err:
        dvc_graph.select(NAMES, ["train", "tokenise", "evaluate"])
    assert str(err.value) == ("unknown stage 'tokenise' (dvc.yaml has: prepare@a, prepare@b, seed, train, "
                              "tokenize@a, tokenize@b, report)")


def test_a_run_reaches_its_targets_and_everything_upstream_of_them(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert dvc_graph.stages_in_run(tmp_path, PARAMS) == set(NAMES)
    assert dvc_graph.stages_in_run(tmp_path, PARAMS, ["tokenize@b"]) == {"tokenize@b", "prepare@b", "train", "seed",
                                                                          "prepare@a"}  # train reads prepare@a
    assert dvc_graph.stages_in_run(tmp_path, PARAMS, ["tokenize@b"], with_deps=False) == {"tokenize@b"}
    assert dvc_graph.stages_in_run(tmp_path, PARAMS, ["train"]) == {"train", "prepare@a", "seed"}
    assert dvc_graph.stages_in_run(tmp_path, PARAMS, ["report"]) == set(NAMES)  # (through two levels)
    assert dvc_graph.stages_in_run(tmp_path, {**PARAMS, "train": {"dataset": "b"}}, ["train"]) == {
        "train", "prepare@b", "seed"}
    assert dvc_graph.stages_in_run(tmp_path, PARAMS, ["seed"]) == {"seed"}  # (a stage that reads nothing)
    # a dataset the run's params add is reachable before DVC knows it
    more = {**PARAMS, "datasets": {"a": {}, "b": {}, "c": {}}}
    assert dvc_graph.stages_in_run(tmp_path, more, ["tokenize@c"], with_deps=False) == {"tokenize@c"}
    assert dvc_graph.selectable_stages(tmp_path, more, NAMES) == NAMES + ["prepare@c", "tokenize@c"]
    assert dvc_graph.selectable_stages(tmp_path, PARAMS, ["report", "train"]) == [
        "report", "train", "prepare@a", "prepare@b", "seed", "tokenize@a", "tokenize@b"]
    fake_run(monkeypatch, "train\nprepare@a\n", root=tmp_path)  # DVC's list, asked when not given
    assert dvc_graph.selectable_stages(tmp_path, more) == [
        "train", "prepare@a", "prepare@b", "prepare@c", "seed", "tokenize@a", "tokenize@b", "tokenize@c", "report"]
    with pytest.raises(UserError, match="unknown stage 'tokenize@d'"):
        dvc_graph.stages_in_run(tmp_path, more, ["tokenize@d"])


def test_a_missing_dependency_says_which_stage_or_which_param_to_fix(tmp_path):
    assert dvc_graph.missing_dependency("data/prepared/a", tmp_path) == (
        "its dependency data/prepared/a does not exist (run the stage that makes it first)")
    assert dvc_graph.missing_dependency(str(tmp_path / "data" / "x"), tmp_path) == (
        "its dependency data/x does not exist (run the stage that makes it first)")
    assert dvc_graph.missing_dependency("/datasets/fmnist", tmp_path) == (
        "its dependency /datasets/fmnist does not exist (a path params.yaml names: check it)")
    assert dvc_graph.missing_dependency("../elsewhere", tmp_path).endswith("(a path params.yaml names: check it)")


def test_stage_names_read_dvc_stage_list(tmp_path, monkeypatch):
    calls = fake_run(monkeypatch, root=tmp_path, stdout="prepare@a  Outputs data/prepared/a\n\n  \ntrain\n")
    assert dvc_graph.stage_names(tmp_path) == ["prepare@a", "train"]
    assert calls == [["dvc", "stage", "list", "--name-only"]]
    fake_run(monkeypatch, "", code=1, stderr="ERROR: bad dvc.yaml\n", root=tmp_path)
    with pytest.raises(RuntimeError, match=r"^dvc stage list --name-only failed: ERROR: bad dvc.yaml$"):
        dvc_graph.stage_names(tmp_path)
    fake_run(monkeypatch, "out only\n", code=1, root=tmp_path)
    with pytest.raises(RuntimeError, match="failed: out only$"):
        dvc_graph.stage_names(tmp_path)


def test_upstream_stages_are_every_ancestor_in_dvc_dag(tmp_path, monkeypatch):
    dot = ('strict digraph  {\n"prepare@a";\n"train";\n"prepare@a" -> "train";\n"prepare@a" -> "tokenize@a";\n'
           '"train" -> "tokenize@a";\n  "tokenize@a" -> "report";\n"x" -- "y";\n}\n')
    calls = fake_run(monkeypatch, dot, root=tmp_path)
    assert dvc_graph.upstream_stages(tmp_path) == {"train": {"prepare@a"}, "tokenize@a": {"prepare@a", "train"},
                                                   "report": {"tokenize@a", "train", "prepare@a"}}
    assert calls == [["dvc", "dag", "--dot"]]
    cyclic = '"a" -> "b";\n"b" -> "a";\n'  # (DVC refuses a cycle; the walk must still end)
    fake_run(monkeypatch, cyclic, root=tmp_path)
    assert dvc_graph.upstream_stages(tmp_path) == {"a": {"a", "b"}, "b": {"a", "b"}}


def test_changed_stages_read_dvc_status_and_name_its_last_line_when_it_fails(tmp_path, monkeypatch):
    calls = fake_run(monkeypatch, json.dumps({"train": ["changed deps"], "tokenize@a": []}), root=tmp_path)
    assert dvc_graph.changed_stages(tmp_path) == {"train", "tokenize@a"}
    assert calls == [["dvc", "status", "--json"]]
    fake_run(monkeypatch, "", root=tmp_path)
    assert dvc_graph.changed_stages(tmp_path) == set()
    for stdout, code, stderr, said in (
            ("{}", 1, "Running\nERROR: Unable to acquire lock\n", "dvc status: ERROR: Unable to acquire lock"),
            ("[]", 0, "", "dvc status: no output"), ("not json", 0, "", "dvc status: no output"),
            ("{}", 1, "x" * 300, "dvc status: " + "x" * 160)):
        fake_run(monkeypatch, stdout, code, stderr, tmp_path)
        with pytest.raises(RuntimeError) as err:
            dvc_graph.changed_stages(tmp_path)
        assert str(err.value) == said


def test_pipeline_stages_are_the_modules_dvc_yaml_runs_in_pipeline_order(tmp_path):
    assert dvc_graph.pipeline_stages(tmp_path) == list(dvc_graph.STAGE_MODULES)  # no dvc.yaml: all
    (tmp_path / "dvc.yaml").write_text("stages:\n  e:\n    cmd: python -m stages.evaluate\n  mine:\n    cmd: ls\n"
                                       "  p:\n    foreach: [a]\n    do:\n      cmd: python -m stages.prepare ${item}\n")
    assert dvc_graph.pipeline_stages(tmp_path) == ["prepare", "evaluate"]


def test_an_empty_dvc_lock_is_blamed_only_when_dvc_failed(tmp_path, monkeypatch):
    (tmp_path / "dvc.lock").write_text("")
    fake_run(monkeypatch, "a\n", root=tmp_path)
    assert dvc_graph.dvc(["stage", "list"], tmp_path) == "a\n"  # (a dvc that has just begun the stage's record)
    fake_run(monkeypatch, "", code=1, stderr="ERROR: schema", root=tmp_path)
    with pytest.raises(UserError, match="dvc.lock is empty"):
        dvc_graph.dvc(["stage", "list"], tmp_path)


def test_the_stale_note_asks_dvc_about_this_project_and_words_one_or_several(tmp_path, monkeypatch):
    dot = '"prepare@a" -> "train";\n"train" -> "report";\n"seed" -> "train";\n'
    status = {"prepare@a": ["changed deps"]}
    calls = fake_run(monkeypatch, {"status": json.dumps(status), "dag": dot}, root=tmp_path)
    assert dvc_graph.stale_upstream_note(tmp_path, ["train", "report"]) == (
        "prepare@a is out of date and not selected: train, report will read its outputs as they are (select it too, "
        "or run the whole pipeline)")
    assert calls == [["dvc", "status", "--json"], ["dvc", "dag", "--dot"]]
    status["seed"] = ["changed outs"]
    fake_run(monkeypatch, {"status": json.dumps(status), "dag": dot}, root=tmp_path)
    assert dvc_graph.stale_upstream_note(tmp_path, ["report"]) == (
        "prepare@a, seed are out of date and not selected: report will read their outputs as they are (select them "
        "too, or run the whole pipeline)")
