"""The GPU check's own measurements; bench/gpu_check.sh runs them (training speed comes from bench/bench_train.py).

  attention  xformers vs torch sdpa vs plain math attention, forward + backward in bf16, at 1k and 4k tokens for each
             mask kind the project uses (causal; Swin shifted windows with a relative-position bias; YLG masks;
             KV-cache bottom-right causal), through the project's own functions. Outputs and q/k/v gradients are
             compared with an fp32 math reference. Targets: xformers >= 2x math and >= 1x sdpa.
  inception  FID feature extraction, images/s at batch 500: the bare network on ready 299x299 input, and the whole
             pipeline.fid.extract_features path from uint8 256x256 images (copy, resize on the device, network).
  search     nearest-code lookup against a 16k-code codebook: faiss-gpu flat index (k=2, as stages.tokenize.CodeSearch
             runs it) vs the torch matmul-argmin (models.quantizer.nearest_codes), and how often they agree.

  python bench/gpu_check.py attention            # on a CUDA machine
  python bench/gpu_check.py attention --cpu-smoke  # toy sizes on the CPU: checks the script, measures nothing
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import env  # noqa: E402,F401  (OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_attention import sample_ms  # noqa: E402  (same directory: timing loop with warm-up and CUDA sync)
from models.attention import (active_backend, attention, window_attention, xformers_status,  # noqa: E402
                              ylg_attention, ylg_head_masks)

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 relative to the value. Each backend rounds its inputs, the
# scores or probabilities and the output to bf16 a bounded number of times, so the relative (Frobenius) error of
# the result against an fp32 reference is a small multiple of u; the backward pass chains two more products.
BF16_U = 2.0 ** -8
TOL_OUT, TOL_GRAD = 4 * BF16_U, 8 * BF16_U
WINDOW = 8


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB); torch {torch.__version__}"
    import os
    return (f"CPU smoke ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}): toy sizes, not a "
            f"measurement; torch {torch.__version__}")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- attention

def mask_kinds(n: int, heads: int, new_tokens: int, device: torch.device, dtype: torch.dtype
               ) -> dict[str, tuple[int, Callable]]:
    """kind -> (query length, fn(q, k, v, backend)) running the project's attention for that mask kind."""
    side = math.isqrt(n)
    g = torch.Generator(device=device).manual_seed(1)
    rel_bias = 0.1 * torch.randn(heads, WINDOW * WINDOW, WINDOW * WINDOW, device=device, generator=g).to(dtype)
    ylg = ylg_head_masks(side, side, heads).to(device)
    return {
        "causal": (n, lambda q, k, v, b: attention(q, k, v, causal=True, backend=b)),
        "window bias": (n, lambda q, k, v, b: window_attention(q, k, v, (side, side), WINDOW, shift=WINDOW // 2,
                                                               bias=rel_bias, backend=b)),
        "YLG mask": (n, lambda q, k, v, b: ylg_attention(q, k, v, ylg, backend=b)),
        "KV cache": (new_tokens, lambda q, k, v, b: attention(q, k, v, causal=True, backend=b)),
    }


