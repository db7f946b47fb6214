"""Environment every tokenmill entry point runs with.

Imported first by `pipeline/__init__.py`, so `python -m stages.<name>`, `python -m pipeline` and the Prefect flow
all see the same settings. Values already set by the user win.
"""
import os
import platform
import sys

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

# The same stage identity must give the same bytes on any x86-64 machine, and float results depend on the vector
# width of the kernels each library picks for the CPU: an AVX-512 machine trained a different VQGAN than the AVX2
# machine that recorded dvc.lock, and wrote the same bytes once these caps were set (measured; docs/results.md). So
# on a CPU with AVX2 every library that computes for a stage is held to its AVX2 code path, unless
# TOKENMILL_CPU_ISA=native. The bytes still depend on the thread count (parallel reductions split by thread), which
# run.json records beside the instruction set.
CPU_ISA_VAR = "TOKENMILL_CPU_ISA"
CPU_ISA_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",     # torch's own vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",      # oneDNN convolutions and matmuls
    "MKL_CBWR": "AVX2",                # MKL BLAS (torch's): the AVX2 branch, whatever the CPU's vendor
    "OPENBLAS_CORETYPE": "Haswell",    # numpy's OpenBLAS (FID statistics, float64): its AVX2 kernels
}


def cpu_isa_mode() -> str:
    """"avx2" (the default: capped for portable bytes) or "native"; anything else is a one-line error."""
    mode = os.environ.get(CPU_ISA_VAR, "avx2").strip().lower()
    if mode not in ("avx2", "native"):  # a user mistake: one line and exit status 2, as everywhere
        sys.stderr.write(f"error: {CPU_ISA_VAR}={os.environ[CPU_ISA_VAR]!r}: use avx2 (the default: the same bytes "
                         f"on any x86-64 machine) or native (the CPU's widest kernels)\n")
        raise SystemExit(2)
    return mode


def native_cpu_isa() -> str:
    """The widest vector instructions this CPU offers, from /proc/cpuinfo (libraries only say what they use)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "below AVX2" if flags else "unknown"


for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# Only where AVX2 exists: OpenBLAS runs a forced core type without checking the CPU can.
if cpu_isa_mode() == "avx2" and native_cpu_isa() in ("AVX2", "AVX512"):
    for _key, _value in CPU_ISA_CAPS.items():
        os.environ.setdefault(_key, _value)

# The commands tokenmill runs (dvc, prefect) come from the environment its interpreter belongs to, also when the
# virtual environment was not activated (`.venv/bin/python -m pipeline ...`).
_bin = os.path.dirname(os.path.abspath(sys.executable))
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
