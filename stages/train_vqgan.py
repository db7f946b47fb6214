"""Stage `train_vqgan`: learn the stage-1 tokenizer (Taming Transformers' VQGAN) on prepared shards.

This module holds the stage's params, their check and `run`; the loop itself is training/vqgan.py.

Outputs: `<out_dir>/model.safetensors` + `config.json`, `recon_grid.png`, `curves.png`; metrics JSON; a TSV log
for DVC plots; checkpoints in `<ckpt_dir>` (a work folder: re-running resumes from the last good one
made by the same code, params and data).
Multi-GPU/CPU: `torchrun --nproc_per_node N -m stages.train_vqgan` (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.vqgan import VQGANConfig
from pipeline.atomic import check_replaceable
from pipeline.config import SEED_MAX, check_dataset_ref, param, section
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from training.common import code_id
from training.vqgan import train_vqgan

SECTIONS = ("train_vqgan",)


@dataclass
class LossParams:
    rec: Literal["l1", "l2"] = "l1"
    lpips_weight: float = param(0.0, min=0.0)
    lpips_start: int = param(0, min=0)  # step from which the LPIPS term is on (a cheaper schedule: LPIPS late)
    lpips_path: str | None = None  # standard LPIPS weights instead of the shipped shift-tolerant ones
    lpips_vgg_path: str | None = None  # VGG16 trunk weights, when lpips_path holds only the LPIPS heads
    disc_weight: float = param(0.1, min=0.0)
    disc_start: int = param(1500, min=0)  # steps before the GAN term (and D training) switches on
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_layers: int = param(2, min=1, max=5)
    disc_channels: int = param(32, min=4)
    disc_norm: Literal["batch", "group"] = "group"  # group: no batch statistics to sync across ranks
    adaptive_max: float = param(1e4, min=0.0)


@dataclass
class OptimParams:
    lr: float = param(2e-3, min=0.0)  # measured on the default 32px model (docs/results.md); the 256px preset sets 4e-4
    disc_lr: float = param(4e-4, min=0.0)
    beta1: float = param(0.5, min=0.0, max=1.0)
    beta2: float = param(0.9, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    warmup_steps: int = param(100, min=0)
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)  # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float | None = param(None, min=0.0)


@dataclass
class TrainVQGANParams:
    dataset: str = param("fashion_mnist", kind="name")
    prepared_dir: str = "data/prepared"
    out_dir: str = param("data/vqgan", kind="out_path")
    ckpt_dir: str = param("data/checkpoints/train_vqgan", kind="out_path")
    metrics: str = param("data/metrics/train_vqgan.json", kind="out_path")
    plots: str = param("data/plots/train_vqgan.tsv", kind="out_path")
    steps: int = param(2000, min=1)
    batch_size: int = param(32, min=1)
    grad_accum: int = param(1, min=1)
    ema: float | None = param(None, min=0.0, max=1.0)  # EMA decay of the exported weights; None: raw weights
    kmeans_init: bool = True
    kmeans_images: int = param(2048, min=1)  # images whose encoder outputs seed the codebook
    ckpt_every: int = param(500, min=1)
    ckpt_keep: int = param(2, min=1)
    log_every: int = param(50, min=1)
    val_images: int | None = param(None, min=1)  # cap the val split for the final metrics
    seed: int = param(0, min=0, max=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True  # autocast on CUDA only
    max_memory_mb: int = param(4096, min=1)  # datasets up to this size are held in memory as uint8
    num_workers: int = param(2, min=0)  # loader workers when streaming from the shards
    # the default preset's tokenizer (f = 4, 512 codes of dim 8); VQGANConfig's own defaults are a bigger model
    model: VQGANConfig = field(default_factory=lambda: VQGANConfig(ch=16, ch_mult=(1, 2, 4), code_dim=8))
    loss: LossParams = field(default_factory=LossParams)
    optim: OptimParams = field(default_factory=OptimParams)


def check(params: dict, source: str) -> TrainVQGANParams:
    cfg = section(params, "train_vqgan", TrainVQGANParams, source)
    m = cfg.model
    for key, value, lo in (("n_codes", m.n_codes, 2), ("code_dim", m.code_dim, 1), ("ch", m.ch, 4),
                           ("z_channels", m.z_channels, 1), ("num_res_blocks", m.num_res_blocks, 1),
                           ("dead_code_steps", m.dead_code_steps, 0), ("buffer_size", m.buffer_size, 1)):
        if value < lo:
            raise UserError(f"{source}: train_vqgan.model.{key} = {value} is out of range (allowed: >= {lo})")
    if m.n_codes > 2**31:  # token stores hold indices as int32 above 65536 codes (docs/token-store.md)
        raise UserError(f"{source}: train_vqgan.model.n_codes = {m.n_codes} is out of range (allowed: <= 2**31, "
                        f"token indices are stored as int32)")
    if not 2 <= len(m.ch_mult) <= 5 or min(m.ch_mult) < 1:
        raise UserError(f"{source}: train_vqgan.model.ch_mult = {list(m.ch_mult)} is not allowed "
                        f"(allowed: 2 to 5 positive multipliers; downsampling f = 2**(len-1))")
    if not 0 < m.beta <= 10:
        raise UserError(f"{source}: train_vqgan.model.beta = {m.beta} is out of range (allowed: > 0 and <= 10)")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"{source}: train_vqgan.batch_size = {cfg.batch_size} is not divisible by "
                        f"grad_accum = {cfg.grad_accum}")
    check_dataset_ref(params, "train_vqgan.dataset", cfg.dataset, source)
    return cfg


def run(cfg: TrainVQGANParams) -> None:
    check_replaceable(cfg.out_dir, "train_vqgan")
    train_vqgan(cfg, code=code_id("stages.train_vqgan"))


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
