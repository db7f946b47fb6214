"""LadaGAN in the VQGAN latent space (Morales-Juarez & Fuentes-Pineda, 2024, "Efficient generative adversarial
networks using linear additive-attention Transformers").

Generator:  z (+ class) -> linear -> small token grid -> [Ladaformer stage] -> pixel shuffle + 3x3 conv -> ... ->
            (B, code_dim, grid, grid). Every stage doubles the grid side.
Discriminator (FastGAN-like): conv stem -> batch-norm down blocks -> Ladaformer at a small grid -> SpaceToDepth ->
            3x3 conv -> stride-2 conv head -> logit (plus the class projection when conditional).

The attention is models.attention.LadaAttention (one attention vector per head, cost linear in the number of tokens),
or YLG / full attention when cfg.attention_kind says so.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import LadaAttention
from models.gan_common import (ClassProjection, LadaConfig, NoiseAndClass, TransformerBlock, grid_to_tokens,
                               make_attention, mlp, tokens_to_grid, with_minibatch_std)

# -----------------------------------------------------------------------------------------------------------------
# Generator


class SelfModulatedLayerNorm(nn.Module):
    """SLN (ViTGAN; LadaGAN): SLN(x, w) = gamma(w) * LayerNorm(x) + beta(w), the affine parameters predicted per
    sample from the conditioning vector w. In LadaGAN w is the latent z itself ("fed directly by z", no mapping
    network as in ViTGAN); here w = z, or [z, class embedding] when conditional. Each SLN has its own small hidden
    layer (ReLU) before the gamma / beta heads, as in the paper's code.

    gamma is written 1 + delta(w) so a fresh layer starts as a plain LayerNorm (same function class: the head's bias
    absorbs the 1); that keeps early training from scaling every token by a near-zero random gain."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.hidden = nn.Sequential(nn.Linear(cond_dim, dim), nn.ReLU())
        self.gamma = nn.Linear(dim, dim)
        self.beta = nn.Linear(dim, dim)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """x: (B, N, C) tokens; w: (B, cond_dim)."""
        h = self.hidden(w)
        return self.norm(x) * (1.0 + self.gamma(h))[:, None] + self.beta(h)[:, None]


class LadaGeneratorBlock(nn.Module):
    """Self-modulated Ladaformer block of the generator:

        h   = x + Attn(SLN_1(x, w))        the attention residual is kept
        out = MLP(SLN_2(h, w))             NO residual here: out is the MLP output alone, h is not added back

    The removed residual is the second one, the skip that would carry the post-attention stream h around the MLP
    (a standard block returns h + MLP(SLN_2(h))). That is what the paper's generator does ("no residual from the
    attention output to the MLP output"); its code returns the MLP output directly. The discriminator's Ladaformer
    keeps both residuals. tests/test_gans.py checks this data flow with hooks."""

    def __init__(self, dim: int, cond_dim: int, attn: nn.Module, mlp_ratio: float):
        super().__init__()
        self.norm1 = SelfModulatedLayerNorm(dim, cond_dim)
        self.attn = attn
        self.norm2 = SelfModulatedLayerNorm(dim, cond_dim)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        h = x + self.attn(self.norm1(x, w))
        return self.mlp(self.norm2(h, w))


