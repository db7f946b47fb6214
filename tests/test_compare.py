"""`python -m pipeline compare` on the JSON `dvc exp show --json` gives (DVC 3's layout): which runs become rows,
which params become columns, where each run's metrics are found, and when a FID is not comparable."""
from __future__ import annotations

import pytest

from pipeline import compare as C
from pipeline.errors import UserError


def run(rev, params, metrics, name=None, when="2026-12-06T21:40:00", experiments=()):
    return {"rev": rev, "name": name, "experiments": list(experiments),
            "data": {"rev": rev, "timestamp": when, "params": {"params.yaml": {"data": params}},
                     "metrics": {path: {"data": m} for path, m in metrics.items()}}}


def params(steps=1000, n=1000, evaluate_metrics="data/metrics/evaluate.json", path="/data/fm"):
    return {"datasets": {"fm": {"path": path}}, "train_transformer": {"steps": steps},
            "sample": {"n": n}, "evaluate": {"metrics": evaluate_metrics},
            "eval_vqgan": {"metrics": "data/metrics/eval_vqgan.json"}}


def test_rows_columns_and_each_runs_own_metrics_path():
    exp = run("e1", params(steps=2000, evaluate_metrics="data/metrics/ev2.json"),
              {"data/metrics/ev2.json": {"fid": 35.04, "recall": 0.44, "protocol": "p1"}}, name="exp-big")
    shown = [run("workspace", params(path="/elsewhere"), {"data/metrics/evaluate.json": {"fid": 40.6412, "recall": 0.42,
                                                                                        "protocol": "p1"}},
                 when=None),
             run("abc123", params(), {"data/metrics/evaluate.json": {"fid": 40.6412, "protocol": "p1"},
                                      "data/metrics/eval_vqgan.json": {"fid": 22.98, "protocol": "r"}},
                 name="main", experiments=[{"name": "exp-big", "revs": [exp]}])]
    columns, rows, notes = C.rows_of(shown)
    # params that differ between runs, a dataset's path left out (it differs per machine), then the metrics
    assert columns == ["run", "when", "evaluate.metrics", "train_transformer.steps", "gFID", "rFID", "PSNR",
                       "recall", "bits/token"]
    assert [r["run"] for r in rows] == ["workspace", "main", "exp-big"]
    assert rows[0]["when"] == "now" and rows[1]["when"] == "2026-12-06 21:40"
    assert [r["train_transformer.steps"] for r in rows] == ["1000", "1000", "2000"]
    assert [r["gFID"] for r in rows] == ["40.64", "40.64", "35.04"]  # exp-big's from its own metrics path
    assert [r["rFID"] for r in rows] == ["-", "22.98", "-"] and [r["recall"] for r in rows] == ["0.42", "-", "0.44"]
    assert notes == []


def test_a_fid_under_another_protocol_is_not_comparable():
    shown = [run("workspace", params(), {"data/metrics/evaluate.json": {"fid": 40.6, "protocol": "n1000-train"}}),
             run("abc", params(n=500), {"data/metrics/evaluate.json": {"fid": 52.0, "protocol": "n500-train"}})]
    _, rows, notes = C.rows_of(shown)
    assert [r["gFID"] for r in rows] == ["40.6", "n/c"]
    assert notes == ["gFID of abc: protocol n500-train, not n1000-train as in the first row (other sample counts, "
                     "reference or network): not comparable"]
    text = C.table(*C.rows_of(shown)[:2])
    assert text.splitlines()[0].split() == ["run", "when", "sample.n", "gFID", "rFID", "PSNR", "recall", "bits/token"]


def test_dataset_settings_that_differ_are_shown_a_path_or_a_datasets_entries_are_not():
    """An experiment at another resolution shows it; a path differs per machine and is left out; a dataset added
    in one run (add-dataset) is one column saying which runs have it, not one per setting of its entry."""
    base = params()
    other = params(path="/elsewhere")
    other["datasets"]["fm"]["resolution"] = 28
    other["datasets"]["pets"] = {"path": "/p", "resolution": 32, "channels": 3}
    base["datasets"]["fm"]["resolution"] = 16
    shown = [run("workspace", other, {}), run("abc", base, {})]
    columns, rows, _ = C.rows_of(shown)
    assert columns == ["run", "when", "datasets.fm.resolution", "datasets.pets", "gFID", "rFID", "PSNR", "recall",
                       "bits/token"]  # none of pets' own settings
    assert [(r["datasets.fm.resolution"], r["datasets.pets"]) for r in rows] == [("28", "yes"), ("16", "-")]


