"""The local Prefect server from the CLI's side: whose server answers on a port, and long-running children
(`prefect server start`, the deployment runner) that stop within seconds on SIGINT / SIGTERM.

Plain standard library: no stage, no Prefect import (the CLI imports this before it decides which Prefect
server to talk to).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.errors import UserError

GRACE_S = 8.0  # a child that has not exited this long after SIGTERM is killed (with everything it started)


def _get(url: str, auth: str | None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def server_home(port: int, auth: str | None = None) -> str | None:
    """None when nothing answers Prefect's health check on 127.0.0.1:`port`; else the server's PREFECT_HOME
    (from its settings endpoint), or '' when it does not say."""
    url = f"http://127.0.0.1:{port}/api"
    try:
        _get(f"{url}/health", auth)
    except OSError:
        return None
    try:
        return str(json.loads(_get(f"{url}/admin/settings", auth)).get("home") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def project_server(port: int, home: str, auth: str | None = None) -> str | None:
    """The API URL of this project's server on `port` (its PREFECT_HOME is `home`), None when the port is free.
    A Prefect server of anything else on the port is refused with one line: runs must not land in another
    project's UI."""
    found = server_home(port, auth)
    if found is None:
        return None
    if found and same_path(found, home):
        return f"http://127.0.0.1:{port}/api"
    started = f"it keeps its state in {found}" if found else "it does not say where it keeps its state"
    raise UserError(f"port {port} holds a Prefect server that is not this project's ({started}; this project's is "
                    f"{home}); use --port, stop that server, or pass --temp-server to run with a temporary one")


def supervise(cmd: list[str], env: dict[str, str] | None = None, grace_s: float = GRACE_S) -> int:
    """Run a long-lived child until it exits or this process gets SIGINT / SIGTERM; then stop it: SIGTERM, and
    after `grace_s` SIGKILL to its whole process group. The handlers are installed explicitly, so a SIGINT
    works even when the shell started us with SIGINT ignored (`cmd &` in a script), and the child never outlives
    us. Returns the child's exit code (130 / 143 when stopped by a signal)."""
    stop = {"signal": None}

    def on_signal(signum, frame) -> None:
        stop["signal"] = stop["signal"] or signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: we decide when it stops
        while proc.poll() is None and stop["signal"] is None:
            time.sleep(0.2)
        if stop["signal"] is not None and proc.poll() is None:
            print(f"stopping ({signal.Signals(stop['signal']).name})...", file=sys.stderr)
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                print(f"still running after {grace_s:.0f} s: killed", file=sys.stderr)
            _kill_group(proc.pid)
            proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 + stop["signal"] if stop["signal"] is not None else proc.returncode


def _kill_group(pgid: int) -> None:
    """Whatever the child started (flow-run processes, dvc, stages) goes with it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
