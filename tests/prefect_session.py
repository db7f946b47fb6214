"""Runs Prefect scenarios against a temporary server in a child process and prints the results as JSON.

The tests call this in a subprocess: the Prefect harness leaves threads and fork handlers in the process
that runs it, and forked DataLoader workers in later tests would inherit them. Usage:
    python tests/prefect_session.py <scenario> <project> [<scenario> <project> ...]
Several scenarios share one temporary server (starting one costs ~15 s); they run in the order given.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pipeline.errors import UserError
from pipeline.flow import run_stage, tokenmill_pipeline


def flow_runs(project: str) -> dict:
    skipped = tokenmill_pipeline(root=project)
    changed = tokenmill_pipeline(root=project, overrides=["datasets.b.resolution=24"], stages=["prepare"])
    restored = tokenmill_pipeline(root=project, overrides=["datasets.b.resolution=16"], stages=["prepare@b"])
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
    return {"skipped": skipped, "changed": changed, "restored": restored,
            "artifact_keys": sorted({a["key"] for a in resp.json()}),
            "refused": refused, "params_unchanged": (Path(project) / "params.yaml").read_bytes() == before}


def transient(project: str) -> dict:
    state = run_stage("prepare@a", root=project, return_state=True)
    task_run = httpx.get(f"{PREFECT_API_URL.value()}/task_runs/{state.state_details.task_run_id}").json()
    return {"completed": state.is_completed(), "result": state.result() if state.is_completed() else None,
            "run_count": task_run["run_count"]}


def api(method: str, path: str, **body) -> dict | list:
    resp = httpx.request(method, f"{PREFECT_API_URL.value()}{path}", **({"json": body} if body else {}))
    resp.raise_for_status()
    return resp.json()


def flow_run_facts(flow_run_id: str) -> dict:
    """What the UI shows of a flow run: name, parameters, state and message, its task runs, logs and artifacts."""
    run = api("GET", f"/flow_runs/{flow_run_id}")
    tasks = api("POST", "/task_runs/filter", task_runs={"flow_run_id": {"any_": [flow_run_id]}})
    logs = api("POST", "/logs/filter", logs={"flow_run_id": {"any_": [flow_run_id]}}, limit=200)
    arts = api("POST", "/artifacts/filter", artifacts={"flow_run_id": {"any_": [flow_run_id]}})
    return {"name": run["name"], "parameters": run["parameters"], "state": run["state"]["type"],
            "message": run["state"]["message"],
            "tasks": {t["name"]: {"state": t["state"]["type"], "message": t["state"]["message"],
                                  "run_count": t["run_count"]} for t in tasks},
            "logs": [x["message"] for x in logs], "artifacts": {a["key"]: a["data"] for a in arts if a["key"]}}


def cli(project: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


MISSPELT: dict = {}  # what the server answered a run with a misspelt parameter (stop_time fills it)


def stop_time(project: str, command: list[str], sig: int) -> float | None:
    """Seconds a `python -m pipeline <command>` takes to exit after `sig`, started with SIGINT ignored (as `cmd &`
    in a script starts it); None when it still runs 30 s later (it is killed then)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *command], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in proc.stdout:  # until it serves
        if "being served" in line:
            break
    time.sleep(1)
    if sig == signal.SIGINT:  # meanwhile: a run started from the API with a misspelt parameter
        deployment = next(d for d in api("POST", "/deployments/filter") if d["name"] == "tokenmill-local")
        resp = httpx.post(f"{PREFECT_API_URL.value()}/deployments/{deployment['id']}/create_flow_run",
                          json={"parameters": {"overides": ["sample.n=8"]}})
        MISSPELT.update(status=resp.status_code, detail=resp.json().get("detail"))
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
        return time.monotonic() - start
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


def keep_going(project: str) -> dict:
    """Dataset a's prepare fails with a user error; the rest runs. Started as a user would (the CLI, with a preset
    and an override) and read back from the API; then bad parameters, a foreign server and stopping `serve`."""
    from pipeline.prefect_server import server_home

    url = PREFECT_API_URL.value()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    out = {"cli": cli(project, "run", "--preset", "configs/small.yaml", "-S", "prepare.shard_size=7",
                      env={"PREFECT_API_URL": url})}
    runs = api("POST", "/flow_runs/filter", sort="EXPECTED_START_TIME_DESC", limit=1)
    out["run"] = flow_run_facts(runs[0]["id"])
    # bad parameters as a run started from the UI would pass them: a one-line Failed state, nothing written
    before = (Path(project) / "params.yaml").read_bytes()
    for key, kwargs in {"typo": {"overrides": ["prepare.shard_sizee=5"]},
                        "outside": {"preset": "../params.yaml"},
                        "stage": {"stages": ["prepare", "tokenise"]}}.items():
        state = tokenmill_pipeline(root=project, return_state=True, **kwargs)
        out[key] = flow_run_facts(str(state.state_details.flow_run_id))
    out["params_unchanged"] = (Path(project) / "params.yaml").read_bytes() == before
    # whose server is on the port: this project's (the same PREFECT_HOME) or another's
    out["home"] = server_home(port)
    out["foreign"] = cli(project, "run", "--port", str(port), env={"PREFECT_HOME": str(Path(project) / "other")})
    out["serve_stop_s"] = {name: stop_time(project, ["serve", "--port", str(port)], sig)
                           for name, sig in (("SIGINT", signal.SIGINT), ("SIGTERM", signal.SIGTERM))}
    out["misspelt"] = MISSPELT
    return out


if __name__ == "__main__":
    scenarios = {"flow_runs": flow_runs, "transient": transient, "keep_going": keep_going}
    pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
    with prefect_test_harness(server_startup_timeout=120):
        result = {scenario: scenarios[scenario](project) for scenario, project in pairs}
    print("RESULT " + json.dumps(result))
