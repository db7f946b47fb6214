"""Benchmark of the evaluation core, one run:

(a) bare FID-network throughput on ready 299x299 inputs,
(b) full extraction throughput: PNG decode of small uint8 images, resize to 299, scaling, network — through
    `extract_features`, at the same batch size — and the ratio b / a (target >= 0.90),
(c) `frechet_distance` on 2048-d covariances against the plain eigvals reference,
(d) per-class FID, 200 vs 200 samples of 2048-d features: the low-rank route (`frechet_distance_low_rank`,
    the 200 x 200 cross-Gram) against the 2048 x 2048 covariance route, with the ratio (target >= 20x) and the
    relative difference (target <= 1e-6),
(e) the metric time of `evaluate` after feature extraction at the tiny preset's sizes (configs/tiny.yaml: 64
    reference vs 64 generated 2048-d features, 10 classes, KID 10 subsets of 32): gFID, KID, precision/recall
    and the per-class FIDs, as the stage computes them (target <= 30 s).

(a) and (b) alternate batch by batch and their times are summed, so load from other processes that drifts
during the run hits both alike.

Usage: OMP_NUM_THREADS=2 python bench/bench_fid.py [--n-images 64] [--batch-size 16]
       OMP_NUM_THREADS=2 python bench/bench_fid.py --only-frechet    # (c), (d), (e): no FID network needed
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from pipeline.fid_reference import open_network  # noqa: E402
from pipeline.fid import (Protocol, compute_metrics, extract_features, frechet_distance,  # noqa: E402
                          frechet_distance_features, frechet_distance_low_rank, frechet_distance_reference, stats,
                          to_inception_input)


def encode_pngs(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode_batches(pngs: list[bytes], batch_size: int):
    """What an evaluation reads from shards: PNG bytes -> uint8 N x H x W x C batches."""
    for start in range(0, len(pngs), batch_size):
        yield np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs[start:start + batch_size]])


@torch.inference_mode()
def time_bare(net: torch.nn.Module, inputs: torch.Tensor) -> float:
    start = time.perf_counter()
    net(inputs)
    return time.perf_counter() - start


def time_full(net: torch.nn.Module, pngs: list[bytes], batch_size: int, mode: str) -> float:
    start = time.perf_counter()
    feats = extract_features(decode_batches(pngs, batch_size), net, batch_size, mode, progress=False)
    elapsed = time.perf_counter() - start
    assert feats.shape == (len(pngs), 2048)
    return elapsed


def bench_frechet(dim: int, seed: int, repeats: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim))
    b = rng.standard_normal((dim, dim // 2))  # rank-deficient, like a covariance from fewer samples than dims
    sigma1, sigma2 = a @ a.T / dim, b @ b.T / dim
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # Interleaved, best of `repeats`: the minimum is the time least disturbed by other processes.
    t_fast, t_ref = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fast = frechet_distance(mu1, sigma1, mu2, sigma2)
        t_fast = min(t_fast, time.perf_counter() - start)
        start = time.perf_counter()
        ref = frechet_distance_reference(mu1, sigma1, mu2, sigma2)
        t_ref = min(t_ref, time.perf_counter() - start)
    print(f"(c) frechet_distance {dim}-d (one full-rank, one rank-{dim // 2} covariance), best of {repeats}:")
    print(f"    frechet_distance       {t_fast:7.2f} s   FD = {fast:.10g}")
    print(f"    eigvals(S1 @ S2) ref   {t_ref:7.2f} s   FD = {ref:.10g}")
    print(f"    relative difference    {abs(fast - ref) / abs(ref):.2e}   speed-up x{t_ref / t_fast:.2f}")


def bench_per_class(n: int, dim: int, seed: int, repeats: int) -> None:
    rng = np.random.default_rng(seed)
    # pool3-like: non-negative, correlated through a few shared factors, some dead features.
    mix = np.abs(rng.standard_normal((32, dim))) / 8
    feats = [np.maximum(rng.standard_normal((n, 32)) @ mix + 0.3 * rng.standard_normal((n, dim)) + shift, 0)
             for shift in (0.0, 0.05)]
    for f in feats:
        f[:, :dim // 50] = 0.0
    t_low, t_full = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        low = frechet_distance_low_rank(*feats)
        t_low = min(t_low, time.perf_counter() - start)
        start = time.perf_counter()
        full = frechet_distance(*stats(feats[0]), *stats(feats[1]))  # what per-class FID did before
        t_full = min(t_full, time.perf_counter() - start)
    ratio, rel = t_full / t_low, abs(low - full) / abs(full)
    print(f"(d) per-class FID, {n} vs {n} samples of {dim}-d features, best of {repeats}:")
    print(f"    low-rank (cross-Gram)  {t_low:7.3f} s   FD = {low:.10g}")
    print(f"    covariances (d x d)    {t_full:7.3f} s   FD = {full:.10g}")
    print(f"    speed-up x{ratio:.1f} (target >= 20: {'ok' if ratio >= 20 else 'BELOW TARGET'}), relative "
          f"difference {rel:.1e} (target <= 1e-6: {'ok' if rel <= 1e-6 else 'ABOVE TARGET'})")


def bench_tiny_metrics(dim: int, seed: int, n: int = 64, classes: int = 10) -> None:
    rng = np.random.default_rng(seed)
    mix = np.abs(rng.standard_normal((32, dim))) / 8
    real, fake = (np.maximum(rng.standard_normal((n, 32)) @ mix + 0.3 * rng.standard_normal((n, dim)) + s, 0)
                  for s in (0.0, 0.05))
    labels = np.arange(n) % classes
    protocol = Protocol(n_gen=n, n_ref=n, ref_split="val", resize_mode="tf_bilinear", feature_network_hash="bench",
                        seed=0, kid_subset_size=32, kid_subsets=10)
    real_stats = stats(real)  # the stage loads these from the reference
    start = time.perf_counter()
    metrics = compute_metrics(real, fake, protocol, real_stats=real_stats, prefix="g")
    per_class = [frechet_distance_features(real[labels == c], fake[labels == c]) for c in range(classes)]
    seconds = time.perf_counter() - start
    print(f"(e) evaluate's metrics at the tiny preset's sizes ({n} vs {n}, {dim}-d, {classes} classes): "
          f"{seconds:.2f} s (target <= 30: {'ok' if seconds <= 30 else 'ABOVE TARGET'}); gFID "
          f"{metrics['gfid']['value']:.4g}, per-class FID {min(per_class):.4g}..{max(per_class):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over the images for (a) and (b); runs of each method in (c)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the uint8 images in (b)")
    parser.add_argument("--mode", default="tf_bilinear", choices=["tf_bilinear", "clean_bicubic"])
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension for (c)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class-n", type=int, default=200, help="samples per side in (d)")
    parser.add_argument("--only-frechet", action="store_true", help="run (c), (d), (e) only: no FID network")
    args = parser.parse_args()
    if args.only_frechet:
        bench_frechet(args.dim, args.seed, args.repeats)
        bench_per_class(args.per_class_n, args.dim, args.seed, args.repeats)
        bench_tiny_metrics(args.dim, args.seed)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    net = open_network(device=args.device)
    pngs = encode_pngs(args.n_images, args.image_size, args.seed)
    inputs = to_inception_input(next(decode_batches(pngs, args.n_images)), args.mode).to(args.device)
    time_bare(net, inputs[:args.batch_size])  # warm-up: oneDNN builds its kernels on first use

    # Batch by batch, alternating which path goes first: load from other processes on a shared machine
    # changes over seconds, so neighbouring measurements see the same conditions.
    bare, full = 0.0, 0.0
    for rep in range(args.repeats):
        for i, start in enumerate(range(0, args.n_images, args.batch_size)):
            stop = start + args.batch_size
            if (rep + i) % 2 == 0:
                bare += time_bare(net, inputs[start:stop])
                full += time_full(net, pngs[start:stop], args.batch_size, args.mode)
            else:
                full += time_full(net, pngs[start:stop], args.batch_size, args.mode)
                bare += time_bare(net, inputs[start:stop])
    n = args.repeats * args.n_images
    rate_bare, rate_full = n / bare, n / full
    print(f"(a) bare network       {rate_bare:7.2f} images/s  ({n} images of 299x299, batch {args.batch_size})")
    print(f"(b) full extraction    {rate_full:7.2f} images/s  ({n} PNGs of {args.image_size}x{args.image_size}, "
          f"decode + {args.mode} resize + scale + network)")
    verdict = "ok" if rate_full / rate_bare >= 0.90 else "BELOW TARGET"
    print(f"    ratio b/a          {rate_full / rate_bare:7.3f}  (target >= 0.90: {verdict})")
    bench_frechet(args.dim, args.seed, args.repeats)
    bench_per_class(args.per_class_n, args.dim, args.seed, args.repeats)
    bench_tiny_metrics(args.dim, args.seed)


if __name__ == "__main__":
    main()
