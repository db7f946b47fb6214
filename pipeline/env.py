"""Environment every tokenmill entry point runs with.

Imported first by `pipeline/__init__.py`, so `python -m stages.<name>`, `python -m pipeline` and the Prefect flow
all see the same settings. Values already set by the user win.
"""
import os

DEFAULTS = {
    # Offline machines: telemetry calls only time out, and nobody asked for them.
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # OpenMP threads that spin while waiting collapse throughput (seen: 50x slower steps) whenever another
    # process shares the cores; passive waiting costs little on an idle machine. Read when torch loads, so
    # this module must be imported before torch (stages/__init__.py and pipeline/__init__.py do).
    "OMP_WAIT_POLICY": "PASSIVE",
    # Keep Prefect's own logs readable and quiet on stdout.
    "PREFECT_LOGGING_LEVEL": "INFO",
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)

# The commands tokenmill runs (dvc, prefect) come from the environment its interpreter belongs to, also when the
# virtual environment was not activated (`.venv/bin/python -m pipeline ...`).
_bin = os.path.dirname(os.path.abspath(__import__("sys").executable))
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
