#!/usr/bin/env bash
# One command: set up (if needed) and run the test suite (CPU, under 10 minutes). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
