"""The local Prefect server from the CLI's side: whose server answers on a port, and long-running children
(`prefect server start`, the deployment runner) that stop within seconds on SIGINT / SIGTERM.

Plain standard library: no stage, no Prefect import (the CLI imports this before it decides which Prefect
server to talk to).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

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
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # a server started with TOKENMILL_PREFECT_AUTH: no answer without the password
            raise UserError(f"the Prefect server on 127.0.0.1:{port} asks for a password"
                            f"{' other than the one given' if auth else ''}: set TOKENMILL_PREFECT_AUTH=user:password "
                            f"as when it was started, or use --port") from None
        return ""
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


STARTUP_S = 90.0  # a temporary server that does not answer this long after its start is a failure


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def temporary_server(env: dict[str, str], startup_s: float = STARTUP_S) -> Iterator[str]:
    """A Prefect API server (pipeline/ui_server.serve_temporary) for one run; yields its API URL and stops it at
    the end. Unlike the temporary server Prefect starts by itself, it is not in our process group: a signal to
    the group (`timeout`, a closed terminal) stops the run, which then reports its end to a server still up,
    instead of a stream of "Error logging to API" from a client whose server died with it."""
    port = _free_port()
    code = f"from pipeline.ui_server import serve_temporary; serve_temporary({port}, {os.getpid()})"
    server_env = {**env, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_API_HOST": "127.0.0.1",
                  "PREFECT_SERVER_API_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=server_env, start_new_session=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_s
        while server_home(port, env.get("PREFECT_API_AUTH_STRING")) is None:
            if proc.poll() is not None:
                raise UserError(f"the temporary Prefect server on 127.0.0.1:{port} exited with code "
                                f"{proc.returncode} before it answered (its error is above)")
            if time.monotonic() > deadline:
                raise UserError(f"the temporary Prefect server on 127.0.0.1:{port} did not answer within "
                                f"{startup_s:.0f} s")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()


def supervise(cmd: list[str], env: dict[str, str] | None = None, grace_s: float = GRACE_S,
              runs_first: float = 0.0) -> int:
    """Run a long-lived child until it exits or this process gets SIGINT / SIGTERM; then stop it: SIGTERM, and
    after `grace_s` SIGKILL to its whole process group. The handlers are installed explicitly, so a SIGINT
    works even when the shell started us with SIGINT ignored (`cmd &` in a script), and the child never outlives
    us. With `runs_first`, the flow runs the child started (a deployment's runner) get SIGTERM first and that many
    seconds to undo themselves and report their end, before the runner is stopped. Returns the child's exit code
    (130 / 143 when stopped by a signal)."""
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
            if runs_first:
                _stop_flow_runs(proc.pid, runs_first)
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


def _stop_flow_runs(pid: int, grace_s: float) -> None:
    """SIGTERM to the flow-run processes of the runner `pid`: each stops its stage and undoes itself as on Ctrl-C
    (pipeline/runs.py), while the server can still hear its end. Prefect 3.8's runner starts a served flow's run
    as a multiprocessing spawn child of its own (`... --multiprocessing-fork`), other runs as `python -m
    prefect.engine`; only its direct children are meant (a stage's loader workers are the run's to stop)."""
    import psutil

    def a_run(p: psutil.Process) -> bool:
        args = p.cmdline()
        return "--multiprocessing-fork" in args or "prefect.engine" in args

    try:
        runs = [p for p in psutil.Process(pid).children() if a_run(p)]
    except psutil.Error:
        return
    if runs:
        print(f"stopping {len(runs)} flow run(s); each undoes itself (up to {grace_s:.0f} s)...", file=sys.stderr)
    for p in runs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in runs):
        time.sleep(0.2)


def _running(p: Any) -> bool:
    """Not exited; a zombie (exited, its parent not yet told) counts as exited."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_group(pgid: int) -> None:
    """Whatever the child started (flow-run processes, dvc, stages) goes with it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
