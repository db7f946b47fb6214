"""What the AVX2 cap of pipeline/env.py costs: training throughput with the cap (the default) and with the CPU's
own kernels (TOKENMILL_CPU_ISA=native), measured in one run.

Each round runs bench/bench_train.py for the default VQGAN and the default GPT step, once per mode, in fresh
interpreters (the caps are read when torch loads), alternating which mode goes first. Prints the median rate of
each and the ratio capped / native. On a CPU without AVX-512 the two modes run the same kernels and the ratio is 1.

  python bench/bench_cpu_isa.py [--rounds 3] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.env import CPU_ISA_CAPS, native_cpu_isa  # noqa: E402
RATE = re.compile(r"([\d,]+(?:\.\d+)?) (images|tokens)/s")
MODES = ("avx2", "native")


def rate(what: str, mode: str, steps: int) -> tuple[float, str]:
    """(first images/s or tokens/s figure bench_train prints, the device line) for one fresh run."""
    env = {k: v for k, v in os.environ.items() if k not in CPU_ISA_CAPS}
    env["TOKENMILL_CPU_ISA"] = mode
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), what, "--device", "cpu",
                           "--warmup", "3", "--steps", str(steps)], env=env, capture_output=True, text=True,
                          check=True)
    match = RATE.search(done.stdout)
    if match is None:
        raise SystemExit(f"bench_cpu_isa: no rate in bench_train's output:\n{done.stdout}")
    return float(match.group(1).replace(",", "")), done.stdout.splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    print(f"# CPU offers {native_cpu_isa()}; load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds")
    for what, unit in (("vqgan", "images/s"), ("ar", "tokens/s")):
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                value, device = rate(what, mode, args.steps)
                rates[mode].append(value)
        med = {m: statistics.median(v) for m, v in rates.items()}
        print(f"{what:<6} capped to AVX2 {med['avx2']:10.1f} {unit}   native {med['native']:10.1f} {unit}   "
              f"capped / native {med['avx2'] / med['native']:.2f}   ({device})")


if __name__ == "__main__":
    main()
