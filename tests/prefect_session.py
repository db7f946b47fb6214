"""Runs Prefect scenarios against a temporary server in a child process and prints the results as JSON.

The tests call this in a subprocess: the Prefect harness leaves threads and fork handlers in the process
that runs it, and forked DataLoader workers in later tests would inherit them. Usage:
    python tests/prefect_session.py <scenario> <project>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pipeline.errors import UserError
from pipeline.flow import StageFailed, run_stage, tokenmill_pipeline


def flow_runs(project: str) -> dict:
    skipped = tokenmill_pipeline(root=project)
    changed = tokenmill_pipeline(root=project, overrides=["datasets.b.resolution=24"], stages=["prepare"])
    # Query the REST API directly: it is what the UI reads.
    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                      json={"artifacts": {"key": {"like_": "prepare-"}}, "limit": 50})
    resp.raise_for_status()
    # a typo in the overrides: refused before params.yaml is touched, as one line
    before = (Path(project) / "params.yaml").read_bytes()
    try:
        tokenmill_pipeline(root=project, overrides=["prepare.shard_sizee=5"])
        refused = None
    except UserError as exc:
        refused = str(exc)
    return {"skipped": skipped, "changed": changed, "artifact_keys": sorted({a["key"] for a in resp.json()}),
            "refused": refused, "params_unchanged": (Path(project) / "params.yaml").read_bytes() == before}


def user_error(project: str) -> dict:
    state = run_stage("prepare@a", root=project, return_state=True)
    try:
        state.result()
        error = None
    except StageFailed as exc:
        error = {"returncode": exc.returncode, "message": str(exc)}
    task_run = httpx.get(f"{PREFECT_API_URL.value()}/task_runs/{state.state_details.task_run_id}").json()
    return {"failed": state.is_failed(), "error": error, "run_count": task_run["run_count"]}


def transient(project: str) -> dict:
    state = run_stage("prepare@a", root=project, return_state=True)
    task_run = httpx.get(f"{PREFECT_API_URL.value()}/task_runs/{state.state_details.task_run_id}").json()
    return {"completed": state.is_completed(), "result": state.result() if state.is_completed() else None,
            "run_count": task_run["run_count"]}


if __name__ == "__main__":
    scenario, project = sys.argv[1], sys.argv[2]
    with prefect_test_harness(server_startup_timeout=120):
        result = {"flow_runs": flow_runs, "user_error": user_error, "transient": transient}[scenario](project)
    print("RESULT " + json.dumps(result))
