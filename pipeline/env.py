"""Environment every tokenmill entry point runs with.

Imported first by `pipeline/__init__.py`, so `python -m stages.<name>`, `python -m pipeline` and the Prefect flow
all see the same settings. Values already set by the user win.
"""
import os

DEFAULTS = {
    # Offline machines: telemetry calls only time out, and nobody asked for them.
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Keep Prefect's own logs readable and quiet on stdout.
    "PREFECT_LOGGING_LEVEL": "INFO",
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
