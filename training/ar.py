"""Kinds `ar` and `maskgit` of `train_transformer`: a transformer over the token grid, trained top to bottom here.

ar: a GPT in raster order, Taming Transformers' second stage with LlamaGen's practice (class-token prefix with label
dropout for classifier-free guidance, RMSNorm, SwiGLU, 2D rotary positions). maskgit: the same blocks without the
causal mask (models/maskgit.py, Chang et al. 2022), trained to predict the tokens hidden by a mask whose ratio is
drawn per sample from the cosine schedule, the loss on masked positions only. Both: AdamW, warm-up + cosine decay,
optional EMA, step-indexed batches (exact resume under the same identity; maskgit's mask generator state is
checkpointed too), NaN guard, DDP. The two kinds differ in three places only: the model class, `objective` (the
loss of a batch) and what the val metric is called.

1. unigram_bits / objective / val_loss   context-free bits per token; a batch's loss; the fixed val batches' loss
2. train_ar                               resume, then one loop: forward, loss, backward, clip, step; logs, evals,
                                          checkpoints
3. finish                                 exported weights + config, metrics, TSV log, curves
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.attention import active_backend
from models.gpt import GPT, GPTConfig
from models.maskgit import MaskGIT, MaskGITConfig, masked_loss, random_mask
from pipeline import checkpoint as ckpt
from pipeline import doctor
from pipeline.atomic import atomic_path, new_partial_dir, read_json, replace_dir, write_json
from pipeline.device import Dist, autocast
from pipeline.errors import UserError
from pipeline.runlog import headline, run_log_path, write_metrics
from pipeline.tokens import TokenData
from training.common import (EMA, StepBatches, check_batch_fits, check_batch_splits, check_finite, config_hash,
                             cosine_lr, export_weights, seed_everything, set_lr, token_data_id, unwrap, write_tsv)

log = logging.getLogger("tokenmill.train_transformer")
# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs we report MFU for: NVIDIA's datasheets print the 2:4-sparse
# figures, twice these. Matched in order against torch.cuda.get_device_name(), so the PCIe and NVL boards come before
# the SXM parts that share their name; other devices report achieved TFLOP/s only.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.5), ("H200", 989.5),
                    ("A100", 312.0))
LOG_KEYS = ["step", "train_loss", "val_loss", "val_bits_per_token", "lr"]  # no timing: the TSV is a DVC out
MASKGIT_LOG_KEYS = ["step", "train_loss", "val_loss", "val_bits_per_token", "val_masked_accuracy", "lr"]
VAL_MASK_SEED = 12345  # maskgit's val masks: the same for every eval, so the curve compares like with like


def unigram_bits(tokens: torch.Tensor, n_codes: int) -> float:
    """Entropy (bits) of the code histogram: what a model ignoring all context would pay per token."""
    p = torch.bincount(tokens.flatten(), minlength=n_codes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU `torch.cuda.get_device_name()` calls `device_name`, or None where unknown."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in device_name), None)


def objective(model: torch.nn.Module, mask_id: int | None, x: torch.Tensor, y: torch.Tensor | None,
              masks: torch.Generator | None, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, masked-token accuracy or None) of one batch of token grids x (B, h*w). ar (mask_id None): next-token
    cross-entropy. maskgit: mask at a cosine-schedule ratio drawn from `masks`, predict the masked codes. `model`
    may be the DDP wrapper: the forward goes through it, so DDP sees it and syncs the gradients."""
    if mask_id is None:
        return model(x[:, :-1], y, targets=x)[1], None
    mask = random_mask(x.shape[0], x.shape[1], generator=masks, device=x.device)
    logits = model(x.masked_fill(mask, mask_id), y, generator=masks)
    return masked_loss(logits, x, mask, label_smoothing)


@torch.no_grad()
def val_loss(model: GPT | MaskGIT, data: TokenData, n_records: int, batch_size: int, device: torch.device,
             conditional: bool, bf16: bool) -> tuple[float, float | None]:
    """(mean token cross-entropy in nats, maskgit's masked-token accuracy or None) over the first n_records val
    samples (all if fewer), batch_size at a time; maskgit's masks from a fixed seed."""
    model.eval()
    mask_id = model.mask_id if isinstance(model, MaskGIT) else None
    masks = torch.Generator(device=device).manual_seed(VAL_MASK_SEED) if mask_id is not None else None
    total, correct, count = 0.0, 0.0, 0
    n = min(len(data.tokens), n_records)
    for start in range(0, n, batch_size):
        x = data.tokens[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device) if conditional else None
        with autocast(device, bf16):
            loss, accuracy = objective(model, mask_id, x, y, masks)
        total += float(loss) * len(x)
        correct += float(accuracy) * len(x) if accuracy is not None else 0.0
        count += len(x)
    model.train()
    return total / max(1, count), (correct / max(1, count) if mask_id is not None else None)


