#!/usr/bin/env bash
# The GPU check: one script, a few minutes on one GPU (budget: under 8), run after `bash scripts/install.sh`.
# Prints, then writes bench/RESULTS.md with the device named:
#   doctor      torch/CUDA build, device, bf16, the xformers/torch pair, usable fMHA operators per attention shape
#   tests       the CUDA tests (tests/test_doctor.py, the xformers tests of tests/test_attention.py)
#   attention   xformers vs sdpa vs math at 1k and 4k tokens per mask kind, fwd+bwd bf16   (bench/gpu_check.py)
#   gpt_100m    GPT-100M training tokens/s and MFU in bf16, configs/gpt_100m.yaml          (bench/bench_train.py)
#   vqgan_256   256 px f=16 VQGAN training images/s, configs/vqgan_256_f16.yaml           (bench/bench_train.py)
#   inception   FID feature extraction images/s at batch 500                               (bench/gpu_check.py)
#   search      faiss-gpu vs torch nearest-code lookup on 16k codes                        (bench/gpu_check.py)
#
#   bash bench/gpu_check.sh               on a CUDA machine; refuses (exit 1, one line) where there is none
#   bash bench/gpu_check.sh --cpu-smoke   every piece at toy sizes on the CPU, to check the script; writes its report
#                                         to $RESULTS or a temp file, never to bench/RESULTS.md
# A failing section is recorded as FAILED in the report and the script exits 1 after writing it. The report is
# rendered after every section into <report>.partial and renamed when the check ends. PYTHON picks the interpreter
# (default .venv/bin/python); GPU_CHECK_COMMIT names the commit of a tree copied without .git. A machine with its
# own torch and no package index: bench/offline_kit.py (docs/running.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1

smoke=0
case "${1:-}" in
  --cpu-smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac

if [ "$smoke" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is false):" \
         "nothing measured, bench/RESULTS.md not written" >&2
    exit 1
  fi
  out=${RESULTS:-bench/RESULTS.md}
  dev=cuda
else
  out=${RESULTS:-$(mktemp "${TMPDIR:-/tmp}/gpu_check_smoke.XXXXXX.md")}
  dev=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

device=$("$PY" - "$dev" <<'PY'
import sys, torch
if sys.argv[1] == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible")
else:
    print("CPU smoke run: toy sizes, not a measurement")
PY
) || device="unknown device (torch could not say)"
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
failed=()
sections=()

# render [NOTE]: the report of the sections run so far, into $out.partial; the last render is renamed to $out, so a
# check cut short (a time limit, a lost machine) still leaves what it measured, under a name that says so
render() {
  local total=$((SECONDS - t0))
  {
    echo "# GPU check results"
    echo
    flag=$([ "$smoke" = 1 ] && echo " --cpu-smoke" || true)
    # GPU_CHECK_COMMIT names the commit where the tree came without its .git (a copied working tree)
    commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
    dirty=$([ -n "${GPU_CHECK_COMMIT:-}" ] || git diff --quiet HEAD 2>/dev/null || echo " (with local changes)")
    echo "Device: **$device**${driver:+, driver $driver}. Made by \`bash bench/gpu_check.sh$flag\`"
    echo "at commit $commit$dirty, $(date -u '+%Y-%m-%d %H:%M UTC'); the whole check took ${total} s${1:+ so far (${1})}."
    echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)."
    echo "Targets: xformers >= 2x math and >= 1x sdpa with equal outputs within bf16 tolerance; GPT-100M MFU >= 40%."
    for name in "${sections[@]}"; do
      echo
      echo "## $name: $(cat "$work/$name.status")"
      echo
      echo "\`$(cat "$work/$name.cmd")\`"
      echo
      echo '```text'
      cat "$work/$name.out"
      echo '```'
      if grep -q FAILED "$work/$name.status"; then  # why it failed: the end of its stderr
        echo
        echo "stderr, last 20 lines:"
        echo
        echo '```text'
        tail -n 20 "$work/$name.err"
        echo '```'
      fi
    done
  } > "$out.partial"
}

# section NAME TIMEOUT_S CMD...: run it, show its output live, keep stdout for the report (and the end of
# stderr when it fails: otherwise stderr is progress only)
section() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc=0
  echo "== $name: $*"
  { timeout "$limit" "$@" 2> >(tee "$work/$name.err" >&2) | tee "$work/$name.out"; rc=${PIPESTATUS[0]}; } || true
  local secs=$((SECONDS - start)) status=ok
  if [ "$rc" != 0 ]; then
    status="FAILED (exit $rc)"
    [ "$rc" != 124 ] || status="FAILED (over its ${limit} s limit)"
    failed+=("$name")
  fi
  echo "   $name: $status, ${secs} s"
  printf '%s\n' "$*" > "$work/$name.cmd"
  echo "$status, ${secs} s" > "$work/$name.status"
  sections+=("$name")
  render "after $name"
}

if [ "$smoke" = 0 ]; then
  section doctor 180 "$PY" -m pipeline.doctor
  section tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_doctor.py tests/test_attention.py \
    -k "doctor or xformers"
  section attention 300 "$PY" bench/gpu_check.py attention
  section gpt_100m 240 "$PY" bench/bench_train.py ar --preset configs/gpt_100m.yaml --grid 16 --vocab 16384 \
    --device cuda --warmup 3 --steps 20
  section vqgan_256 240 "$PY" bench/bench_train.py vqgan --preset configs/vqgan_256_f16.yaml --resolution 256 \
    --channels 3 --device cuda --warmup 2 --steps 10
  section inception 180 "$PY" bench/gpu_check.py inception --batch-size 500
  section search 120 "$PY" bench/gpu_check.py search
else
  section doctor 180 "$PY" -m pipeline.doctor
  section attention 300 "$PY" bench/gpu_check.py attention --cpu-smoke
  section gpt_100m 300 "$PY" bench/bench_train.py ar --device cpu --warmup 1 --steps 1
  section vqgan_256 300 "$PY" bench/bench_train.py vqgan --device cpu --warmup 1 --steps 1
  section inception 300 "$PY" bench/gpu_check.py inception --cpu-smoke
  section search 120 "$PY" bench/gpu_check.py search --cpu-smoke
fi
render
mv "$out.partial" "$out"
echo "gpu_check: $((SECONDS - t0)) s; report written to $out${failed:+; FAILED: ${failed[*]}}"
[ "${#failed[@]}" = 0 ]
