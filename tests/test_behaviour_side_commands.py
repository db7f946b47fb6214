"""Checks of the side commands and the orchestration that a planted bug slipped past (session 21's second round):
`pipeline tokenize`'s guards of the user's files, the run lock from another folder, failure reporting when a user
error and a crash meet, `compare`'s stale marks, server identity, reference meta, pixel conversion, run-log names,
and params range checks at their boundaries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from pipeline import compare, dvc_graph, retokenize, run_checks, runs
from pipeline.errors import UserError


def one_line(run) -> str:
    with pytest.raises(UserError) as err:
        run()
    assert "\n" not in str(err.value)
    return str(err.value)


# ------------------------------------------------------------------ pipeline tokenize: the user's files

def test_a_store_that_holds_the_source_is_never_the_out(tmp_path):
    store = tmp_path / "store"
    (store / "imgs").mkdir(parents=True)
    assert "overlaps the source" in one_line(lambda: retokenize.check_out(store, store / "imgs", tmp_path / "vq", {}))


def test_a_json_of_the_users_with_the_metric_keys_and_more_is_not_replaced(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"images": 1, "perplexity": 2, "usage_pct": 3, "note": "mine"}))
    assert "is not a metrics file written by `pipeline tokenize`" in one_line(
        lambda: retokenize.check_metrics(mine, tmp_path / "src", tmp_path / "vq", tmp_path / "out", {}))


def test_a_file_of_the_users_in_the_work_folder_is_refused_before_it_would_be_removed(tmp_path):
    staging = tmp_path / ".g.prepared"
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    assert one_line(lambda: retokenize.check_staging(staging)).endswith("holds notes.txt, not this command's; "
                                                                        "move it away")


def test_the_pipelines_outputs_are_dvc_yaml_s_under_the_project_s_params(tmp_path):
    """The project's own dvc.yaml and params.yaml with a dataset added and tokenize's folders moved: every stage's
    outputs count, tokenize@<new dataset>'s included, at the paths dvc.yaml's templates give (a copy of the
    template in the code drifts from dvc.yaml)."""
    from helpers import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["a"] = {**params["datasets"]["fashion_mnist"], "path": str(tmp_path)}
    params["tokenize"].update(out_dir="store", metrics_dir="m")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    outs = retokenize.pipeline_outputs(tmp_path)
    assert outs[(tmp_path / "store" / "a").resolve()] == "tokenize@a"
    assert outs[(tmp_path / "m" / "tokenize_a.json").resolve()] == "tokenize@a"
    assert outs[(tmp_path / params["train_vqgan"]["metrics"]).resolve()] == "train_vqgan"
    assert outs[(tmp_path / params["sample"]["out_dir"]).resolve()] == "sample"


# ------------------------------------------------------------------ runs: lock, failure reporting

def test_the_run_lock_is_the_projects_from_any_working_folder(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "p", tmp_path / "elsewhere"
    (project / ".dvc" / "tmp").mkdir(parents=True)
    elsewhere.mkdir()
    with runs.project_lock(project):
        monkeypatch.chdir(elsewhere)
        assert "is in use by" in one_line(lambda: runs.project_lock(project).__enter__())


def test_a_pipeline_with_a_crashed_stage_is_no_user_error():
    from pipeline.flow import PipelineFailed
    rows = [{"stage": "a", "status": "failed", "user_error": True, "error": "error: a: bad value"},
            {"stage": "b", "status": "failed", "user_error": False, "error": "b: Traceback"}]
    assert not PipelineFailed(rows).user_error and PipelineFailed(rows[:1]).user_error


def test_each_failed_stage_keeps_its_own_error_line():
    """DVC's output of two failed stages: the second, which printed no `error:` line, must not inherit the
    first's."""
    from pipeline.cli import _follow_repro
    text = ("Running stage 'a':\nerror: a: bad value\nERROR: failed to reproduce 'a': failed to run: x, exited with 2\n"
            "Running stage 'b':\nTraceback (most recent call last):\n"
            "ERROR: failed to reproduce 'b': failed to run: y, exited with 1\n")
    proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdout.write({text!r})"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert _follow_repro(proc) == [("a", 2, "error: a: bad value"), ("b", 1, "")]


