"""`python -m pipeline ui` / `serve` run their long-lived Prefect process under pipeline.prefect_server.supervise:
a signal stops it within seconds, and the child never outlives its parent (an orphaned server kept port 4200)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The parent supervises a child that writes its pid, then sleeps; `stubborn` children ignore SIGTERM too.
PARENT = """
import sys
from pipeline.prefect_server import supervise
child = ("import os, signal, sys, time; "
         + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if sys.argv[2] == "stubborn" else "")
         + "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)")
sys.exit(supervise([sys.executable, "-c", child, sys.argv[1]], grace_s=2))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, the supervisor, may not have reaped it yet)
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize("sig, child", [(signal.SIGINT, "plain"), (signal.SIGTERM, "plain"),
                                        (signal.SIGTERM, "stubborn")])
def test_supervised_child_stops_with_its_parent(tmp_path, sig, child):
    pidfile = tmp_path / "child.pid"
    # started with SIGINT ignored, as `python -m pipeline ui &` in a script starts it
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pidfile), child], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 30
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(pidfile.read_text())
    start = time.monotonic()
    parent.send_signal(sig)
    try:
        code = parent.wait(timeout=15)
    finally:
        if parent.poll() is None:
            parent.kill()
    took = time.monotonic() - start
    assert code == 128 + sig, parent.stderr.read()
    assert took < 15
    deadline = time.monotonic() + 5
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child_pid)  # no orphan left holding the port


def test_a_server_that_asks_for_a_password_is_named_as_such():
    """A server started with TOKENMILL_PREFECT_AUTH answers its settings with 401: it used to be called "not this
    project's" (it does not say where it keeps its state)."""
    import http.server
    import threading

    from pipeline.errors import UserError
    from pipeline.prefect_server import server_home

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            ok = self.path == "/api/health" or self.headers.get("Authorization") == "Basic dTpwdw=="  # u:pw
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b'{"home": "/somewhere"}' if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with pytest.raises(UserError) as err:
            server_home(port)
        assert str(err.value) == (f"the Prefect server on 127.0.0.1:{port} asks for a password: set "
                                  f"TOKENMILL_PREFECT_AUTH=user:password as when it was started, or use --port")
        with pytest.raises(UserError, match="asks for a password other than the one given"):
            server_home(port, "u:wrong")
        assert server_home(port, "u:pw") == "/somewhere"
    finally:
        server.shutdown()


def _wait_gone(pid: int, seconds: float) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def test_the_temporary_server_is_out_of_the_run_group_and_ends_with_the_run(tmp_path):
    """`pipeline run` without a UI: a signal to the run's process group (`timeout`) must not reach the server (the
    run then reports its end to it), and the server must not outlive the run, even a SIGKILLed one."""
    import json
    import urllib.request

    code = """import json, os, sys, time
import psutil
from pipeline.prefect_server import temporary_server
with temporary_server(dict(os.environ)) as url:
    server = [p for p in psutil.Process().children() if "serve_temporary" in " ".join(p.cmdline())][0]
    print(json.dumps({"url": url, "pid": server.pid, "sid": os.getsid(server.pid)}), flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
alive = psutil.pid_exists(server.pid) and psutil.Process(server.pid).status() != "zombie"
print(json.dumps({"alive_after_exit": alive}))
"""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, "exit"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    first, last = (json.loads(line) for line in done.stdout.splitlines())
    assert first["url"].startswith("http://127.0.0.1:") and first["sid"] != os.getsid(0)  # a session of its own
    assert last == {"alive_after_exit": False}
    hung = subprocess.Popen([sys.executable, "-c", code, "hang"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    info = json.loads(hung.stdout.readline())
    with urllib.request.urlopen(info["url"] + "/health", timeout=10) as resp:
        assert resp.status == 200
    hung.kill()  # SIGKILL: no cleanup runs in the run's process; the server notices its parent is gone
    hung.wait()
    assert _wait_gone(info["pid"], 30)


# A runner stand-in that starts one "flow run" (its command line ends in --multiprocessing-fork, as the spawn child
# Prefect 3.8's runner starts for a served flow does) which needs 2 s after SIGTERM to undo itself.
RUNNER = """
import sys
from pipeline.prefect_server import supervise
run = ("import signal, sys, time\\n"
       "def stop(*a):\\n    time.sleep(2); open(sys.argv[1], 'w').write('undone'); sys.exit(143)\\n"
       "signal.signal(signal.SIGTERM, stop)\\nopen(sys.argv[1] + '.started', 'w').close()\\ntime.sleep(600)\\n")
runner = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], '--multiprocessing-fork']); "
          "time.sleep(600)")
sys.exit(supervise([sys.executable, "-c", runner, run, sys.argv[1]], grace_s=1, runs_first=30))
"""


def test_stopping_serve_lets_its_flow_runs_undo_themselves_first(tmp_path):
    """Ctrl-C on `pipeline serve` killed the runner's group after 8 s: a flow run in the middle of a stage never
    undid itself (params.yaml left edited, the journal left, the run 'Running' in the UI for ever)."""
    done = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", RUNNER, str(done)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not Path(f"{done}.started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    parent.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    assert parent.wait(timeout=60) == 130
    assert done.read_text() == "undone"
    assert "stopping 1 flow run(s); each undoes itself (up to 30 s)..." in parent.stderr.read()
    assert time.monotonic() - stopped < 20  # when the run is done, not when the 30 s are up


def test_ui_refuses_a_bad_port_and_a_port_another_program_holds(tmp_path):
    """--port 99999 printed the UI's address, then an OverflowError traceback; a port held by another program gave
    one line and then a traceback of Prefect's shutdown."""
    import socket

    cmd = [sys.executable, "-m", "pipeline", "ui", "--port"]
    proc = subprocess.run([*cmd, "99999"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        "tokenmill ui: error: argument --port: '99999' is not a TCP port (1..65535)")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([*cmd, str(port)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use by another program (Address already in use); use --port")
