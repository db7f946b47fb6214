#!/usr/bin/env bash
# Set-up, idempotent: .venv with every requirement (torch pinned by a constraint file), the project installed
# editable, and the embedded dataset (Debian package dataset-fashion-mnist).
# A re-run with unchanged requirement files only checks the stamp.
# CPU machines: requirements/cpu.txt with constraints.txt (torch 2.13.0, faiss-cpu).
# CUDA machines (nvidia-smi sees a GPU): requirements/cuda.txt with constraints-cuda.txt, i.e. the torch build the
# pinned xformers was compiled for (its C++/CUDA extension loads only beside that one) and faiss-gpu-cu12; then
# `python -m pipeline.doctor --pair --require-cuda` checks the installed pair and the install fails loudly if the
# extension would not load.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  REQ=requirements/cuda.txt CONSTRAINTS=requirements/constraints-cuda.txt PAIR_ARGS=--require-cuda
else
  REQ=requirements/cpu.txt CONSTRAINTS=requirements/constraints.txt PAIR_ARGS=
fi
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1) $REQ"
stamp=.venv/.tokenmill-installed

pip_quiet() {  # this machine's pip config names index folders that may be absent: hide only that warning
  .venv/bin/python -m pip "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "install: creating .venv and installing $REQ (a few minutes the first time)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  if [ "$REQ" = requirements/cuda.txt ] && .venv/bin/python -m pip show -q faiss-cpu >/dev/null 2>&1; then
    pip_quiet uninstall -q -y faiss-cpu  # same `faiss` module as faiss-gpu-cu12: the two must not coexist
  fi
  # pip byte-compiles what it installs (40 of these 110 s on 2 cores); kept: where PYTHONDONTWRITEBYTECODE=1 (this
  # machine, its CI) Python would otherwise recompile torch in every process (measured: suite 11.3 min, not 7.7)
  pip_quiet install -q -c "$CONSTRAINTS" -r "$REQ"
  pip_quiet install -q --no-deps -r requirements/nodeps.txt
  pip_quiet install -q --no-deps --no-build-isolation -e .
  # xformers against torch: on CUDA a mismatch (or a CPU torch) stops here, before the stamp is written
  if ! .venv/bin/python -m pipeline.doctor --pair $PAIR_ARGS; then
    echo "install: FAILED: the installed torch and xformers do not match (see the error above);" \
         "attention would silently run on torch sdpa" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install: installing Debian package dataset-fashion-mnist" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "install: apt-get could not install dataset-fashion-mnist" >&2
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      >/dev/null || echo "install: apt-get could not install dataset-fashion-mnist" >&2
  fi
fi
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  cat >&2 <<MSG
install: the embedded dataset is missing ($FMNIST).
  On Debian/Ubuntu as root: apt-get install dataset-fashion-mnist
  Elsewhere: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
  t10k-labels-idx1-ubyte.gz (the Fashion-MNIST release files) in a folder and set datasets.fashion_mnist.path
  in params.yaml to that folder. The test suite does not need it.
MSG
fi