class LadaGenerator(nn.Module):
    """(B, z_dim) noise [+ (B,) labels] -> (B, code_dim, grid, grid) latent grid."""

    def __init__(self, cfg: LadaConfig):
        super().__init__()
        dims = tuple(cfg.g_dims)
        for a in dims[:-1]:
            if a % 4:
                raise ValueError(f"g_dims before the last stage must be divisible by 4 (pixel shuffle), got {dims}")
        self.cfg, self.z_dim = cfg, cfg.z_dim
        self.start = cfg.start_grid(len(dims))
        self.cond = NoiseAndClass(cfg.z_dim, cfg.n_classes, cfg.class_dim)
        w_dim = self.cond.out_dim
        self.input = nn.Linear(w_dim, self.start ** 2 * dims[0], bias=False)
        self.pos = nn.ParameterList()
        self.expand = nn.ModuleList()  # the conv after each pixel shuffle: local expansion of the embedding
        self.stages = nn.ModuleList()
        for i, dim in enumerate(dims):
            side = self.start << i
            self.pos.append(nn.Parameter(0.02 * torch.randn(1, side * side, dim)))
            if i > 0:
                self.expand.append(nn.Conv2d(dims[i - 1] // 4, dim, 3, padding=1))
            self.stages.append(nn.ModuleList(
                LadaGeneratorBlock(dim, w_dim, make_attention(cfg.attention_kind, dim, cfg.n_heads, side,
                                                              lambda d=dim: LadaAttention(d, cfg.n_heads),
                                                              backend=cfg.backend), cfg.mlp_ratio)
                for _ in range(cfg.g_depth)))
        self.out = nn.Conv2d(dims[-1], cfg.code_dim, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        w = self.cond(z, y)
        side = self.start
        x = self.input(w).view(z.shape[0], side * side, -1) + self.pos[0]
        for i, blocks in enumerate(self.stages):
            if i > 0:
                grid = F.pixel_shuffle(tokens_to_grid(x, side, side), 2)  # 2x the side, 1/4 of the channels
                side *= 2
                x = grid_to_tokens(self.expand[i - 1](grid)) + self.pos[i]
            for block in blocks:
                x = block(x, w)
        return self.out(tokens_to_grid(x, side, side))


# -----------------------------------------------------------------------------------------------------------------
# Discriminator


class DownBlock(nn.Module):
    """FastGAN down block: a strided conv path and an avg-pool + 1x1 path, each batch-normed, averaged."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))
        self.direct = nn.Sequential(
            nn.AvgPool2d(2), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (self.main(x) + self.direct(x))


class LadaDiscriminator(nn.Module):
    """(B, code_dim, grid, grid) [+ (B,) labels] -> (B,) logits.

    Down blocks halve the grid until its side is d_grid (none when the latent grid is already that small), each
    doubling the channels; a Ladaformer (both residuals, plain LayerNorm) mixes the whole grid; SpaceToDepth folds
    2x2 cells into channels; a stride-2 conv gives the logit map, averaged to one logit per sample."""

    def __init__(self, cfg: LadaConfig):
        super().__init__()
        self.side = min(cfg.d_grid, cfg.grid)
        if self.side < 2:
            raise ValueError(f"the discriminator grid must be >= 2 for SpaceToDepth, got {self.side}")
        n_down = int(math.log2(cfg.grid // self.side))
        chans = [cfg.d_base * 2 ** i for i in range(n_down + 1)]
        self.stem = nn.Sequential(nn.Conv2d(cfg.code_dim, chans[0], 3, padding=1, bias=False), nn.LeakyReLU(0.2))
        self.down = nn.Sequential(*(DownBlock(chans[i], chans[i + 1]) for i in range(n_down)))
        c = chans[-1]
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.side ** 2, c))
        self.blocks = nn.ModuleList(
            TransformerBlock(c, make_attention(cfg.attention_kind, c, cfg.n_heads, self.side,
                                               lambda: LadaAttention(c, cfg.n_heads), backend=cfg.backend),
                             cfg.mlp_ratio)
            for _ in range(cfg.d_depth))
        c_out = 2 * c
        self.post = nn.Sequential(nn.Conv2d(4 * c, c_out, 3, padding=1), nn.LeakyReLU(0.2))  # after SpaceToDepth
        self.mbstd_group = cfg.mbstd_group
        self.head = nn.Conv2d(c_out + (1 if cfg.mbstd_group else 0), 1, 3, stride=2, padding=1)
        self.project = ClassProjection(cfg.n_classes, c_out)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.down(self.stem(x))
        t = grid_to_tokens(h) + self.pos
        for block in self.blocks:
            t = block(t)
        h = self.post(F.pixel_unshuffle(tokens_to_grid(t, self.side, self.side), 2))
        logit = self.head(with_minibatch_std(h, self.mbstd_group)).mean(dim=(1, 2, 3))
        return logit + self.project(h.mean(dim=(2, 3)), y)