def bench_attention(args: argparse.Namespace, device: torch.device) -> None:
    smoke = args.cpu_smoke
    sizes = (64, 256) if smoke else (1024, 4096)
    heads, dim = (4, 16) if smoke else (args.heads, args.dim)
    tokens_per_batch = 256 if smoke else args.tokens_per_batch
    new_tokens = 16 if smoke else args.new_tokens
    dtype = torch.bfloat16
    backends = ["sdpa", "math"]
    if device.type == "cuda" and active_backend(device) == "xformers":
        backends.insert(0, "xformers")
    print(f"# attention forward+backward, bf16, {heads} heads x {dim}; batch = {tokens_per_batch} tokens / N; "
          f"KV cache: {new_tokens} new queries against N cached keys; {device_line(device)}")
    if "xformers" not in backends:
        why = "no CUDA" if device.type != "cuda" else xformers_status()
        print(f"xformers: not measured ({why}); attention falls back to torch sdpa")
    print(f"| {'mask':<11} | {'N':>5} | " + " | ".join(f"{b + ' ms':>11}" for b in backends)
          + " | x/math | x/sdpa | max rel err out / grads (tol " + f"{TOL_OUT:.4f} / {TOL_GRAD:.4f})")
    verdicts = []
    for n in sizes:
        batch = max(1, tokens_per_batch // n)
        for kind, (m, fn) in mask_kinds(n, heads, new_tokens, device, dtype).items():
            g = torch.Generator(device=device).manual_seed(n)
            q, k, v = (torch.randn(batch, heads, s, dim, device=device, generator=g) for s in (m, n, n))
            grad_out = torch.randn(batch, heads, m, dim, device=device, generator=g)
            # fp32 reference from the very bf16 values the backends see
            ref_in = [t.to(dtype).float().requires_grad_() for t in (q, k, v)]
            ref_out = fn(*ref_in, "math")
            ref_out.backward(grad_out)
            ref = [ref_out.detach()] + [t.grad for t in ref_in]
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            g_bf16 = grad_out.to(dtype)

            def step(backend: str) -> list[torch.Tensor]:
                for t in leaves:
                    t.grad = None
                out = fn(*leaves, backend)
                out.backward(g_bf16)
                return [out.detach()] + [t.grad for t in leaves]

            times, errs = {}, {}
            for b in backends:
                got = step(b)
                errs[b] = (rel_err(got[0], ref[0]), max(rel_err(x, r) for x, r in zip(got[1:], ref[1:])))
                times[b] = statistics.median(sample_ms(lambda: step(b), args.repeats, device,
                                                       min_sample_s=0.002 if smoke else 0.02))
            cells = " | ".join(f"{times[b]:11.3f}" for b in backends)
            if "xformers" in times:
                vs_math, vs_sdpa = times["math"] / times["xformers"], times["sdpa"] / times["xformers"]
                ratios = f"{vs_math:5.2f}x | {vs_sdpa:5.2f}x"
                verdicts.append((kind, n, vs_math >= 2, vs_sdpa >= 1))
            else:
                ratios = f"{'-':>6} | {'-':>6}"
            err = ", ".join(f"{b} {o:.4f}/{gr:.4f}" + ("" if o <= TOL_OUT and gr <= TOL_GRAD else " OVER")
                            for b, (o, gr) in errs.items())
            print(f"| {kind:<11} | {n:>5} | {cells} | {ratios} | {err}")
            if any(o > TOL_OUT or gr > TOL_GRAD for o, gr in errs.values()):
                verdicts.append((kind, n, None, None))
    over = [(k, n) for k, n, a, b in verdicts if a is None]
    timed = [v for v in verdicts if v[2] is not None]
    if timed:
        miss_math = [f"{k}@{n}" for k, n, a, _ in timed if not a]
        miss_sdpa = [f"{k}@{n}" for k, n, _, b in timed if not b]
        print(f"xformers >= 2x math: {'met' if not miss_math else 'NOT met for ' + ', '.join(miss_math)}; "
              f"xformers >= 1x sdpa: {'met' if not miss_sdpa else 'NOT met for ' + ', '.join(miss_sdpa)}")
    print("equal outputs within bf16 tolerance: " + ("yes, every backend and mask" if not over else
                                                     "NO for " + ", ".join(f"{k}@{n}" for k, n in over)))


# ----------------------------------------------------------------------------------------------- inception

def bench_inception(args: argparse.Namespace, device: torch.device) -> None:
    from pipeline.fid import extract_features
    from pipeline.fid_reference import open_network

    smoke = args.cpu_smoke
    batch = 2 if smoke else args.batch_size
    n_images = 4 if smoke else args.images
    side = 32 if smoke else 256
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net = open_network(device=device)  # the pinned file, hash-checked, as every stage loads it
    print(f"# Inception (FID pool3) feature extraction, batch {batch}; {device_line(device)}")
    x = torch.rand(batch, 3, 299, 299, device=device) * 2 - 1
    with torch.inference_mode():
        net(x)  # warm-up: cuDNN picks its algorithms on the first batch
        sync()
        start = time.perf_counter()
        for _ in range(max(1, n_images // batch)):
            net(x)
        sync()
        bare = max(1, n_images // batch) * batch / (time.perf_counter() - start)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, side, side, 3), dtype=torch.uint8, generator=g)
    extract_features(images[:batch], net, batch, device=device, progress=False)  # warm-up of the resize path
    sync()
    start = time.perf_counter()
    feats = extract_features(images, net, batch, device=device, progress=False)
    full = n_images / (time.perf_counter() - start)
    assert feats.shape == (n_images, 2048)
    print(f"bare network           {bare:9.1f} images/s  (ready 299x299 float input, {max(1, n_images // batch)} "
          f"batches of {batch})")
    print(f"extract_features       {full:9.1f} images/s  ({n_images} uint8 {side}x{side} images: copy, tf_bilinear "
          f"resize on {device.type}, network, features back to the CPU)")


# ----------------------------------------------------------------------------------------------- code search

def bench_search(args: argparse.Namespace, device: torch.device) -> None:
    import faiss

    from models.quantizer import nearest_codes

    smoke = args.cpu_smoke
    n_codes, dim = (1024, 8) if smoke else (args.codes, args.code_dim)
    n_vec = 2048 if smoke else args.vectors
    g = torch.Generator().manual_seed(0)
    codes = F.normalize(torch.randn(n_codes, dim, generator=g), dim=1)
    z = F.normalize(torch.randn(n_vec, dim, generator=g), dim=1)
    codes_d, z_d = codes.to(device), z.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"# nearest-code lookup, {n_vec} l2-normalised vectors x {n_codes} codes of dim {dim}; "
          f"{device_line(device)}")

    def best_ms(fn: Callable[[], object]) -> float:
        fn()
        sync()
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return 1000 * best

    t_torch = best_ms(lambda: nearest_codes(z_d, codes_d))
    ref = nearest_codes(z_d, codes_d).cpu()
    print(f"torch nearest_codes ({device.type})   {t_torch:9.3f} ms")
    index = faiss.IndexFlatIP(dim)
    index.add(codes.numpy())
    gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu:  # exactly as stages.tokenize.CodeSearch: the GPU index searches torch CUDA tensors in place
        import faiss.contrib.torch_utils  # noqa: F401
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, device.index or 0, index)
        query, label = z_d, "faiss-gpu flat IP, k=2"
    else:
        query, label = z.numpy(), "faiss-cpu flat IP, k=2"
        why = "no CUDA" if device.type != "cuda" else "this faiss has no GPU support (faiss-cpu installed)"
        print(f"faiss-gpu: not measured ({why})")
    t_faiss = best_ms(lambda: index.search(query, 2))
    idx = index.search(query, 2)[1]
    idx = idx.cpu() if isinstance(idx, torch.Tensor) else torch.from_numpy(idx)
    agree = float((idx[:, 0].long() == ref).float().mean())
    print(f"{label:<29} {t_faiss:9.3f} ms   torch / faiss time {t_torch / t_faiss:6.2f}x; top-1 agrees with torch "
          f"on {agree:.4f} of vectors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("attention", "inception", "search"))
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8, help="attention: heads (a multiple of 4 for YLG)")
    ap.add_argument("--dim", type=int, default=64, help="attention: head dim")
    ap.add_argument("--tokens-per-batch", type=int, default=16384, help="attention: batch = this / N")
    ap.add_argument("--new-tokens", type=int, default=128, help="attention: KV-cache queries per call")
    ap.add_argument("--batch-size", type=int, default=500, help="inception: batch")
    ap.add_argument("--images", type=int, default=2000, help="inception: images per pass")
    ap.add_argument("--codes", type=int, default=16384, help="search: codebook size")
    ap.add_argument("--code-dim", type=int, default=8, help="search: code dim (configs/vqgan_256_f16.yaml: 8)")
    ap.add_argument("--vectors", type=int, default=65536, help="search: query vectors (256 images x 16x16)")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.repeats = min(args.repeats, 2)
    elif not torch.cuda.is_available():
        ap.exit(1, "gpu_check: no CUDA device (use --cpu-smoke to check the script on the CPU)\n")
    else:
        device = torch.device("cuda")
    {"attention": bench_attention, "inception": bench_inception, "search": bench_search}[args.what](args, device)


if __name__ == "__main__":
    main()