@pytest.mark.parametrize("failed, code", [
    ([("a", 2, "error: a: bad value"), ("b", 1, "")], 1),                         # a crash beside a user error
    ([("a", 2, "error: a: bad value"), ("b", 2, "error: b: missing x")], 2),      # every one the user's
    ([("a", 2, "")], 1),                                                          # exit 2 without our error line
])
def test_run_without_prefect_exits_2_only_when_every_failed_stage_was_a_user_error(monkeypatch, capsys, failed, code):
    import contextlib

    from pipeline import cli
    monkeypatch.setattr(cli, "run_with_overrides", lambda *a, **kw: contextlib.nullcontext())
    monkeypatch.setattr(cli, "_repro_keep_going", lambda cmd: failed)
    with pytest.raises(SystemExit) as exit_:
        cli._repro_undone_on_failure(["dvc", "repro"], [])
    assert exit_.value.code == code
    assert [line.split()[0] for line in capsys.readouterr().err.splitlines()[1:]] == [s for s, _, _ in failed]


# ------------------------------------------------------------------ compare, server identity, references

def test_an_out_of_date_stage_is_marked_with_the_stages_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, json.dumps({"train_vqgan": ["changed params"]}), ""))
    monkeypatch.setattr(compare, "upstream_stages", lambda root: {"tokenize@a": {"train_vqgan"}, "fid_ref": set()})
    assert compare.stale_stages(tmp_path) == {"train_vqgan", "tokenize"}


def test_a_server_that_does_not_say_where_it_keeps_its_state_is_not_the_projects(monkeypatch):
    from pipeline import prefect_server
    monkeypatch.setattr(prefect_server, "server_home", lambda port, auth=None: "")
    assert "it does not say where it keeps its state" in one_line(
        lambda: prefect_server.project_server(4200, "/p/.prefect"))


def test_a_reference_whose_meta_lacks_a_key_is_refused(tmp_path):
    from pipeline.fid_reference import Reference, check_reference
    ref = Reference.__new__(Reference)
    ref.meta, ref.folder = {}, tmp_path
    assert "None, but this evaluation uses 'abc'" in one_line(
        lambda: check_reference(ref, feature_network_hash="abc"))


def test_pixels_survive_the_model_range_round_trip_exactly():
    from pipeline.vqgan_io import to_model_range, to_uint8
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(levels)), levels)
    assert to_uint8(torch.tensor([0.0, -1.0, 1.0, 0.999])).tolist() == [128, 0, 255, 255]  # rounded, not cut
    out = to_uint8(torch.tensor([-1.5, 1.5, -3.0, 3.0]))  # a decoder overshoots: clamped, never wrapped around
    assert out.dtype == torch.uint8 and out.tolist() == [0, 255, 0, 255]


def test_run_facts_sit_beside_the_metrics_under_its_stem(tmp_path):
    from pipeline.runlog import run_log_path, write_metrics
    from pipeline.out_guard import _why_not_ours
    assert run_log_path("m/x.json") == Path("m/x.run.json")
    write_metrics(tmp_path / "x.json", {"fid": 1.0}, {"seconds": 2.0})
    assert (tmp_path / "x.run.json").is_file()
    assert _why_not_ours(tmp_path / "x.json", "evaluate", None) is None  # the out guard finds the run's file


def test_the_metrics_file_takes_its_run_logs_times_and_a_restored_one_has_no_facts(tmp_path, monkeypatch):
    """A kill between the two writes must never leave a metrics file newer than its run log (the out guard would
    call the stage's own output foreign), however long the first write took: here it took until 2001."""
    from pipeline import runlog

    real, then = runlog.write_json, 1_000_000_000 * 10**9  # 2001-09-09, in ns

    def slow_write(path, obj, stamp=None):
        real(path, obj, stamp=stamp)
        if str(path).endswith(".run.json"):
            os.utime(path, ns=(then, then))

    monkeypatch.setattr(runlog, "write_json", slow_write)
    runlog.write_metrics(tmp_path / "x.json", {"fid": 1.0}, {"seconds": 2.0})
    assert (tmp_path / "x.json").stat().st_mtime_ns == then
    (tmp_path / "x.run.json").unlink()  # DVC restored the metrics from its cache: no run here measured anything
    assert runlog.read_run_facts(tmp_path / "x.json") == {}


# ------------------------------------------------------------------ params at their boundaries

def test_params_checks_hold_at_their_boundaries():
    import yaml
    from pipeline.sandbox import ROOT
    from stages import train_transformer, train_vqgan
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def vq(**model):
        section = {**params["train_vqgan"], "model": {**params["train_vqgan"].get("model", {}), **model}}
        return train_vqgan.check({**params, "train_vqgan": section}, "params.yaml")

    assert "beta" in one_line(lambda: vq(beta=0)) and vq(beta=10).model.beta == 10

    def tt(**ar):
        section = {**params["train_transformer"], "ar": {**params["train_transformer"]["ar"], **ar}}
        return train_transformer.check({**params, "train_transformer": section}, "params.yaml")

    assert "divisible by 4" in one_line(lambda: tt(n_embd=24, n_head=4, pos="rope2d"))  # head dim 6
    assert tt(n_embd=32, n_head=4, pos="rope2d").ar.n_embd == 32
    assert tt(n_embd=24, n_head=4, pos="learned").ar.pos == "learned"


