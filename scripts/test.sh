#!/usr/bin/env bash
# One command: set up (if needed) and run the test suite (CPU; 6-7.5 min on 2 cores in the last two fresh-clone
# runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# One worker per usable core, at most 8, each test module on one worker (its module fixtures are built once);
# `-n 0` runs serially. Cores: this process's affinity and a container's CPU quota (cgroup v2), not the host's count
# that `-n auto` reads.
workers=$(.venv/bin/python -c '
import os
n = len(os.sched_getaffinity(0))
try:
    quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
    n = n if quota == "max" else min(n, int(quota) // int(period))
except (OSError, ValueError):
    pass
print(max(1, min(n, 8)))')
# --no-loadscope-reorder: modules in collection order, longest first (tests/conftest.py), not by their test count
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadscope --no-loadscope-reorder "$@"
