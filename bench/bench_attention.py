"""Forward time of every attention variant in models/attention.py at N = 256, 1024, 4096 tokens (issues 7 and 19).

    OMP_NUM_THREADS=2 python bench/bench_attention.py                 # CPU table
    OMP_NUM_THREADS=2 python bench/bench_attention.py --flex          # + FlexAttention on the YLG pattern (compiles)
    python bench/bench_attention.py --device cuda                     # same table on GPU + xformers vs naive math

Times the attention op itself on given q, k, v of shape (batch, heads, N, dim); projections are left out because
they cost the same for every variant. Masks (YLG) are built once, outside the timed region, as a module does.
Prints a table (median milliseconds over --repeats samples) and the growth ratios t(4096) / t(1024), from the medians
and from the fastest samples (the figure least disturbed by other processes on a shared machine): the target is that
linear additive attention grows <= 5x where full attention grows ~16x. With --device cuda it also times xformers
against the naive math reference at 1024 tokens (target: xformers >= 2x faster).

YLG runs two ways: "ylg dense mask" (the (H, N, N) masks through `attention`, the reference) and "ylg sparse" (the
SparseLayout through `sparse_attention`, what YLGAttention picks from 256 tokens on). For those two and full attention
it also reports the peak memory of one forward (bytes of tensors alive at once, counted per aten op) and the one-off
setup (building the masks / the layout; the sparse path compiles nothing). Targets (issue 19): ylg sparse faster than
full attention at 4096 tokens, growth 1024 -> 4096 <= 10x, peak memory growing as N sqrt N (8x), not N^2 (16x).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/bench_attention.py` finds models/

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from models.attention import (active_backend, attention, grid_attention, lada_attention,  # noqa: E402
                              window_attention, xformers_status, ylg_attention, ylg_head_masks, ylg_layout)

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
    layout = ylg_layout(side, side, heads).to(device)
    return {
        "full": lambda q, k, v: attention(q, k, v),
        "causal": lambda q, k, v: attention(q, k, v, causal=True),
        f"window {window}": lambda q, k, v: window_attention(q, k, v, grid, window),
        f"shifted window {window}": lambda q, k, v: window_attention(q, k, v, grid, window, shift=window // 2),
        f"grid {cell}": lambda q, k, v: grid_attention(q, k, v, grid, cell),
        "lada": lambda q, k, v: lada_attention(q, k, v, w),
        "ylg dense mask": lambda q, k, v: ylg_attention(q, k, v, ylg),
        "ylg sparse": lambda q, k, v: ylg_attention(q, k, v, layout),
    }


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors alive at once while the mode is active, counting every tensor an aten op creates (not
    views: they share their base's storage) until it is freed. Kernel-internal scratch is not seen: for sdpa's fused
    CPU kernel that is a few blocks per thread, for the math path every intermediate is an op output and counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view() and t.untyped_storage().nbytes():
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                weakref.finalize(t, self._freed, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def peak_mib(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Peak memory of one call in MiB: CUDA's allocator statistics on GPU, PeakMemory on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with torch.no_grad(), PeakMemory() as mem:  # no_grad, not inference_mode: views must keep their base alive
        fn()
    return mem.peak / 2 ** 20


def ylg_report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               median: dict[str, dict[int, float]], fastest: dict[str, dict[int, float]]) -> None:
    """YLG sparse vs dense mask vs full attention: time (from the table), setup cost, peak memory, growth."""
    paths = ("full", "ylg dense mask", "ylg sparse")
    setup_ms: dict[str, dict[int, float]] = {"ylg dense mask": {}, "ylg sparse": {}}
    peak: dict[str, dict[int, float]] = {path: {} for path in paths}

    def build_ms(build: Callable[[], object]) -> tuple[object, float]:
        """The built pattern and the fastest of 3 build times (a one-off cost, timed under the same noise)."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            built = build()
            times.append(1000 * (time.perf_counter() - start))
        return built, min(times)

    for n in (1024, 4096):
        side = math.isqrt(n)
        masks, setup_ms["ylg dense mask"][n] = build_ms(lambda: ylg_head_masks(side, side, args.heads).to(device))
        layout, setup_ms["ylg sparse"][n] = build_ms(lambda: ylg_layout(side, side, args.heads).to(device))
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, device=device, dtype=dtype) for _ in range(3))
        runs = {"full": lambda: attention(q, k, v), "ylg dense mask": lambda: ylg_attention(q, k, v, masks),
                "ylg sparse": lambda: ylg_attention(q, k, v, layout)}
        for path in paths:
            print(f"  peak memory of {path} at N={n}", file=sys.stderr)
            peak[path][n] = peak_mib(runs[path], device)
        stored = {"ylg dense mask": masks.numel() * masks.element_size(), "ylg sparse": layout.nbytes()}
        print(f"# N={n}: pattern held by the module: dense masks {stored['ylg dense mask'] / 2 ** 20:.2f} MiB, "
              f"sparse layout {stored['ylg sparse'] / 2 ** 20:.2f} MiB; query-key pairs per batch element: "
              f"full/dense {args.heads * n * n}, sparse {layout.logits()}")
    print(f"| {'path':<14} | {'ms N=1024':>9} | {'ms N=4096':>9} | {'growth':>6} | {'MiB N=1024':>10} | "
          f"{'MiB N=4096':>10} | {'growth':>6} | {'setup ms N=4096':>15} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 17}|")
    # times: medians; setup: building the pattern once (fastest of 3); MiB: peak of one forward
    for path in paths:
        t, m = median[path], peak[path]
        setup = f"{setup_ms[path][4096]:15.1f}" if path in setup_ms else f"{'-':>15}"
        print(f"| {path:<14} | {t[1024]:9.2f} | {t[4096]:9.2f} | {t[4096] / t[1024]:5.1f}x | {m[1024]:10.2f} | "
              f"{m[4096]:10.2f} | {m[4096] / m[1024]:5.1f}x | {setup} |")
    mem_growth = peak["ylg sparse"][4096] / peak["ylg sparse"][1024]
    print(f"ylg sparse peak memory growth 1024 -> 4096: {mem_growth:.1f}x (N sqrt N: 8x, N^2: 16x; the dense mask "
          f"path: {peak['ylg dense mask'][4096] / peak['ylg dense mask'][1024]:.1f}x)")
    for stat, times in (("median", median), ("fastest sample", fastest)):
        sparse, full = times["ylg sparse"], times["full"]
        speedup, growth = full[4096] / sparse[4096], sparse[4096] / sparse[1024]
        print(f"ylg sparse at N=4096 ({stat}): {speedup:.1f}x faster than full attention (target > 1x: "
              f"{'met' if speedup > 1 else 'NOT met'}), {times['ylg dense mask'][4096] / sparse[4096]:.1f}x faster "
              f"than the dense mask; growth 1024 -> 4096 {growth:.1f}x (target <= 10x: "
              f"{'met' if growth <= 10 else 'NOT met'})")