def test_the_artifact_gives_the_feature_networks_own_rate(tmp_path, monkeypatch):
    from pipeline import artifacts
    seen = []
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda text, **kw: seen.append(text))
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda *a, **kw: None)
    report = tmp_path / "data" / "reports" / "evaluate"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text("{}")
    (report / "report.md").write_text("# evaluate\n")
    metrics = tmp_path / "data" / "metrics" / "evaluate.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    (metrics.parent / "evaluate.run.json").write_text(json.dumps(
        {"images": 100, "feature_seconds": 2.0, "seconds": 10.0, "device": "cpu"}))
    (tmp_path / "params.yaml").write_bytes((Path(__file__).resolve().parents[1] / "params.yaml").read_bytes())
    artifacts.publish_evaluation("evaluate", tmp_path)
    assert any("50.0 images/s" in text for text in seen), seen


def test_the_guard_judges_the_first_of_repeated_headers_as_the_app_reads_it():
    from pipeline.ui_server import LocalOnly
    guard = LocalOnly(lambda *a: None, 4200)
    twice = [(b"host", b"evil.example"), (b"host", b"127.0.0.1:4200")]
    assert guard.refusal({"headers": twice}).startswith("Host evil.example is not this server")
    origins = [(b"host", b"127.0.0.1:4200"), (b"origin", b"http://evil.example"), (b"origin", b"http://127.0.0.1:4200")]
    assert guard.refusal({"headers": origins}).startswith("cross-origin request from http://evil.example refused")


def test_cuda_asked_of_a_cuda_build_without_a_visible_gpu_is_refused(monkeypatch):
    from pipeline.device import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_a_stage_reading_a_path_inside_its_own_output_is_refused(tmp_path):
    from pipeline import out_guard
    (tmp_path / "dvc.yaml").write_text("stages:\n  ev:\n    cmd: python -m stages.ev\n    deps:\n"
                                       "      - ${ev.reference}\n    outs:\n      - ${ev.report_dir}\n")
    for reference, report_dir in (("rep/ref", "rep"), ("ref", "ref/rep")):  # the input inside, or holding, the output
        assert "would read" in one_line(lambda: out_guard.check_overlaps(
            tmp_path, {"ev": {"reference": reference, "report_dir": report_dir}}, "params.yaml"))


