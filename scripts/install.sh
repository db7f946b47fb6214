#!/usr/bin/env bash
# Set-up, idempotent: .venv with every requirement (torch pinned by requirements/constraints.txt), the project
# installed editable, and the embedded dataset (Debian package dataset-fashion-mnist).
# A re-run with unchanged requirement files only checks the stamp. CUDA machines get faiss-gpu instead of faiss-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  REQ=requirements/cuda.txt
else
  REQ=requirements/cpu.txt
fi
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1) $REQ"
stamp=.venv/.tokenmill-installed

pip_quiet() {  # this machine's pip config names index folders that may be absent: hide only that warning
  .venv/bin/python -m pip "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "install: creating .venv and installing $REQ (a few minutes the first time)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip_quiet install -q -c requirements/constraints.txt -r "$REQ"
  pip_quiet install -q --no-deps -r requirements/nodeps.txt
  pip_quiet install -q --no-deps --no-build-isolation -e .
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
