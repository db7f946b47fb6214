"""TransGAN in the VQGAN latent space (Jiang, Chang & Wang, 2021, "TransGAN: Two Pure Transformers Can Make One Strong
GAN, and That Can Scale Up").

Generator (memory-friendly): z (+ class) -> linear -> small token grid with a wide embedding; each later stage pixel-
    shuffles the tokens (2x the grid side, 1/4 of the embedding) and runs transformer blocks: full self-attention on
    the small grids, grid self-attention (attention inside cell x cell squares) on the larger ones. A linear layer
    (TransGAN's 1x1 "deconv") maps the last tokens to code_dim channels.
Locality-aware initialisation: the generator's full-attention layers start restricted to a neighbourhood of radius
    `locality_radius` cells (Chebyshev distance) that widens linearly with the training progress (`set_progress`)
    and becomes full attention at progress `locality_until`. Grid-attention layers are local by construction and
    YLG has its own sparse pattern, so the mask applies to the MultiHeadAttention layers only: all of them
    (`locality_layers: all`) or only the last block of the last stage (`last`, where TransGAN's v1 code puts it).
Relative positions (cfg.rel_pos): every full-attention layer of G, and D's blocks, add a learned bias per head and
    2-D offset between two tokens to the attention logits (TransGAN's code has one in every attention layer; the
    grid-attention layers carry theirs in models.attention.GridAttention).
Super-resolution co-training (optional, cfg.sr_weight > 0): see `sr_loss`.
Discriminator: patch-level ViT: non-overlapping d_patch x d_patch latent patches -> tokens, a learned class token,
    learned positions (+ relative ones with cfg.rel_pos), pre-norm blocks, the logit read from the class token (plus
    the class projection).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import GridAttention, MultiHeadAttention
from models.gan_common import (ClassProjection, NoiseAndClass, TransformerBlock, TransGANConfig, grid_to_tokens,
                               make_attention, pixel_shuffle_tokens, tokens_to_grid, with_minibatch_std)

# -----------------------------------------------------------------------------------------------------------------
# Locality-aware initialisation


def locality_mask(side: int, radius: int, device: torch.device | str | None = None) -> Tensor:
    """(N, N) bool over a raster-ordered side x side grid: token i may attend token j iff both their row and column
    offsets are <= radius (a (2 radius + 1)^2 square neighbourhood). Every token keeps itself."""
    rows = torch.arange(side, device=device).repeat_interleave(side)
    cols = torch.arange(side, device=device).repeat(side)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def locality_radius(progress: float, side: int, start_radius: int, until: float) -> int | None:
    """Neighbourhood radius at training progress p in [0, 1]: start_radius at p = 0, growing linearly (floored to whole
    cells) to side - 1 (= everything) at p = until. None means "no restriction" (full attention)."""
    full = side - 1
    if until <= 0 or progress >= until or start_radius >= full:
        return None
    radius = start_radius + math.floor((full - start_radius) * progress / until)
    return None if radius >= full else radius


# -----------------------------------------------------------------------------------------------------------------
# Relative position bias


def relative_position_index(side: int) -> Tensor:
    """(N, N) index into a (2 side - 1)^2-entry table over a raster-ordered side x side grid: one entry per 2-D
    offset (row_i - row_j, col_i - col_j)."""
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    d_row = rows[:, None] - rows[None, :] + side - 1  # each in [0, 2 side - 2]
    d_col = cols[:, None] - cols[None, :] + side - 1
    return d_row * (2 * side - 1) + d_col


class RelativePositionBias(nn.Module):
    """A learned additive attention bias per head for each 2-D offset between two tokens of a side x side grid:
    forward() -> (H, P + N, P + N) float logits bias. `prefix` tokens ahead of the grid (D's class token) have no
    position: their rows and columns are zero."""

    def __init__(self, side: int, n_heads: int, prefix: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * side - 1) ** 2, n_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", relative_position_index(side), persistent=False)
        self.prefix = prefix

    def forward(self) -> Tensor:
        bias = self.table[self.index].permute(2, 0, 1)  # (H, N, N)
        return F.pad(bias, (self.prefix, 0, self.prefix, 0)) if self.prefix else bias


# -----------------------------------------------------------------------------------------------------------------
# Generator


class TransGANGenerator(nn.Module):
    """(B, z_dim) noise [+ (B,) labels] -> (B, code_dim, grid, grid) latent grid."""

    def __init__(self, cfg: TransGANConfig):
        super().__init__()
        n_stages = len(cfg.g_depths)
        if cfg.g_dim % 4 ** (n_stages - 1) or (cfg.g_dim // 4 ** (n_stages - 1)) % cfg.n_heads:
            raise ValueError(f"g_dim {cfg.g_dim} must stay divisible by n_heads {cfg.n_heads} after "
                             f"{n_stages - 1} pixel shuffles (each divides it by 4)")
        self.cfg, self.z_dim = cfg, cfg.z_dim
        self.start = cfg.start_grid(n_stages)
        self.dims = [cfg.g_dim // 4 ** i for i in range(n_stages)]
        self.cond = NoiseAndClass(cfg.z_dim, cfg.n_classes, cfg.class_dim)
        self.input = nn.Linear(self.cond.out_dim, self.start ** 2 * self.dims[0])
        self.pos = nn.ParameterList()
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(self.dims, cfg.g_depths)):
            side = self.start << i
            self.pos.append(nn.Parameter(0.02 * torch.randn(1, side * side, dim)))
            self.stages.append(nn.ModuleList(
                TransformerBlock(dim, make_attention(cfg.attention_kind, dim, cfg.n_heads, side,
                                                     lambda d=dim, s=side: self._native_attention(d, s),
                                                     backend=cfg.backend), cfg.mlp_ratio)
                for _ in range(depth)))
        self.out = nn.Linear(self.dims[-1], cfg.code_dim)
        # super-resolution input: a coarse latent grid enters the second-to-last stage (only built when used, so
        # no parameter sits idle under DDP)
        self.sr_in = nn.Linear(cfg.code_dim, self.dims[-2]) if cfg.sr_weight > 0 and n_stages >= 2 else None
        if cfg.sr_weight > 0 and self.sr_in is None:
            raise ValueError("super-resolution co-training needs at least two generator stages")
        # training progress in [0, 1]: a persistent buffer, so checkpoints and the EMA copy carry it
        self.register_buffer("progress", torch.zeros(()))
        self._masks: dict[tuple, Tensor] = {}
        # relative position tables, "stage_block" -> table, for the full-attention blocks (built last and only when
        # used, so a config without them builds, and draws its initial weights, exactly as before)
        self.rel_bias = nn.ModuleDict({
            f"{i}_{j}": RelativePositionBias(self.start << i, cfg.n_heads)
            for i, stage in enumerate(self.stages) for j, block in enumerate(stage)
            if isinstance(block.attn, MultiHeadAttention) and cfg.attention_kind == "native"}) if cfg.rel_pos else None

    def _native_attention(self, dim: int, side: int) -> nn.Module:
        cfg = self.cfg
        if side >= cfg.grid_attention_min and side > cfg.grid_cell:
            return GridAttention(dim, cfg.n_heads, (side, side), cfg.grid_cell, backend=cfg.backend)
        return MultiHeadAttention(dim, cfg.n_heads, bias=True, backend=cfg.backend)

    # --- locality-aware initialisation ---
    def set_progress(self, progress: float) -> None:
        """Tell the generator how far training is (step / total steps, clamped to [0, 1]); widens the locality mask."""
        self.progress.fill_(min(max(float(progress), 0.0), 1.0))

    def attention_mask(self, stage: int, progress: float | None = None, block: int | None = None) -> Tensor | None:
        """The locality mask of `stage` (of its block `block`; None: the stage's masked blocks) at `progress`
        (default: the stored one), or None (full attention, a layer the mask does not apply to, or a stage whose
        attention is not MultiHeadAttention)."""
        if not isinstance(self.stages[stage][0].attn, MultiHeadAttention):
            return None
        if self.cfg.locality_layers == "last" and (
                stage != len(self.stages) - 1 or (block is not None and block != len(self.stages[stage]) - 1)):
            return None
        side = self.start << stage
        progress = float(self.progress) if progress is None else progress
        radius = locality_radius(progress, side, self.cfg.locality_radius, self.cfg.locality_until)
        if radius is None:
            return None
        key = (side, radius, self.progress.device)
        if key not in self._masks:  # a handful of distinct masks over a run: build each once
            self._masks[key] = locality_mask(side, radius, self.progress.device)
        return self._masks[key]

    # --- forward ---
    def _run(self, x: Tensor, first: int) -> Tensor:
        """Run stages first .. last on tokens x of stage `first` (positions already added)."""
        side = self.start << first
        progress = float(self.progress)  # read once per forward (one device sync on GPU)
        for i in range(first, len(self.stages)):
            if i > first:
                x = pixel_shuffle_tokens(x, side, side) + self.pos[i]  # 2x the side, 1/4 of the embedding
                side *= 2
            for j, block in enumerate(self.stages[i]):
                x = block(x, self.attention_bias(i, j, progress))
        return tokens_to_grid(self.out(x), side, side)

    def attention_bias(self, stage: int, block: int, progress: float) -> Tensor | None:
        """What block `block` of `stage` adds to its attention: the locality mask (bool), the relative position bias
        (float), both (the bias with -inf outside the mask), or None."""
        mask = self.attention_mask(stage, progress, block)
        key = f"{stage}_{block}"
        if self.rel_bias is None or key not in self.rel_bias:
            return mask
        bias = self.rel_bias[key]()
        return bias if mask is None else bias.masked_fill(~mask, float("-inf"))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        w = self.cond(z, y)
        x = self.input(w).view(z.shape[0], self.start ** 2, self.dims[0]) + self.pos[0]
        return self._run(x, 0)

    def super_resolve(self, low: Tensor) -> Tensor:
        """Super-resolution path: a (B, code_dim, grid/2, grid/2) coarse latent -> (B, code_dim, grid, grid). The
        coarse grid replaces the generator's own tokens at the input of the second-to-last stage (whose grid is
        grid/2), and the same last stages and output layer as in `forward` produce the full grid."""
        if self.sr_in is None:
            raise RuntimeError("super-resolution co-training is off (cfg.sr_weight = 0)")
        first = len(self.stages) - 2
        return self._run(self.sr_in(grid_to_tokens(low)) + self.pos[first], first)


def sr_loss(generator: TransGANGenerator, real: Tensor) -> Tensor:
    """Super-resolution co-training loss (TransGAN's multi-task co-training, carried to latent grids).

    The real latent grid is average-pooled 2x2 into a coarse latent (what the VQGAN encoder's features would look
    like at half the resolution, in the same embedding space); the generator's last two stages must reconstruct
    the real grid from it (MSE). This trains the upsampling stages on real local structure of the latent space
    directly, independently of D, which steadies them early in training. The training stage adds
    cfg.sr_weight * sr_loss to the generator loss."""
    return F.mse_loss(generator.super_resolve(F.avg_pool2d(real, 2)), real)


# -----------------------------------------------------------------------------------------------------------------
# Discriminator


class TransGANDiscriminator(nn.Module):
    """(B, code_dim, grid, grid) [+ (B,) labels] -> (B,) logits, read from a class token.

    With attention_kind "ylg" the blocks run on the patch grid only (YLG's pattern is laid over the 2D grid and a
    class token has no place in it) and the class token joins in one final full-attention block."""

    def __init__(self, cfg: TransGANConfig):
        super().__init__()
        if cfg.grid % cfg.d_patch:
            raise ValueError(f"d_patch {cfg.d_patch} must divide grid {cfg.grid}")
        c, self.side = cfg.d_dim, cfg.grid // cfg.d_patch
        self.embed = nn.Conv2d(cfg.code_dim, c, cfg.d_patch, stride=cfg.d_patch)  # = linear on flattened patches
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, c))
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.side ** 2 + 1, c))  # [class token, patches]

        def full() -> nn.Module:
            return MultiHeadAttention(c, cfg.n_heads, bias=True, backend=cfg.backend)

        self.blocks = nn.ModuleList(
            TransformerBlock(c, make_attention(cfg.attention_kind, c, cfg.n_heads, self.side, full,
                                               backend=cfg.backend), cfg.mlp_ratio)
            for _ in range(cfg.d_depth))
        self.cls_block = TransformerBlock(c, full(), cfg.mlp_ratio) if cfg.attention_kind == "ylg" else None
        self.norm = nn.LayerNorm(c)
        self.mbstd_group = cfg.mbstd_group
        self.head = nn.Linear(c + (1 if cfg.mbstd_group else 0), 1)
        self.project = ClassProjection(cfg.n_classes, c)
        # relative positions of the patch tokens (the class token, first, has none); built last, as in the generator
        self.rel_bias = nn.ModuleList(RelativePositionBias(self.side, cfg.n_heads, prefix=1)
                                      for _ in self.blocks) \
            if cfg.rel_pos and cfg.attention_kind == "native" else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        t = grid_to_tokens(self.embed(x))
        cls = self.cls.expand(t.shape[0], -1, -1) + self.pos[:, :1]
        t = t + self.pos[:, 1:]
        if self.cls_block is None:
            t = torch.cat([cls, t], dim=1)
        for i, block in enumerate(self.blocks):
            t = block(t) if self.rel_bias is None else block(t, self.rel_bias[i]())
        if self.cls_block is not None:
            t = self.cls_block(torch.cat([cls, t], dim=1))
        f = self.norm(t[:, 0])
        return self.head(with_minibatch_std(f, self.mbstd_group)).squeeze(1) + self.project(f, y)