def test_no_runs_and_option_like_revisions_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no runs to compare"):
        C.rows_of([{"rev": "workspace", "data": {}}])
    for rev in ("--all-commits", "", "a\nb"):
        with pytest.raises(UserError, match="not a git revision"):
            C.compare(tmp_path, [rev])


def test_a_detached_head_is_named_by_its_short_hash():
    sha = "0123456789abcdef0123456789abcdef01234567"
    _, rows, _ = C.rows_of([run(sha, params(), {}), run("b" * 40, params(), {}, name="a-long-experiment-name-xyz")])
    assert [r["run"] for r in rows] == ["0123456", "a-long-experiment-name-x"]


def test_workspace_metrics_of_out_of_date_stages_are_marked():
    """After `--stage train_transformer -S train_transformer.kind=maskgit` the workspace row showed the old GAN's
    gFID beside kind maskgit, unmarked (sample and evaluate were out of date)."""
    metrics = {"data/metrics/evaluate.json": {"fid": 299.6, "recall": 0.0, "protocol": "p"},
               "data/metrics/eval_vqgan.json": {"fid": 236.5, "protocol": "r"}}
    shown = [run("workspace", params(steps=5), metrics, when=None), run("abc", params(), metrics, name="main")]
    _, rows, notes = C.rows_of(shown, stale={"sample", "evaluate", "train_transformer"})
    assert [(r["run"], r["gFID"], r["recall"], r["rFID"]) for r in rows] == [
        ("workspace", "299.6*", "0*", "236.5"), ("main", "299.6", "0", "236.5")]  # only the workspace's; rFID current
    assert notes == ["* workspace: gFID, recall predate its params or code (out of date, or after a stage that "
                     "is: evaluate, sample, train_transformer); run the pipeline to measure them"]
    assert C.rows_of(shown)[2] == []  # up to date: nothing marked
    assert C.rows_of(shown, stale={"eval_vqgan"})[2] == [
        "* workspace: rFID predates its params or code (out of date, or after a stage that is: eval_vqgan); run the "
        "pipeline to measure it"]


def test_a_failed_dvc_status_is_said_not_taken_for_up_to_date(tmp_path, monkeypatch):
    """During a run `dvc status` fails ("is busy"): compare showed the old metrics unmarked, as if current."""
    import subprocess

    shown = [run("workspace", params(), {"data/metrics/evaluate.json": {"fid": 40.6, "protocol": "p"}}, when=None)]

    def fake(cmd, **kw):
        if cmd[:2] == ["dvc", "status"]:
            busy = "ERROR: 'data/x' is busy, it is being blocked by dvc repro"
            return subprocess.CompletedProcess(cmd, 255, "", busy)
        return subprocess.CompletedProcess(cmd, 0, __import__("json").dumps(shown), "")

    monkeypatch.setattr(C.subprocess, "run", fake)
    out = C.compare(tmp_path)
    assert out.splitlines()[-1] == ("note: workspace: whether its metrics are current is not known (dvc status: "
                                    "ERROR: 'data/x' is busy, it is being blocked by dvc repro)")


def test_gan_settings_of_a_run_of_another_kind_show_as_unread():
    """An AR run listed `attention_kind ylg` beside a GAN run's `native`, as if it applied to the AR model."""
    def p(kind, attention):
        return {**params(), "train_transformer": {"kind": kind, "gan": {"attention_kind": attention}}}

    _, rows, _ = C.rows_of([run("workspace", p("ar", "ylg"), {}, when=None), run("abc", p("gan", "native"), {})])
    assert [(r["train_transformer.kind"], r["train_transformer.gan.attention_kind"]) for r in rows] == [
        ("ar", "-"), ("gan", "native")]


