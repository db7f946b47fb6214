"""Forward time of every attention variant in models/attention.py at N = 256, 1024, 4096 tokens (issue 7 benchmark).

    OMP_NUM_THREADS=2 python bench/bench_attention.py                 # CPU table
    python bench/bench_attention.py --device cuda                     # same table on GPU + xformers vs naive math

Times the attention op itself on given q, k, v of shape (batch, heads, N, dim); projections are left out because
they cost the same for every variant. Masks (YLG) are built once, outside the timed region, as a module does.
Prints a table (median milliseconds over --repeats samples) and the growth ratios t(4096) / t(1024), from the medians
and from the fastest samples (the figure least disturbed by other processes on a shared machine): the target is that
linear additive attention grows <= 5x where full attention grows ~16x. With --device cuda it also times xformers
against the naive math reference at 1024 tokens (target: xformers >= 2x faster).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/bench_attention.py` finds models/

import torch  # noqa: E402

from models.attention import (active_backend, attention, grid_attention, lada_attention,  # noqa: E402
                              window_attention, xformers_status, ylg_attention, ylg_head_masks)

SIZES = (256, 1024, 4096)


def sample_ms(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device, min_sample_s: float = 0.02
              ) -> list[float]:
    """`repeats` samples of the time per call, in ms. Each sample loops the call until it lasts at least
    `min_sample_s`, so microsecond-scale ops are not lost in timer and scheduler noise (one warm-up call first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()  # calibration call
    fn()
    sync()
    inner = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append(1000 * (time.perf_counter() - start) / inner)
    return samples


def variants(n: int, heads: int, dim: int, window: int, cell: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, Callable]:
    side = math.isqrt(n)
    assert side * side == n, f"N = {n} is not a square grid"
    grid = (side, side)
    w = torch.randn(heads, dim, device=device, dtype=dtype)
    ylg = ylg_head_masks(side, side, heads).to(device)
    return {
        "full": lambda q, k, v: attention(q, k, v),
        "causal": lambda q, k, v: attention(q, k, v, causal=True),
        f"window {window}": lambda q, k, v: window_attention(q, k, v, grid, window),
        f"shifted window {window}": lambda q, k, v: window_attention(q, k, v, grid, window, shift=window // 2),
        f"grid {cell}": lambda q, k, v: grid_attention(q, k, v, grid, cell),
        "lada": lambda q, k, v: lada_attention(q, k, v, w),
        "ylg": lambda q, k, v: ylg_attention(q, k, v, ylg),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="dimension per head")
    parser.add_argument("--window", type=int, default=8, help="Swin window side")
    parser.add_argument("--cell", type=int, default=16, help="TransGAN grid cell side")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cuda-batch", type=int, default=16, help="batch for the xformers vs math comparison")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    dtype = torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # the load average says how much other processes competed for the cores during the run
        load = os.getloadavg()[0]
        name = f"CPU, {torch.get_num_threads()} threads, load average {load:.1f} on {os.cpu_count()} cores"
    print(f"# attention forward time, ms (median of {args.repeats}); {name}; torch {torch.__version__}; "
          f"backend {active_backend(device)}; batch {args.batch}, heads {args.heads}, dim/head {args.dim}, {dtype}")

    table: dict[str, dict[int, list[float]]] = {}
    with torch.inference_mode():
        for n in SIZES:
            q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, device=device, dtype=dtype) for _ in range(3))
            for label, fn in variants(n, args.heads, args.dim, args.window, args.cell, device, dtype).items():
                print(f"  timing {label} at N={n}", file=sys.stderr)
                table.setdefault(label, {})[n] = sample_ms(lambda: fn(q, k, v), args.repeats, device)

    print(f"| {'variant':<18} | " + " | ".join(f"{f'N={n}':>8}" for n in SIZES) + " | t(4096)/t(1024) |")
    print(f"|{'-' * 20}|" + "|".join("-" * 10 for _ in SIZES) + f"|{'-' * 17}|")
    median = {label: {n: statistics.median(samples) for n, samples in row.items()} for label, row in table.items()}
    for label, times in median.items():
        cells = " | ".join(f"{times[n]:8.2f}" for n in SIZES)
        print(f"| {label:<18} | {cells} | {times[4096] / times[1024]:15.1f} |")
    # Other processes only ever add time, so the fastest sample is the estimate least disturbed by them.
    fastest = {label: {n: min(samples) for n, samples in row.items()} for label, row in table.items()}
    for stat, times in (("median", median), ("fastest sample", fastest)):
        full = times["full"][4096] / times["full"][1024]
        lada = times["lada"][4096] / times["lada"][1024]
        print(f"growth 1024 -> 4096 ({stat}): full {full:.1f}x (quadratic: 16x), lada {lada:.1f}x "
              f"(target <= 5x: {'met' if lada <= 5 else 'NOT met'})")

    if device.type == "cuda":
        compare_xformers(args, device)


def compare_xformers(args: argparse.Namespace, device: torch.device) -> None:
    """xformers memory_efficient_attention against the naive math reference, 1024 tokens, fp16."""
    if active_backend(device) != "xformers":
        print(f"xformers vs math: skipped, xformers does not run here ({xformers_status()})")
        return
    n = 1024
    q, k, v = (torch.randn(args.cuda_batch, args.heads, n, args.dim, device=device, dtype=torch.float16)
               for _ in range(3))
    with torch.inference_mode():
        times = {}
        for backend in ("xformers", "math", "sdpa"):
            run = lambda: attention(q, k, v, backend=backend)  # noqa: E731
            times[backend] = statistics.median(sample_ms(run, args.repeats, device))
    print(f"# N={n}, batch {args.cuda_batch}, heads {args.heads}, dim/head {args.dim}, float16")
    for backend, ms in times.items():
        print(f"| {backend:<8} | {ms:8.3f} ms |")
    speedup = times["math"] / times["xformers"]
    print(f"xformers is {speedup:.1f}x faster than naive math (target >= 2x: {'met' if speedup >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
