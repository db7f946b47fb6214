"""DVC caching and the Prefect flow, in a throwaway copy of the project."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import files_under, make_idx_dataset, make_project, tiny_params
from pipeline.config import set_params_file


def dvc(project, *args):
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("proj")
    a = make_idx_dataset(base / "src_a", n_train=30, n_val=5, seed=1)
    b = make_idx_dataset(base / "src_b", n_train=20, n_val=5, seed=2)
    return make_project(base / "project", tiny_params({"a": a, "b": b}), stages=("prepare",))


def test_repro_twice_then_param_change_reruns_only_that_stage(project):
    out = dvc(project, "repro")
    assert "Running stage 'prepare@a'" in out and "Running stage 'prepare@b'" in out
    out = dvc(project, "repro")
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert dvc(project, "status").strip().endswith("Data and pipelines are up to date.")

    set_params_file(project / "params.yaml", ["datasets.a.resolution=20"])
    assert "prepare@a" in dvc(project, "status") and "prepare@b" not in dvc(project, "status")
    out = dvc(project, "repro")
    assert "Running stage 'prepare@a'" in out and "Running stage 'prepare@b'" not in out
    import json
    assert json.loads((project / "data/prepared/a/manifest.json").read_text())["resolution"] == 20


def test_bad_params_stop_stage_with_one_line(project):
    set_params_file(project / "params.yaml", ["prepare.shard_size=-1"])
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--dataset", "a"], cwd=project,
                              capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "error: params.yaml: prepare.shard_size = -1 is out of range (allowed: >= 1)"]
    finally:
        set_params_file(project / "params.yaml", ["prepare.shard_size=25"])


def prefect_session(scenario: str, project, tmp_path) -> dict:
    """Run a scenario of tests/prefect_session.py (a temporary Prefect server) in a child process."""
    import json
    import os
    from pathlib import Path

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("prefect_session.py")), scenario,
                           str(project)], capture_output=True, text=True, env=env, timeout=400)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_prefect_flow_runs_stages_through_dvc_and_publishes_artifacts(project, tmp_path):
    dvc(project, "repro")
    r = prefect_session("flow_runs", project, tmp_path)
    # Everything was up to date: the flow skips exactly what DVC skips.
    assert [x["stage"] for x in r["skipped"]] == ["prepare@a", "prepare@b"]
    assert all(x["status"] == "skipped (unchanged)" for x in r["skipped"])
    # A param change re-runs only the affected stage, through the flow.
    assert {x["stage"]: x["status"] for x in r["changed"]} == {"prepare@a": "skipped (unchanged)",
                                                               "prepare@b": "ran"}
    assert {"prepare-a-counts", "prepare-a-manifest", "prepare-b-counts"} <= set(r["artifact_keys"])
    # the flow (and so the deployment) validates its overrides before writing anything
    assert "unknown key 'prepare.shard_sizee'" in r["refused"] and "\n" not in r["refused"]
    assert r["params_unchanged"]


def test_flow_does_not_retry_user_errors(project, tmp_path):
    set_params_file(project / "params.yaml", ["datasets.a.resolution=2"])
    try:
        r = prefect_session("user_error", project, tmp_path)
    finally:
        set_params_file(project / "params.yaml", ["datasets.a.resolution=20"])
    assert r["failed"] and r["error"]["returncode"] == 2
    assert "datasets.a.resolution = 2 is out of range" in r["error"]["message"]
    assert r["run_count"] == 1  # a user error is not retried


def test_transient_failure_is_retried_without_duplicated_output(tmp_path):
    import shutil

    import yaml
    src = make_idx_dataset(tmp_path / "src", n_train=60, n_val=5, seed=4)  # 3 train shards of 25
    clean = make_project(tmp_path / "clean", tiny_params({"a": src}), stages=("prepare",))
    dvc(clean, "repro")
    flaky = make_project(tmp_path / "flaky", tiny_params({"a": src}), stages=("prepare",))
    shutil.copy2(Path(__file__).with_name("flaky_stage.py"), flaky / "flaky_stage.py")
    spec = yaml.safe_load((flaky / "dvc.yaml").read_text())
    spec["stages"]["prepare"]["do"]["cmd"] = "python flaky_stage.py .failed-once stages.prepare --dataset ${key}"
    (flaky / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    r = prefect_session("transient", flaky, tmp_path)
    assert (flaky / ".failed-once").is_file()  # the first run did fail
    assert r["completed"] and r["run_count"] == 2 and r["result"]["status"] == "ran"
    # the retry's output is the clean run's, file for file: no duplicated or partial shard, no temp file
    assert files_under(flaky / "data") == files_under(clean / "data")
    assert "Data and pipelines are up to date." in dvc(flaky, "status")


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("run", "stage", "check", "ui", "serve", "add-dataset"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--help"], capture_output=True, text=True)
    assert "--stage" in proc.stdout and "--force" in proc.stdout