def test_an_empty_dvc_lock_is_one_line_naming_it_and_the_remedy(tmp_path):
    """A dvc killed while it rewrote dvc.lock (in place) leaves it empty; every dvc command then fails on its schema.
    scripts/kill_resume.py hit it: `python -m pipeline stage` ended in a traceback. Now one line with the remedy;
    a dvc.lock with content that fails is still the crash it was (not a user's doing)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo a > a.txt\n    outs:\n      - a.txt\n")
    (tmp_path / "dvc.lock").write_text("")
    with pytest.raises(UserError, match=r"dvc\.lock is empty: a dvc command was killed while rewriting it") as err:
        dvc_graph.dvc(["stage", "list", "--name-only"], tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / "dvc.lock") in str(err.value)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  a: {}\n")
    with pytest.raises(RuntimeError, match="dvc stage list --name-only failed"):
        dvc_graph.dvc(["stage", "list", "--name-only"], tmp_path)


def openclipart_run(tmp_path: Path, monkeypatch) -> tuple[Path, list[list[str]], Callable[..., None]]:
    """A project with this checkout's dvc.yaml, params.yaml and configs/openclipart.yaml (which adds a 64 px RGB
    dataset); returns it, the `dvc repro` commands run, and `run(stages, *sets)`: `pipeline run --no-prefect
    --preset configs/openclipart.yaml` with those stages and overrides, DVC's run itself left out."""
    import argparse
    import shutil

    from helpers import ROOT, make_project
    from pipeline import cli

    root = make_project(tmp_path / "p", (ROOT / "params.yaml").read_text())
    (root / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "openclipart.yaml", root / "configs")
    (tmp_path / "clipart").mkdir()
    ran: list[list[str]] = []
    monkeypatch.setattr(cli, "ROOT", root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(cli, "_repro_keep_going", lambda cmd: ran.append(cmd) or [])

    def run(stages: list[str] | None, *sets: str) -> None:
        cli.cmd_run(argparse.Namespace(preset="configs/openclipart.yaml", stage=stages, no_prefect=True, force=False,
                                       set=[f"datasets.openclipart.path={tmp_path / 'clipart'}", *sets]))

    return root, ran, run


def test_a_stage_of_the_dataset_a_preset_adds_is_selected_by_its_full_name(tmp_path, monkeypatch):
    """The project's dvc.yaml, params.yaml and configs/openclipart.yaml, which adds a dataset: `pipeline run --preset
    configs/openclipart.yaml --stage prepare@openclipart` was refused as an unknown stage, since the stage list came
    from params.yaml before the preset was applied (the tests' overrides never added a foreach item)."""
    from pipeline.config import load_params

    root, ran, run_stages = openclipart_run(tmp_path, monkeypatch)

    def run(stage: str) -> None:
        run_stages([stage])

    assert one_line(lambda: run("prepare@clipart")).startswith("unknown stage 'prepare@clipart'")  # a typo still is
    run("prepare@openclipart")
    assert ran == [["dvc", "repro", "--keep-going", "prepare@openclipart"]]
    assert "openclipart" in load_params(root / "params.yaml")["datasets"]


def test_a_run_whose_tokenize_would_refuse_its_dataset_is_refused_before_any_stage(tmp_path, monkeypatch):
    """configs/openclipart.yaml adds a 64 px RGB dataset; the default VQGAN is trained at 32 px on grey images. A run
    that would tokenize it used to run prepare@openclipart first, fail in tokenize@openclipart and undo it all. Now
    it is refused before anything runs, through whatever selects tokenize@openclipart (all stages, its name, a
    stage that reads its tokens), while the preset's own `--stage prepare@openclipart` runs."""
    root, ran, run = openclipart_run(tmp_path, monkeypatch)
    for stages, sets in ((None, ()), (["tokenize@openclipart"], ()), (["tokenize"], ()),
                         (["train_transformer"], ("train_transformer.dataset=openclipart",))):
        said = one_line(lambda: run(stages, *sets))
        assert "tokenize@openclipart would refuse datasets.openclipart (64 px, 3 channel(s)): resolution 64 " \
               "differs from the VQGAN's training resolution 32" in said, (stages, said)
        assert "train_vqgan trains it on datasets.fashion_mnist" in said and "--stage prepare@openclipart" in said
    # at 32 px the channels are what is wrong, until the dataset converts them
    said = one_line(lambda: run(None, "datasets.openclipart.resolution=32"))
    assert "images have 3 channel(s), the VQGAN takes 1" in said
    # a VQGAN trained on the new dataset (train_vqgan.dataset) makes it fit; Fashion-MNIST is then the misfit
    said = one_line(lambda: run(None, "train_vqgan.dataset=openclipart"))
    assert said.count("would refuse") == 1
    assert "tokenize@fashion_mnist would refuse datasets.fashion_mnist (32 px" in said
    assert ran == []
    # the flow and the deployment start runs through run_with_overrides alone: it refuses them too
    from pipeline.presets import resolve_overrides
    overrides = resolve_overrides(root, "configs/openclipart.yaml",
                                  [f"datasets.openclipart.path={tmp_path / 'clipart'}"])
    with pytest.raises(UserError, match="tokenize@openclipart would refuse"):
        with runs.run_with_overrides(root, overrides):
            ran.append(["the body"])
    assert ran == [] and "openclipart" not in (root / "params.yaml").read_text()
    run(["prepare@openclipart"])
    run(["train_transformer"])  # reads Fashion-MNIST's tokens: tokenize@openclipart is not in this run
    run(None, "datasets.openclipart.resolution=32", "datasets.openclipart.convert_channels=true")
    # a VQGAN already trained (its config.json) counts when the run does not train one (`pipeline stage`: no deps)
    (root / "data" / "vqgan").mkdir(parents=True)
    (root / "data" / "vqgan" / ".tokenmill-stage").write_text("train_vqgan\n")
    (root / "data" / "vqgan" / "config.json").write_text(json.dumps(
        {"resolution": 64, "model": {"ch_mult": [1, 2, 4], "in_channels": 3}}))
    run(["prepare@openclipart"])
    assert len(ran) == 4
    from pipeline.config import load_params
    from pipeline.dvc_graph import stages_in_run
    from pipeline.run_checks import check_tokenizable
    params = load_params(root / "params.yaml")
    check_tokenizable(root, params, "p", stages_in_run(root, params, ["tokenize@openclipart"], with_deps=False))
    said = one_line(lambda: check_tokenizable(root, params, "p", {"tokenize@fashion_mnist"}))
    assert "resolution 32 differs from the VQGAN's training resolution 64" in said and "its config.json" in said
    # a config.json that is a FIFO (a hostile folder) is not read: reading it would block for ever
    import os
    import threading
    (root / "data" / "vqgan" / "config.json").unlink()
    os.mkfifo(root / "data" / "vqgan" / "config.json")
    checked = threading.Thread(target=check_tokenizable, args=(root, params, "p", {"tokenize@fashion_mnist"}),
                               daemon=True)
    checked.start()
    checked.join(30)
    assert not checked.is_alive()


def test_an_empty_preset_is_refused_on_the_command_line_and_a_near_miss_is_named():
    """`--preset "$PRESET"` with the variable unset ran params.yaml as it is (the whole pipeline): an empty --preset is
    refused now (and an empty `check --params`). The flow takes a blank preset as none (the UI's cleared field). A
    preset given by name, or with .yml, names the file under configs/ it may mean; a line break in the name stays
    escaped on the one line."""
    from helpers import ROOT
    from pipeline import cli
    from pipeline.presets import resolve_overrides

    import argparse

    for blank in ("", "  "):
        assert one_line(lambda: cli._preset_param(blank)).startswith("--preset is empty: name a file under configs/")
        assert one_line(lambda: cli.cmd_check(argparse.Namespace(params=blank))).startswith("--params is empty")
    assert cli._preset_param(None) is None and resolve_overrides(ROOT, "", ["a.b=1"]) == ["a.b=1"]
    for near in ("openclipart", "openclipart.yaml", "configs/openclipart.yml"):
        assert one_line(lambda: resolve_overrides(ROOT, near, [])).endswith("; did you mean configs/openclipart.yaml?")
    assert "did you mean" not in one_line(lambda: resolve_overrides(ROOT, "configs/nope.yaml", []))
    assert one_line(lambda: resolve_overrides(ROOT, "a\nb", [])).startswith("preset a\\nb: must be a .yaml file")


def test_a_preset_is_a_yaml_or_yml_file_under_configs_and_a_missing_one_lists_those_there(tmp_path):
    from pipeline.presets import resolve_overrides

    configs = tmp_path / "configs"
    configs.mkdir()
    assert one_line(lambda: resolve_overrides(tmp_path, "configs/x.yaml", [])) == (
        "preset configs/x.yaml: file not found (presets live in configs/: none here)")
    for name, n in (("small.yml", 8), ("big.yaml", 80), ("notes.txt", 1)):
        (configs / name).write_text(f"sample:\n  n: {n}\n")
    (tmp_path / "params.yaml").write_text("sample:\n  n: 2\n")
    assert resolve_overrides(tmp_path, "configs/small.yml", ["sample.seed=1"]) == ["sample.n=8", "sample.seed=1"]
    for outside in ("configs/notes.txt", "params.yaml"):
        assert one_line(lambda: resolve_overrides(tmp_path, outside, [])) == (
            f"preset {outside}: must be a .yaml file under {configs.resolve()}")
    assert one_line(lambda: resolve_overrides(tmp_path, "configs/x.yaml", [])) == (
        "preset configs/x.yaml: file not found (presets live in configs/: big.yaml, small.yml)")


def test_a_dataset_path_that_is_or_holds_the_project_is_refused(tmp_path, monkeypatch):
    """`add-dataset x ''` took the working folder (os.path.abspath("")), the project, as the dataset, and `-S
    datasets.x.path=/` hashed the whole disk: both ended in a line about checkpoint folders, if at all. A path that is
    the project or lies above it is refused by name now; one inside it (a tiny project's own copy) is not."""
    import argparse

    from pipeline import cli

    project = tmp_path / "p"
    (project / "data" / "own").mkdir(parents=True)
    for path in (".", str(project), str(tmp_path), "/", "data/.."):
        said = one_line(lambda: run_checks.check_dataset_paths({"datasets": {"x": {"path": path}}}, "params.yaml",
                                                               project))
        assert said == f"params.yaml: datasets.x.path = {path} is this project's folder or holds it; point it at the " \
                       f"dataset's own folder"
    run_checks.check_dataset_paths({"datasets": {"x": {"path": "data/own"}}}, "params.yaml", project, exist=None)
    monkeypatch.chdir(project)
    args = argparse.Namespace(name="x", path=" ", source=None)
    assert one_line(lambda: cli.cmd_add_dataset(args)) == "add-dataset: the dataset path is empty"