def test_runs_with_params_or_metrics_are_rows_and_experiments_take_their_groups_name():
    """DVC lists queued or failed experiments with neither params nor metrics: no row. A run with either is one; an
    experiment's revision carries no name of its own, so it is named by its group."""
    only_params = {"rev": "p1", "name": None, "data": {"params": {"params.yaml": {"data": params()}}}}
    only_metrics = {"rev": "m1", "name": "mm", "data": {"metrics": {}},
                    "experiments": [{"name": "exp-group", "revs": [run("e1", params(), {})]}]}
    shown = [only_params, {"rev": "q1", "data": {"params": None, "metrics": None}}, only_metrics,
             {"data": {"metrics": {}}}]
    assert [(r["name"], r["rev"]) for r in C._runs(shown)] == [("p1", "p1"), ("mm", "m1"), ("exp-group", "e1"),
                                                                ("?", "")]
    with pytest.raises(UserError) as err:
        C.rows_of(shown[1:2])
    assert str(err.value) == "dvc exp show: no runs to compare (run the pipeline or `dvc exp run` first)"


def test_the_table_is_left_aligned_two_spaces_apart_with_no_trailing_blanks():
    text = C.table(["run", "gFID", "x"], [{"run": "ws", "gFID": "40.6"}, {"run": "main-long", "x": "1"}])
    assert text == "run        gFID  x\nws         40.6\nmain-long        1"


def test_compare_asks_dvc_for_the_given_revisions_in_the_project_and_lists_every_note(tmp_path, monkeypatch):
    import json
    import subprocess

    shown = [run("workspace", params(), {"data/metrics/evaluate.json": {"fid": 40.6, "protocol": "p"}}, when=None),
             run("abc", params(n=500), {"data/metrics/evaluate.json": {"fid": 52.0, "protocol": "q"}}, name="main")]
    calls, answer = [], subprocess.CompletedProcess([], 0, json.dumps(shown), "")

    def fake(cmd, **kw):
        calls.append((cmd, kw))
        return answer

    monkeypatch.setattr(C.subprocess, "run", fake)
    monkeypatch.setattr(C, "stale_stages", lambda root: {"evaluate"} if root == tmp_path else set())
    columns, rows, notes = C.rows_of(shown, {"evaluate"})
    assert len(notes) == 2  # another protocol, and the workspace's out-of-date gFID
    assert C.compare(tmp_path, ["main", "v1"]) == C.table(columns, rows) + "".join(f"\nnote: {n}" for n in notes)
    assert calls == [(["dvc", "exp", "show", "--json", "--rev", "main", "--rev", "v1"],
                      {"cwd": tmp_path, "capture_output": True, "text": True})]
    for code, out, err, said in [(1, "", "WARNING: a\nWARNING: b\nERROR: c\n", "dvc exp show failed: ERROR: c"),
                                 (1, "", "", "dvc exp show failed: (no message)"),
                                 (0, "Traceback", "", "dvc exp show --json printed no JSON; is this a DVC project "
                                                      "with a git commit?")]:
        answer = subprocess.CompletedProcess([], code, out, err)
        with pytest.raises(UserError) as caught:
            C.compare(tmp_path)
        assert str(caught.value) == said


def test_stale_stages_are_the_changed_ones_and_every_stage_below_them_by_base_name(tmp_path, monkeypatch):
    seen = []
    upstream = {"train_transformer": {"tokenize@fm"}, "sample": {"train_transformer", "tokenize@fm"},
                "prepare@fm": set(), "eval_vqgan": {"train_vqgan"}}
    monkeypatch.setattr(C, "changed_stages", lambda root: seen.append(root) or {"tokenize@fm"})
    monkeypatch.setattr(C, "upstream_stages", lambda root: seen.append(root) or upstream)
    assert C.stale_stages(tmp_path) == {"tokenize", "train_transformer", "sample"} and seen == [tmp_path, tmp_path]
    monkeypatch.setattr(C, "changed_stages", lambda root: set())
    assert C.stale_stages(tmp_path) == set()