def plot_curves(path: Path, history: list[dict], unigram: float, kind: str = "ar") -> None:
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
    ax.set_xlabel("step"), ax.legend(), ax.set_title(f"train_transformer ({kind})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on every matrix, the token (and learned position) embeddings wte/wpe included,
    as nanoGPT decays every 2-D parameter; none on norm gains, biases and the class-prefix table."""
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("prefix")}
    return [{"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0}]


def train_ar(cfg: Any, device: torch.device, dist: Dist, code: str) -> None:
    """The loop of kinds `ar` and `maskgit`: `cfg` is the validated `train_transformer` section, `code` the stage's
    code hash."""
    vq_cfg_path = Path(cfg.vqgan_dir) / "config.json"
    if not vq_cfg_path.is_file():
        raise UserError(f"{vq_cfg_path}: not found (train the VQGAN first)")
    fingerprint = read_json(vq_cfg_path)["fingerprint"]
    store = Path(cfg.tokens_dir) / cfg.dataset
    train = TokenData.load(store, "train", cfg.hflip, fingerprint, str(vq_cfg_path))
    val = TokenData.load(store, "val", False, fingerprint, str(vq_cfg_path))
    if len(val.tokens) == 0:  # the val loss (bits/token, the stage's metric) would be a mean over nothing
        raise UserError(f"{store}: split 'val' holds no tokens; the val loss needs some: give dataset {cfg.dataset} "
                        f"images for val (split: random: raise datasets.{cfg.dataset}.val_fraction or add images; "
                        f"split: keep: add a val/ folder)")
    meta = train.meta
    class_names = json.loads((Path(cfg.prepared_dir) / cfg.dataset / "manifest.json").read_text())["class_names"] \
        if cfg.ar.conditional else []
    a = cfg.ar
    maskgit = cfg.kind == "maskgit"
    Model, Config = (MaskGIT, MaskGITConfig) if maskgit else (GPT, GPTConfig)
    gcfg = Config(vocab_size=meta["n_codes"], grid=tuple(meta["grid"]), n_layer=a.n_layer, n_head=a.n_head,
                     n_embd=a.n_embd, dropout=a.dropout, n_classes=len(class_names), class_dropout=a.class_dropout,
                     norm=a.norm, mlp=a.mlp, pos=a.pos, bias=a.bias, tie_head=a.tie_head)
    run_id = config_hash({"cfg": dataclasses.asdict(cfg) | {"device": None}, "tokens": fingerprint,
                          "data": token_data_id(meta, train.tokens, train.labels, val.tokens, val.labels),
                          "classes": class_names, "world": dist.world})
    seed_everything(cfg.seed)
    model = Model(gcfg).to(device)
    # maskgit's masks and label dropout: one generator per rank (other ranks draw other masks), every rank's state
    # checkpointed (rank 0's alone put rank 0's draws on every rank after a resume)
    masks = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + dist.rank) if maskgit else None
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    ema = EMA(model, cfg.ema) if cfg.ema is not None else None
    state = ckpt.load_latest(cfg.ckpt_dir, device, expect={"run_id": run_id, "code": code})
    history: list[dict] = []
    window: list[float] = []  # step losses since the last log row
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        if masks is not None:
            # a generator state is a CPU byte tensor on any device, and must own its memory (a row view crashed)
            masks.set_state(state["masks"][dist.rank].clone())
        history, start = list(state["history"]), int(state["step"])
        window = list(state["window"])
        log.info("resuming from %s at step %d", cfg.ckpt_dir, start)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    core = unwrap(model)
    backend = active_backend(device)
    log.info("%s", doctor.summary(device))  # what this machine runs, in the stage's own log
    log.info("%s %.2fM parameters, attention backend %s, %d train sequences of %d tokens", Model.__name__,
             core.num_params() / 1e6, backend, len(train.tokens), train.tokens.shape[1])

    check_batch_fits("train_transformer.batch_size", cfg.batch_size, len(train.tokens),
                     f"the train split of the token store of {cfg.dataset} (records)")
    check_batch_splits("train_transformer", cfg.batch_size, dist.world, cfg.grad_accum)
    batches = StepBatches(len(train.tokens), cfg.batch_size, cfg.seed, dist.rank, dist.world)
    micro = cfg.batch_size // dist.world // cfg.grad_accum
    tokens_per_step = cfg.batch_size * train.tokens.shape[1]
    unigram = unigram_bits(train.tokens, meta["n_codes"])
    conditional = gcfg.n_classes > 0

    def save_checkpoint(step: int) -> None:
        mask_states = dist.gather(masks.get_state(), device) if masks is not None else None  # every rank calls it
        if dist.main:
            ckpt.save(cfg.ckpt_dir, {"step": step, "run_id": run_id, "code": code, "model": core.state_dict(),
                                     "opt": opt.state_dict(), "ema": ema.state_dict() if ema else {},
                                     "rng": ckpt.rng_state(), "history": history, "window": window,
                                     **({"masks": mask_states} if masks is not None else {})},
                      step, keep=cfg.ckpt_keep)
        dist.barrier()

    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train_transformer", unit="step", disable=not dist.main,
               mininterval=2.0, file=sys.stderr)
    t0, done_tokens = time.monotonic(), 0
    for step in range(start, cfg.steps):
        lr = cosine_lr(step, o.lr, o.warmup_steps, cfg.steps, o.min_lr_ratio)
        set_lr(opt, lr)
        idx = batches.indices(step)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in idx.split(micro):
            x = train.tokens[chunk].to(device, non_blocking=True)
            y = train.labels[chunk].to(device) if conditional else None
            with autocast(device, cfg.bf16):
                loss, _ = objective(model, core.mask_id if maskgit else None, x, y, masks,
                                    cfg.maskgit.label_smoothing)
            check_finite(step, cfg.ckpt_dir, loss=loss)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        step_loss = dist.mean_floats({"loss": step_loss}, device)["loss"]
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
            # val_batches global batches, in micro-batches: the same records whatever grad_accum and world size
            vl, acc = val_loss(ema.averaged() if ema else core, val, cfg.val_batches * cfg.batch_size, micro, device,
                               conditional, cfg.bf16)
            row = row or {"step": done, "train_loss": step_loss, "lr": lr, "tokens_per_s": None}
            row.update(val_loss=vl, val_bits_per_token=vl / math.log(2))
            if maskgit:
                row["val_masked_accuracy"] = acc
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


def finish(cfg: Any, model: GPT | MaskGIT, gcfg: GPTConfig, history: list[dict], meta: dict,
           fingerprint: str, unigram: float, backend: str, tokens_per_s: float | None, device: torch.device,
           class_names: list[str]) -> None:
    out = new_partial_dir(cfg.out_dir)
    export_weights(out, model)
    gdict = dataclasses.asdict(gcfg)
    gdict["grid"] = list(gdict["grid"])
    write_json(out / "config.json", {"kind": cfg.kind, "model": gdict, "fingerprint": fingerprint,
                                     "dataset": cfg.dataset, "class_names": class_names, "steps": cfg.steps})
    last_val = next((h for h in reversed(history) if h.get("val_loss") is not None), {})
    first_val = next((h for h in history if h.get("val_loss") is not None), {})
    # tokens_per_s is None when a resume found every step done: nothing was timed, so no throughput either
    flops = model.flops_per_token() * tokens_per_s if isinstance(model, GPT) and tokens_per_s else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name)
    metrics = {
        "kind": cfg.kind, "params_m": round(model.num_params() / 1e6, 3), "steps": cfg.steps,
        "train_loss": history[-1]["train_loss"] if history else None,
        "val_loss": last_val.get("val_loss"), "val_bits_per_token": last_val.get("val_bits_per_token"),
        "val_bits_per_token_first_eval": first_val.get("val_bits_per_token"),
        "unigram_bits_per_token": unigram, "fingerprint": fingerprint,
    }
    # maskgit's val loss is per masked token (a mask ratio drawn from the cosine schedule), not per token of a grid
    columns = {"masked_bits": "val_bits_per_token", "masked_acc": "val_masked_accuracy"} if cfg.kind == "maskgit" \
        else {"bits_per_token": "val_bits_per_token"}
    if cfg.kind == "maskgit":
        metrics["val_masked_accuracy"] = last_val.get("val_masked_accuracy")
    write_json(out / "metrics.json", metrics)
    plot_curves(out / "curves.png", history, unigram, cfg.kind)
    replace_dir(out, Path(cfg.out_dir), "train_transformer")
    write_metrics(cfg.metrics, headline(metrics, columns), {
        "tokens_per_s": tokens_per_s, "achieved_tflops": flops / 1e12 if flops is not None else None,
        "mfu": flops / (peak * 1e12) if peak and flops is not None else None, "device": name,
        "attention_backend": backend})
    write_tsv(Path(cfg.plots), history, MASKGIT_LOG_KEYS if cfg.kind == "maskgit" else LOG_KEYS,
              stamp=run_log_path(cfg.metrics))
    what = "bits per masked token" if cfg.kind == "maskgit" else "bits/token"  # maskgit's loss is on masked ones
    log.info("val %.3f %s (unigram entropy %.3f); %.0f tokens/s", metrics["val_bits_per_token"] or float("nan"),
             what, unigram, tokens_per_s or 0)


