"""DVC caching and the Prefect flow, in a throwaway copy of the project."""
import subprocess
import sys

import pytest

from conftest import make_idx_dataset, make_project, tiny_params
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
    return make_project(base / "project", tiny_params({"a": a, "b": b}))


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


def test_prefect_flow_runs_stages_through_dvc_and_publishes_artifacts(project, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flow import tokenmill_pipeline

    dvc(project, "repro")
    with prefect_test_harness(server_startup_timeout=120):
        # Everything is up to date: the flow must skip exactly what DVC skips.
        results = tokenmill_pipeline(root=str(project))
        assert [r["stage"] for r in results] == ["prepare@a", "prepare@b"]
        assert all(r["status"] == "skipped (unchanged)" for r in results)
        # A param change re-runs only the affected stage, through the flow.
        results = tokenmill_pipeline(root=str(project), overrides=["datasets.b.resolution=24"], stages=["prepare"])
        assert {r["stage"]: r["status"] for r in results} == {"prepare@a": "skipped (unchanged)",
                                                             "prepare@b": "ran"}
        import httpx
        from prefect.settings import PREFECT_API_URL

        # Query the REST API directly: it is what the UI reads.
        resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                          json={"artifacts": {"key": {"like_": "prepare-"}}, "limit": 50})
        resp.raise_for_status()
        keys = {a["key"] for a in resp.json()}
        assert {"prepare-a-counts", "prepare-a-manifest", "prepare-b-counts"} <= keys


def test_flow_does_not_retry_user_errors(project, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flow import StageFailed, run_stage

    set_params_file(project / "params.yaml", ["datasets.a.resolution=2"])
    try:
        with prefect_test_harness(server_startup_timeout=120):
            state = run_stage("prepare@a", root=str(project), return_state=True)
            assert state.is_failed()
            with pytest.raises(StageFailed) as err:
                state.result()
            assert err.value.returncode == 2
            assert "datasets.a.resolution = 2 is out of range" in str(err.value)
            import httpx
            from prefect.settings import PREFECT_API_URL
            task_run = httpx.get(f"{PREFECT_API_URL.value()}/task_runs/{state.state_details.task_run_id}").json()
            assert task_run["run_count"] == 1  # a user error is not retried
    finally:
        set_params_file(project / "params.yaml", ["datasets.a.resolution=20"])


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("run", "stage", "check", "ui", "serve", "add-dataset"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--help"], capture_output=True, text=True)
    assert "--stage" in proc.stdout and "--force" in proc.stdout
