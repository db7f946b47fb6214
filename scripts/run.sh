#!/usr/bin/env bash
# One command: set up (if needed) and run the default pipeline with DVC, then push outputs to the DVC remote.
# --tiny: instead, every stage on a small copy of the data in runs/tiny/ (python -m pipeline tiny), ~2 minutes.
# Stages whose inputs and params are unchanged are skipped, so a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
source .venv/bin/activate
if [ "${1:-}" = "--tiny" ]; then  # the first run: every stage on a small copy, in its own project (runs/tiny)
  shift
  exec python -m pipeline tiny "$@"
fi
python -c 'from pipeline.dvc_repair import repair_rwlock; repair_rwlock(".")'  # after a killed run
python -m pipeline check  # after the repair: a corrupt table of running stages makes `dvc status` fail
# --keep-going: a failing stage (one dataset's) skips only the stages that need it; DVC names it at the end
dvc repro --keep-going "$@"
dvc push -q || echo "run: dvc push to the default remote failed (outputs are still in the local cache)" >&2