def flex_report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """FlexAttention (torch.compile) on the same YLG pattern, for comparison: block-mask build, compile, steady."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        print(f"flex attention: not available in torch {torch.__version__} ({exc})")
        return
    compiled = torch.compile(flex_attention)
    for n in (1024, 4096):
        side = math.isqrt(n)
        masks = ylg_head_masks(side, side, args.heads).to(device)
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, device=device, dtype=dtype) for _ in range(3))
        start = time.perf_counter()
        block_mask = create_block_mask(lambda b, h, qi, ki: masks[h, qi, ki], None, args.heads, n, n,
                                       device=str(device))
        build_s = time.perf_counter() - start
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                compiled(q, k, v, block_mask=block_mask)
                first_s = time.perf_counter() - start
                ms = statistics.median(sample_ms(lambda: compiled(q, k, v, block_mask=block_mask),
                                                 args.repeats, device))
        except Exception as exc:  # no C compiler, unsupported backend: say so, the sparse path does not need it
            print(f"flex attention at N={n}: failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
            return
        print(f"flex attention, ylg pattern, N={n}: block mask {build_s:.1f} s, first call (compile) "
              f"{first_s:.1f} s, then {ms:.2f} ms per forward")


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
    parser.add_argument("--flex", action="store_true", help="also time torch.compile'd FlexAttention on the YLG "
                        "pattern (minutes of compile on CPU; needs a C compiler)")
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

    ylg_report(args, device, dtype, median, fastest)
    if args.flex:
        flex_report(args, device, dtype)
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
