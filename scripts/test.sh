#!/usr/bin/env bash
# One command: set up (if needed) and run the test suite (CPU; ~6 min on 2 cores). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# One worker per core, each test module on one worker (its module fixtures are built once); `-n 0` runs serially.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadscope "$@"
