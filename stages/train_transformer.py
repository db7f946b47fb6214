"""Stage `train_transformer`: stage 2 over the token store.

kind `ar`: a GPT over the token grid in raster order (Taming Transformers' second stage with LlamaGen's
practice: class-token prefix with label dropout for classifier-free guidance, RMSNorm, SwiGLU, 2D rotary
positions), trained with AdamW, warm-up + cosine decay, optional EMA, exact resume, NaN guard.
kind `maskgit`: the same transformer without the causal mask, trained to fill in masked tokens and sampled by
iterative parallel decoding (MaskGIT, Chang et al. 2022); the `ar` section sizes it too.
kind `gan`: a transformer GAN in the VQGAN latent space.
This module holds the params, their check and `run`; the loops are training/ar.py (ar, maskgit) and training/gan.py.

Outputs: `<out_dir>/model.safetensors` + `config.json` (kind, model config, codebook fingerprint), curves.png;
metrics JSON (train/val loss, bits per token vs the unigram entropy of the codes; tokens/s and the attention
backend in the run log beside it); TSV log for DVC plots; checkpoints in `<ckpt_dir>` (a work folder: re-running
resumes from the last good one made by the same code, params and data).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.atomic import check_replaceable
from pipeline.config import SEED_MAX, check_dataset_ref, param, section
from pipeline.device import init_distributed, pick_device
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from training.ar import train_ar
from training.common import code_id
from training.gan import GANParams, check_gan, train_gan

SECTIONS = ("train_transformer",)


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
class MaskGITParams:
    label_smoothing: float = param(0.1, min=0.0, max=0.9)  # on the masked-token targets (the MaskGIT recipe's 0.1)


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
    kind: Literal["ar", "maskgit", "gan"] = "ar"
    dataset: str = param("fashion_mnist", kind="name")
    tokens_dir: str = "data/tokens"
    prepared_dir: str = "data/prepared"  # for class names
    vqgan_dir: str = "data/vqgan"  # only its config.json: the codebook fingerprint the tokens must match
    out_dir: str = param("data/transformer", kind="out_path")
    ckpt_dir: str = param("data/checkpoints/train_transformer", kind="out_path")
    metrics: str = param("data/metrics/train_transformer.json", kind="out_path")
    plots: str = param("data/plots/train_transformer.tsv", kind="out_path")
    hflip: bool = False  # also train on the flipped records when the store has them
    steps: int = param(1000, min=1)
    batch_size: int = param(64, min=1)
    grad_accum: int = param(1, min=1)
    ema: float | None = param(None, min=0.0, max=1.0)
    ckpt_every: int = param(250, min=1)
    ckpt_keep: int = param(2, min=1)
    log_every: int = param(25, min=1)
    eval_every: int = param(250, min=1)
    val_batches: int = param(20, min=1)  # val loss over the first val_batches * batch_size val records
    seed: int = param(0, min=0, max=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    ar: ARParams = field(default_factory=ARParams)  # the transformer of kinds ar and maskgit
    maskgit: MaskGITParams = field(default_factory=MaskGITParams)
    optim: OptimParams = field(default_factory=OptimParams)
    gan: GANParams = field(default_factory=GANParams)  # kind gan (ar, optim and ema are kinds ar's and maskgit's)


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
        raise UserError(f"{source}: train_transformer.ema = {cfg.ema} applies to kinds 'ar' and 'maskgit'; for "
                        f"kind 'gan' set train_transformer.gan.ema_decay (null = the family's)")
    check_dataset_ref(params, "train_transformer.dataset", cfg.dataset, source)
    return cfg


def run(cfg: TrainTransformerParams) -> None:
    check_replaceable(cfg.out_dir, "train_transformer")
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    train = train_gan if cfg.kind == "gan" else train_ar  # train_ar: kinds ar and maskgit
    train(cfg, device, dist, code=code_id("stages.train_transformer"))


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
