"""Training throughput of the two trainable stages, measured in one run.

  vqgan: images/s of a full train_vqgan step (VQGAN fwd+bwd, quantizer, LPIPS and PatchGAN as configured, AdamW)
         for the default preset (params.yaml) or a preset file (configs/vqgan_256_f16.yaml on a GPU).
  ar:    tokens/s of a GPT training step and, on a GPU with a known peak, MFU = flops_per_token * tokens/s / peak
         (flops_per_token = 6N + 12 * n_layer * n_embd * T, PaLM-style, counting the full causal T x T).

  python bench/bench_train.py vqgan                               # default preset, CPU
  python bench/bench_train.py vqgan --preset configs/vqgan_256_f16.yaml --device cuda
  python bench/bench_train.py ar                                  # default preset, CPU
  python bench/bench_train.py ar --preset configs/gpt_100m.yaml --device cuda
Synthetic inputs of the right shape: the figure is the model's speed, not the data pipeline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import env  # noqa: E402,F401  (OMP_WAIT_POLICY etc. must be set before torch loads)
import torch  # noqa: E402

from pipeline.run_checks import preset_overrides  # noqa: E402
from pipeline.config import apply_overrides, load_params  # noqa: E402


def params_with(preset: str | None) -> dict:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    return apply_overrides(params, preset_overrides(preset)) if preset else params


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def bench_vqgan(args, device: torch.device) -> None:
    from models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
    from models.lpips import LPIPS
    from models.vqgan import VQGAN
    from pipeline.device import autocast
    from stages.train_vqgan import check

    cfg = check(params_with(args.preset), "params.yaml")
    res, ch = args.resolution, args.channels
    model = VQGAN(dataclasses.replace(cfg.model, in_channels=ch)).to(device)
    disc = NLayerDiscriminator(ch, cfg.loss.disc_channels, cfg.loss.disc_layers, norm=cfg.loss.disc_norm).to(device)
    lpips = LPIPS().to(device) if cfg.loss.lpips_weight > 0 else None
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    x = torch.rand(cfg.batch_size, ch, res, res, device=device) * 2 - 1

    def step(gan: bool):
        opt_g.zero_grad(set_to_none=True)
        with autocast(device, cfg.bf16):
            recon, aux = model(x)
            recon = recon.float()
            nll = (recon - x).abs().mean()
            if lpips is not None:
                nll = nll + cfg.loss.lpips_weight * lpips(x, recon).mean()
            loss = nll + aux["loss"]
            if gan:
                g = hinge_g_loss(disc(recon))
                loss = loss + adaptive_weight(nll, g, model.last_layer()) * g
        loss.backward()
        opt_g.step()
        if gan:
            opt_d.zero_grad(set_to_none=True)
            with autocast(device, cfg.bf16):
                d = hinge_d_loss(disc(x), disc(recon.detach()))
            d.backward()
            opt_d.step()

    print(f"device {device_name(device)}; VQGAN {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"f={cfg.model.downsample}, {res}x{res}x{ch}, batch {cfg.batch_size}, "
          f"LPIPS {'on' if lpips else 'off'}, bf16 {cfg.bf16 and device.type == 'cuda'}")
    for gan in (False, True):
        s = timed(lambda: step(gan), args.warmup, args.steps, device)
        print(f"  {'with GAN (after disc_start)' if gan else 'before disc_start':<28} "
              f"{cfg.batch_size / s:9.1f} images/s  ({s * 1000:.0f} ms/step)")


def bench_ar(args, device: torch.device) -> None:
    from models.attention import active_backend
    from models.gpt import GPT, GPTConfig
    from pipeline.device import autocast
    from stages.train_transformer import check
    from training.ar import peak_bf16_tflops

    cfg = check(params_with(args.preset), "params.yaml")
    a = cfg.ar
    grid = (args.grid, args.grid)
    model = GPT(GPTConfig(vocab_size=args.vocab, grid=grid, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                          n_classes=10 if a.conditional else 0, norm=a.norm, mlp=a.mlp, pos=a.pos)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    T = grid[0] * grid[1]
    x = torch.randint(0, args.vocab, (cfg.batch_size, T), device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device) if a.conditional else None

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg.bf16):
            _, loss = model(x[:, :-1], y, targets=x)
        loss.backward()
        opt.step()

    s = timed(step, args.warmup, args.steps, device)
    tok_s = cfg.batch_size * T / s
    flops = model.flops_per_token() * tok_s
    name = device_name(device)
    peak = (peak_bf16_tflops(name) or 0) * 1e12
    print(f"device {name}; GPT {model.num_params() / 1e6:.1f}M params, {T} tokens, batch {cfg.batch_size}, "
          f"attention {active_backend(device)}, bf16 {cfg.bf16 and device.type == 'cuda'}")
    print(f"  {tok_s:,.0f} tokens/s  ({s * 1000:.0f} ms/step), {flops / 1e12:.2f} TFLOP/s achieved"
          + (f", MFU {flops / peak:.1%} (peak {peak / 1e12:.0f} TFLOP/s bf16 dense)" if peak else ""))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("vqgan", "ar"))
    ap.add_argument("--preset", help="configs/*.yaml merged over params.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=32, help="vqgan: image side")
    ap.add_argument("--channels", type=int, default=1, help="vqgan: image channels")
    ap.add_argument("--grid", type=int, default=8, help="ar: token grid side (T = grid^2)")
    ap.add_argument("--vocab", type=int, default=512, help="ar: codebook size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    (bench_vqgan if args.what == "vqgan" else bench_ar)(args, device)


if __name__ == "__main__":
    main()
