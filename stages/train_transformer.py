"""Stage `train_transformer`: stage 2 over the token store.

kind `ar`: a GPT over the token grid in raster order (Taming Transformers' second stage with LlamaGen's
practice: class-token prefix with label dropout for classifier-free guidance, RMSNorm, SwiGLU, 2D rotary
positions), trained with AdamW, warm-up + cosine decay, optional EMA, exact resume, NaN guard.
kind `gan`: a transformer GAN in the VQGAN latent space (see pipeline/gan_training.py).

Outputs: `<out_dir>/model.safetensors` + `config.json` (kind, model config, codebook fingerprint), curves.png;
metrics JSON (train/val loss, bits per token vs the unigram entropy of the codes, tokens/s, attention backend);
TSV log for DVC plots; checkpoints in `<ckpt_dir>` (persist: re-running resumes).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from models.attention import active_backend
from models.gpt import GPT, GPTConfig
from pipeline import checkpoint as ckpt
from pipeline.atomic import atomic_path, read_json, write_json
from pipeline.config import param, section
from pipeline.errors import UserError, run_stage_cli
from pipeline.gan_training import GANParams, check_gan, train_gan
from pipeline.tokens import TokenLMDBDataset
from pipeline.training import EMA, StepBatches, autocast, check_finite, config_hash, cosine_lr, init_distributed, pick_device, seed_everything, unwrap

log = logging.getLogger("tokenmill.train_transformer")
SECTIONS = ("train_transformer",)
NONFINITE_EXIT = 3
# Dense bf16 peak of the GPUs we publish MFU for (TFLOP/s); other devices report achieved TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class ARParams:
    n_layer: int = param(4, min=1)
    n_head: int = param(4, min=1)
    n_embd: int = param(128, min=8)
    dropout: float = param(0.0, min=0.0, max=0.9)
    conditional: bool = True  # class-token prefix; unconditional models use a learned start token
    class_dropout: float = param(0.1, min=0.0, max=1.0)  # label -> null class, so CFG works at sampling
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    pos: Literal["learned", "rope2d"] = "rope2d"
    bias: bool = False
    tie_head: bool = False


@dataclass
class OptimParams:
    lr: float = param(1e-3, min=0.0)
    beta1: float = param(0.9, min=0.0, max=1.0)
    beta2: float = param(0.95, min=0.0, max=1.0)
    weight_decay: float = param(0.05, min=0.0)
    warmup_steps: int = param(100, min=0)
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    grad_clip: float | None = param(1.0, min=0.0)


@dataclass
class TrainTransformerParams:
    kind: Literal["ar", "gan"] = "ar"
    dataset: str = "fashion_mnist"
    tokens_dir: str = "data/tokens"
    prepared_dir: str = "data/prepared"  # for class names
    vqgan_dir: str = "data/vqgan"  # only its config.json: the codebook fingerprint the tokens must match
    out_dir: str = "data/transformer"
    ckpt_dir: str = "data/checkpoints/train_transformer"
    metrics: str = "data/metrics/train_transformer.json"
    plots: str = "data/plots/train_transformer.tsv"
    hflip: bool = False  # also train on the flipped records when the store has them
    steps: int = param(1000, min=1)
    batch_size: int = param(64, min=1)
    grad_accum: int = param(1, min=1)
    ema: float | None = param(None, min=0.0, max=1.0)
    ckpt_every: int = param(250, min=1)
    ckpt_keep: int = param(2, min=1)
    log_every: int = param(25, min=1)
    eval_every: int = param(250, min=1)
    val_batches: int = param(20, min=1)  # val loss over this many batches (fixed, seeded)
    seed: int = param(0, min=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    ar: ARParams = field(default_factory=ARParams)
    optim: OptimParams = field(default_factory=OptimParams)
    gan: GANParams = field(default_factory=GANParams)  # kind gan (ar, optim and ema are kind ar's)


def check(params: dict, source: str) -> TrainTransformerParams:
    cfg = section(params, "train_transformer", TrainTransformerParams, source)
    if cfg.ar.n_embd % cfg.ar.n_head:
        raise UserError(f"{source}: train_transformer.ar.n_embd = {cfg.ar.n_embd} is not divisible by "
                        f"n_head = {cfg.ar.n_head}")
    if cfg.ar.pos == "rope2d" and (cfg.ar.n_embd // cfg.ar.n_head) % 4:
        raise UserError(f"{source}: train_transformer.ar.pos = 'rope2d' needs n_embd / n_head divisible by 4 "
                        f"(got {cfg.ar.n_embd // cfg.ar.n_head})")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"{source}: train_transformer.batch_size = {cfg.batch_size} is not divisible by "
                        f"grad_accum = {cfg.grad_accum}")
    check_gan(cfg.gan, source)
    if cfg.kind == "gan" and cfg.grad_accum != 1:
        raise UserError(f"{source}: train_transformer.grad_accum = {cfg.grad_accum} is not supported with kind 'gan' "
                        f"(allowed: 1)")
    if cfg.kind == "gan" and cfg.ema is not None:
        raise UserError(f"{source}: train_transformer.ema = {cfg.ema} applies to kind 'ar' only; for kind 'gan' "
                        f"set train_transformer.gan.ema_decay (null = the family's)")
    return cfg


@dataclass
class TokenData:
    """A split of the token store in memory: uint16 grids are small (60k x 8x8 = 7.7 MB)."""
    tokens: torch.Tensor  # [N, h*w] int64
    labels: torch.Tensor  # [N]
    meta: dict

    @classmethod
    def load(cls, store: Path, split: str, hflip: bool, fingerprint: str, where: str) -> "TokenData":
        ds = TokenLMDBDataset(store, split, hflip=hflip, vqgan_fingerprint=fingerprint, vqgan_where=where)
        grids, labels = ds.get_batch(range(len(ds)))
        return cls(grids.flatten(1), labels, ds.meta)


def unigram_bits(tokens: torch.Tensor, n_codes: int) -> float:
    """Entropy (bits) of the code histogram: what a model ignoring all context would pay per token."""
    p = torch.bincount(tokens.flatten(), minlength=n_codes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def val_loss(model: GPT, data: TokenData, batch_size: int, n_batches: int, device: torch.device,
             conditional: bool, bf16: bool) -> float:
    """Mean token cross-entropy (nats) over fixed val batches (the first n_batches * batch_size samples)."""
    model.eval()
    total, count = 0.0, 0
    n = min(len(data.tokens), batch_size * n_batches)
    for start in range(0, n, batch_size):
        x = data.tokens[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device) if conditional else None
        with autocast(device, bf16):
            _, loss = model(x[:, :-1], y, targets=x)
        total += float(loss) * len(x)
        count += len(x)
    model.train()
    return total / max(1, count)


def write_log(path: Path, history: list[dict]) -> None:
    keys = ["step", "train_loss", "val_loss", "val_bits_per_token", "lr", "tokens_per_s"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(keys)
            for h in history:
                w.writerow(["" if h.get(k) is None else f"{h[k]:.6g}" for k in keys])


def plot_curves(path: Path, history: list[dict], unigram: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ln2 = math.log(2)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] / ln2 for h in history], label="train bits/token")
    val = [(h["step"], h["val_bits_per_token"]) for h in history if h.get("val_bits_per_token") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="val bits/token")
    ax.axhline(unigram, color="grey", ls="--", label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("step"), ax.legend(), ax.set_title("train_transformer (ar)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def run(cfg: TrainTransformerParams) -> None:
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if cfg.kind == "gan":
        return train_gan(cfg, device, dist)
    vq_cfg_path = Path(cfg.vqgan_dir) / "config.json"
    if not vq_cfg_path.is_file():
        raise UserError(f"{vq_cfg_path}: not found (train the VQGAN first)")
    fingerprint = read_json(vq_cfg_path)["fingerprint"]
    store = Path(cfg.tokens_dir) / cfg.dataset
    train = TokenData.load(store, "train", cfg.hflip, fingerprint, str(vq_cfg_path))
    val = TokenData.load(store, "val", False, fingerprint, str(vq_cfg_path))
    meta = train.meta
    class_names = json.loads((Path(cfg.prepared_dir) / cfg.dataset / "manifest.json").read_text())["class_names"] \
        if cfg.ar.conditional else []
    a = cfg.ar
    gcfg = GPTConfig(vocab_size=meta["n_codes"], grid=tuple(meta["grid"]), n_layer=a.n_layer, n_head=a.n_head,
                     n_embd=a.n_embd, dropout=a.dropout, n_classes=len(class_names), class_dropout=a.class_dropout,
                     norm=a.norm, mlp=a.mlp, pos=a.pos, bias=a.bias, tie_head=a.tie_head)
    run_id = config_hash({"cfg": dataclasses.asdict(cfg) | {"device": None}, "tokens": fingerprint,
                          "count": meta["count"], "world": dist.world})
    seed_everything(cfg.seed)
    model = GPT(gcfg).to(device)
    o = cfg.optim
    # weight decay on matrices only (norm gains, biases and embeddings excluded), as in nanoGPT
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n and "prefix" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n and "prefix" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2))
    ema = EMA(model, cfg.ema) if cfg.ema is not None else None
    state = ckpt.load_latest(cfg.ckpt_dir, device, expect={"run_id": run_id})
    history: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        history, start = list(state["history"]), int(state["step"])
        log.info("resuming from %s at step %d", cfg.ckpt_dir, start)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    core = unwrap(model)
    backend = active_backend(device)
    log.info("GPT %.2fM parameters, attention backend %s, %d train sequences of %d tokens",
             core.num_params() / 1e6, backend, len(train.tokens), train.tokens.shape[1])

    batches = StepBatches(len(train.tokens), cfg.batch_size, cfg.seed, dist.rank, dist.world)
    micro = cfg.batch_size // dist.world // cfg.grad_accum
    tokens_per_step = cfg.batch_size * train.tokens.shape[1]
    unigram = unigram_bits(train.tokens, meta["n_codes"])
    conditional = gcfg.n_classes > 0

    def save_checkpoint(step: int) -> None:
        if dist.main:
            ckpt.save(cfg.ckpt_dir, {"step": step, "run_id": run_id, "model": core.state_dict(),
                                     "opt": opt.state_dict(), "ema": ema.state_dict() if ema else {},
                                     "rng": ckpt.rng_state(), "history": history}, step, keep=cfg.ckpt_keep)
        dist.barrier()

    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train_transformer", unit="step", disable=not dist.main,
               mininterval=2.0, file=sys.stderr)
    t0, done_tokens, window = time.monotonic(), 0, []
    for step in range(start, cfg.steps):
        lr = cosine_lr(step, o.lr, o.warmup_steps, cfg.steps, o.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batches.indices(step)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in idx.split(micro):
            x = train.tokens[chunk].to(device, non_blocking=True)
            y = train.labels[chunk].to(device) if conditional else None
            with autocast(device, cfg.bf16):
                _, loss = model(x[:, :-1], y, targets=x)
            check_finite(step, cfg.ckpt_dir, loss=loss)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        if ema is not None:
            ema.update()
        done_tokens += tokens_per_step
        window.append(step_loss)
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = done_tokens / max(1e-9, time.monotonic() - t0)
            row = {"step": done, "train_loss": sum(window) / len(window), "lr": lr, "tokens_per_s": rate}
            window = []
        if done % cfg.eval_every == 0 or done == cfg.steps:
            vl = val_loss(ema.averaged() if ema else core, val, micro, cfg.val_batches, device, conditional, cfg.bf16)
            row = row or {"step": done, "train_loss": step_loss, "lr": lr, "tokens_per_s": None}
            row.update(val_loss=vl, val_bits_per_token=vl / math.log(2))
        if row is not None:
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}", refresh=False)
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(done)
    bar.close()
    seconds = time.monotonic() - t0
    if dist.main:
        finish(cfg, ema.averaged() if ema else core, gcfg, history, meta, fingerprint, unigram, backend,
               tokens_per_s=done_tokens / seconds if done_tokens else None, device=device, class_names=class_names)


def finish(cfg: TrainTransformerParams, model: GPT, gcfg: GPTConfig, history: list[dict], meta: dict,
           fingerprint: str, unigram: float, backend: str, tokens_per_s: float | None, device: torch.device,
           class_names: list[str]) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp))
    gdict = dataclasses.asdict(gcfg)
    gdict["grid"] = list(gdict["grid"])
    write_json(out / "config.json", {"kind": "ar", "model": gdict, "fingerprint": fingerprint,
                                     "dataset": cfg.dataset, "class_names": class_names, "steps": cfg.steps})
    last_val = next((h for h in reversed(history) if h.get("val_loss") is not None), {})
    first_val = next((h for h in history if h.get("val_loss") is not None), {})
    flops = model.flops_per_token() * (tokens_per_s or 0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    metrics = {
        "kind": "ar", "params_m": round(model.num_params() / 1e6, 3), "steps": cfg.steps,
        "train_loss": history[-1]["train_loss"] if history else None,
        "val_loss": last_val.get("val_loss"), "val_bits_per_token": last_val.get("val_bits_per_token"),
        "val_bits_per_token_first_eval": first_val.get("val_bits_per_token"),
        "unigram_bits_per_token": unigram, "tokens_per_s_last_run": tokens_per_s,
        "achieved_tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None,
        "device": name, "attention_backend": backend, "fingerprint": fingerprint,
    }
    write_json(cfg.metrics, metrics)
    write_log(Path(cfg.plots), history)
    plot_curves(out / "curves.png", history, unigram)
    log.info("val %.3f bits/token (unigram entropy %.3f); %.0f tokens/s", metrics["val_bits_per_token"] or float("nan"),
             unigram, tokens_per_s or 0)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
