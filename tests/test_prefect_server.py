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
