"""Sampling speed of the stage-2 transformers, two comparisons.

1. KV-cache sampling vs recomputing the whole prefix at every step (issue 6 target: >= 10x at 256 tokens per image,
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

2. --maskgit: MaskGIT's iterative parallel decoding (models/maskgit.py) vs the GPT with KV cache at the same width,
   depth, vocabulary and grid (issue 17 target: >= 3x the AR images/s at 8x8 tokens, rising with the grid size).

    OMP_NUM_THREADS=2 python bench/bench_sampling.py --maskgit                      # grids 8x8, 16x16; T = 4 8 12 16
    python bench/bench_sampling.py --maskgit --device cuda --batch 32

Both models are randomly initialised (synthetic tokens: speed does not depend on the weights) and sample the same way
(temperature 1, --cfg-scale). The AR model runs h*w forwards of one token each against its cache; MaskGIT runs T
forwards over all h*w + 1 positions: T * (h*w + 1) / (h*w) times the AR's token computations in T / (h*w) as many
sequential steps. It wins where a step costs its latency (GPU, small batches), not where it costs its FLOPs (a CPU).
Every timing is the median of --repeats runs after a warm-up run. One line per grid and T holds "maskgit", both
images/s and the ratio; a last line sums up the ratios at T = 8 against the target.
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
from models.maskgit import MaskGIT, MaskGITConfig  # noqa: E402


def timed_generate(model: GPT, labels: torch.Tensor, use_cache: bool, autocast) -> tuple[torch.Tensor, float]:
    device = labels.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with autocast():
        tokens = model.generate(len(labels), labels, temperature=0.0, use_cache=use_cache)
    sync()
    return tokens, time.perf_counter() - start


def median_seconds(run, device: torch.device, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, after one untimed warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_maskgit(args: argparse.Namespace, device: torch.device, autocast) -> None:
    """MaskGIT (T steps) vs GPT + KV cache at the same size, per grid; prints one "maskgit" line per grid and T."""
    grids = [int(g) for g in args.grids.split(",")]
    all_steps = [int(t) for t in args.steps.split(",")]
    ref_steps = 8 if 8 in all_steps else all_steps[0]
    ratio_at_ref: dict[int, float] = {}
    print(f"batch: {args.batch} images, temperature 1.0, cfg_scale {args.cfg_scale}; "
          f"median of {args.repeats} after a warm-up")
    for side in grids:
        common = dict(vocab_size=args.vocab, grid=(side, side), n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, n_classes=args.n_classes)
        torch.manual_seed(args.seed)
        ar = GPT(GPTConfig(**common)).to(device).eval()
        torch.manual_seed(args.seed)
        mg = MaskGIT(MaskGITConfig(**common)).to(device).eval()
        labels = torch.arange(args.batch, device=device) % args.n_classes
        n_tokens = side * side

        def sample(model, **kw):
            gen = torch.Generator(device=device).manual_seed(args.seed)
            with autocast():
                return model.generate(args.batch, labels, cfg_scale=args.cfg_scale, generator=gen, **kw)

        t_ar = median_seconds(lambda: sample(ar, use_cache=True), device, args.repeats)
        ips_ar = args.batch / t_ar
        print(f"grid {side}x{side} ({n_tokens} tokens/image); parameters: AR {ar.num_params() / 1e6:.2f}M, "
              f"maskgit {mg.num_params() / 1e6:.2f}M")
        print(f"  AR + KV cache       : {t_ar:8.3f} s  {ips_ar:9.3f} images/s  ({n_tokens} forwards of 1 token)")
        for steps in all_steps:
            t_mg = median_seconds(lambda: sample(mg, steps=steps), device, args.repeats)
            ips_mg = args.batch / t_mg
            ratio = ips_mg / ips_ar
            if steps == ref_steps:
                ratio_at_ref[side] = ratio
            work = steps * (n_tokens + 1) / n_tokens
            print(f"  maskgit {f'{side}x{side}':>5} T={steps:<2d}: {t_mg:8.3f} s  {ips_mg:9.3f} images/s vs AR+KV "
                  f"{ips_ar:9.3f} images/s: {ratio:6.2f}x  ({steps} forwards over {n_tokens + 1} positions, "
                  f"{work:.1f}x the AR's token positions)")
    summary = ", ".join(f"{side}x{side} {r:.2f}x" for side, r in ratio_at_ref.items())
    sides = sorted(ratio_at_ref)
    rising = all(ratio_at_ref[b] > ratio_at_ref[a] for a, b in zip(sides, sides[1:])) if len(sides) > 1 else None
    if 8 not in ratio_at_ref or rising is None:
        verdict = "n/a (needs 8x8 and a larger grid)"
    else:
        verdict = "met" if ratio_at_ref[8] >= 3 and rising else "NOT met"
    print(f"maskgit vs AR+KV at T={ref_steps}: {summary}; rising with grid: {'n/a' if rising is None else rising}; "
          f"target >= 3x at 8x8, rising: {verdict}")


def describe_mismatch(model: GPT, labels: torch.Tensor, cached: torch.Tensor, recomputed: torch.Tensor,
                      autocast) -> str:
    """Where greedy decoding first diverged, and how close the top two logits were there (in the recompute path)."""
    row, col = (cached != recomputed).nonzero()[0].tolist()
    with torch.no_grad(), autocast():
        logits = model(recomputed[row:row + 1, :col], labels[row:row + 1])[0][0, -1].float()
    top2 = logits.topk(2).values
    return f"first difference: image {row}, token {col}; top-2 logit gap there {(top2[0] - top2[1]).item():.2e}"


def load_average() -> str:
    """The 1/5/15-minute load average (Linux), printed with the figures: a busy machine slows every timing."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


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
    ap.add_argument("--maskgit", action="store_true", help="compare MaskGIT with AR + KV cache instead (issue 17)")
    ap.add_argument("--grids", default="8,16", help="--maskgit: token grid sides, comma-separated")
    ap.add_argument("--steps", default="4,8,12,16", help="--maskgit: MaskGIT decoding steps T, comma-separated")
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="--maskgit: classifier-free guidance for both models (!= 1 doubles every forward's batch)")
    args = ap.parse_args()

    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    autocast = bf16 if use_bf16 else nullcontext

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; attention backend: {active_backend(device)}; "
          f"precision: {'bf16 autocast' if use_bf16 else 'float32'}; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {load_average()}")
    if args.maskgit:
        print(f"models: n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={args.vocab} "
              f"n_classes={args.n_classes}, GPTConfig defaults otherwise (norm, mlp, pos) for both")
        bench_maskgit(args, device, autocast)
        return

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=args.vocab, grid=(args.grid, args.grid), n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, n_classes=args.n_classes)
    model = GPT(config).to(device).eval()
    labels = torch.arange(args.batch, device=device) % args.n_classes
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
