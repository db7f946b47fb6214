"""KV-cache sampling vs recomputing the whole prefix at every step (issue 6 target: >= 10x at 256 tokens per image,
identical tokens under greedy decoding).

    OMP_NUM_THREADS=2 python bench/bench_sampling.py              # CPU, float32
    python bench/bench_sampling.py --device cuda                  # GPU, bf16 autocast

One randomly initialised class-conditional GPT, one batch, greedy decoding, two ways through GPT.generate:
use_cache=True (prefill the class prefix, then one token per step against the cached keys/values) and
use_cache=False (a forward over prefix + all tokens so far at every step, as taming's default sampler does).
Prints the config, images/s both ways, the speed-up, and whether the greedy tokens are identical. The cached path is
timed as the median of --repeats runs after a warm-up; the recompute path, which is what takes long, once (after a
warm-up on the GPU only, where the first call pays for kernel selection).

Greedy tokens can only differ where two logits are within rounding error of each other (the two paths run different
matmul shapes). A random model's logits are nearly uniform, so in bf16 that can happen; on CUDA the check is
therefore repeated in float32, and a mismatch is printed with the top-2 logit gap at the first differing token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# Before torch starts its OpenMP pool: threads that spin-wait (the default) stall every small op on a shared,
# oversubscribed CPU until the OS reschedules the spinning peer. Measured here with 2 threads on a busy 2-core box: a
# (4, 512) x (512, 1536) matmul took 16 ms instead of 0.2 ms, which hits the one-token steps of the cached path far
# harder than the big recompute matmuls. Override with OMP_WAIT_POLICY=ACTIVE on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/bench_sampling.py` finds models/

import torch  # noqa: E402

from models.attention import active_backend  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402


def timed_generate(model: GPT, labels: torch.Tensor, use_cache: bool, autocast) -> tuple[torch.Tensor, float]:
    device = labels.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with autocast():
        tokens = model.generate(len(labels), labels, temperature=0.0, use_cache=use_cache)
    sync()
    return tokens, time.perf_counter() - start


def describe_mismatch(model: GPT, labels: torch.Tensor, cached: torch.Tensor, recomputed: torch.Tensor,
                      autocast) -> str:
    """Where greedy decoding first diverged, and how close the top two logits were there (in the recompute path)."""
    row, col = (cached != recomputed).nonzero()[0].tolist()
    with torch.no_grad(), autocast():
        logits = model(recomputed[row:row + 1, :col], labels[row:row + 1])[0][0, -1].float()
    top2 = logits.topk(2).values
    return f"first difference: image {row}, token {col}; top-2 logit gap there {(top2[0] - top2[1]).item():.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", type=int, default=16, help="token grid side: grid * grid tokens per image")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="images sampled together")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path (median reported)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="CUDA only: bf16 autocast or float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    autocast = bf16 if use_bf16 else nullcontext

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=args.vocab, grid=(args.grid, args.grid), n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, n_classes=args.n_classes)
    model = GPT(config).to(device).eval()
    labels = torch.arange(args.batch, device=device) % args.n_classes

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; attention backend: {active_backend(device)}; "
          f"precision: {'bf16 autocast' if use_bf16 else 'float32'}; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"model: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} vocab={config.vocab_size} "
          f"grid={config.grid[0]}x{config.grid[1]} ({config.block_size} tokens/image) norm={config.norm} "
          f"mlp={config.mlp} pos={config.pos}; {model.num_params() / 1e6:.1f}M parameters")
    print(f"batch: {args.batch} images, greedy decoding")

    timed_generate(model, labels, True, autocast)  # warm-up
    runs = [timed_generate(model, labels, True, autocast) for _ in range(args.repeats)]
    cached, t_cache = runs[0][0], statistics.median(t for _, t in runs)
    if device.type == "cuda":
        timed_generate(model, labels, False, autocast)
    recomputed, t_full = timed_generate(model, labels, False, autocast)

    ips_cache, ips_full = args.batch / t_cache, args.batch / t_full
    print(f"KV cache          : {t_cache:8.2f} s  {ips_cache:9.3f} images/s  (median of {args.repeats})")
    print(f"full recompute    : {t_full:8.2f} s  {ips_full:9.3f} images/s")
    print(f"speed-up          : {ips_cache / ips_full:.1f}x  (target >= 10x)")
    same = torch.equal(cached, recomputed)
    print(f"greedy tokens identical: {same}")
    if not same:
        print("  " + describe_mismatch(model, labels, cached, recomputed, autocast))
    if use_bf16:  # the same check without bf16 rounding
        same32 = torch.equal(model.generate(args.batch, labels, temperature=0.0, use_cache=True),
                             model.generate(args.batch, labels, temperature=0.0, use_cache=False))
        print(f"greedy tokens identical in float32: {same32}")


if __name__ == "__main__":
    main()
