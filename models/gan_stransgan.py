"""STransGAN in the VQGAN latent space (Xu, Xu, Chen, Zhou & Loy, 2021, "STransGAN: An Empirical Study on
Transformer in GANs" / "The Nuts and Bolts of Adopting Transformer in GANs").

Generator (STrans-G, convolution-free): z (+ class) -> linear -> small token grid -> stages of Swin blocks
    (window attention, every other block with shifted windows) -> pixel shuffle + linear between stages -> linear
    to code_dim. Conditioning enters through trunk AdaNorm (below).
Discriminator (STrans-D): a convolutional tokenizer, then Swin blocks whose residual connections are replaced by
    skip projections, patch merging down to a small grid, a LeakyReLU MLP head; its own linear and conv layers use
    equalized learning rate, and with cfg.equalized_attention its attention projections too (`equalize_linears`);
    cfg.block_act ends every block with a LeakyReLU.

Trunk AdaNorm, as we read the paper: with the usual pre-norm block x + Attn(AdaNorm(x, c)) the class only reaches the
    branch inputs; the identity path carries the unmodulated trunk forward, and the paper finds the class signal
    fades along the residual stream. Trunk AdaNorm normalises and modulates the residual stream itself, and the
    result replaces it:  x <- AdaNorm(x, c); x <- x + Attn(x); x <- AdaNorm(x, c); x <- x + MLP(x).
    What is normalised is the trunk x (LayerNorm over channels per token, then a per-sample scale and shift from
    c = [z, class embedding]), so the skip path carries the class too. (c is z alone when unconditional, which
    makes the same layer a self-modulation by the noise.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import WindowAttention
from models.gan_common import (ClassProjection, NoiseAndClass, STransGANConfig, grid_to_tokens, make_attention,
                               pixel_shuffle_tokens, tokens_to_grid, with_minibatch_std)

# -----------------------------------------------------------------------------------------------------------------
# Equalized learning rate (Karras et al., 2018): weights are stored N(0, 1) and scaled at every forward by
# c = lr_mul / sqrt(fan_in) (He's constant). Adam's update size is then the same for every layer relative to its
# effective weight, whatever the layer's fan-in.


class EqualLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.scale, bias)


class EqualConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = 1.0 / math.sqrt(c_in * kernel_size * kernel_size)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


# -----------------------------------------------------------------------------------------------------------------
# Generator


def swin_attention(kind: str, dim: int, n_heads: int, side: int, window: int, index: int,
                   backend: str | None) -> nn.Module:
    """Block `index` of a stage: window attention, shifted by half a window on odd blocks (Swin's alternation).
    The window is clamped to the grid; when one window covers the grid there is nothing to shift."""
    window = min(window, side)
    shift = window // 2 if index % 2 == 1 and window < side else 0
    return make_attention(kind, dim, n_heads, side,
                          lambda: WindowAttention(dim, n_heads, (side, side), window, shift=shift, backend=backend),
                          backend=backend)


class AdaNorm(nn.Module):
    """LayerNorm without its own affine, then a per-sample scale (1 + gamma(c)) and shift beta(c)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.affine = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gamma, beta = self.affine(c)[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1.0 + gamma) + beta


class TrunkAdaNormBlock(nn.Module):
    """Swin block with trunk AdaNorm (see the module docstring): the normalised, class-modulated stream replaces the
    trunk before each residual branch, so the identity path carries the conditioning."""

    def __init__(self, dim: int, cond_dim: int, attn: nn.Module, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaNorm(dim, cond_dim)
        self.attn = attn
        self.norm2 = AdaNorm(dim, cond_dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        x = self.norm1(x, c)
        x = x + self.attn(x)
        x = self.norm2(x, c)
        return x + self.mlp(x)


class STransGenerator(nn.Module):
    """(B, z_dim) noise [+ (B,) labels] -> (B, code_dim, grid, grid) latent grid."""

    def __init__(self, cfg: STransGANConfig):
        super().__init__()
        dims = tuple(cfg.g_dims)
        for a in dims[:-1]:
            if a % 4:
                raise ValueError(f"g_dims before the last stage must be divisible by 4 (pixel shuffle), got {dims}")
        self.cfg, self.z_dim = cfg, cfg.z_dim
        self.start = cfg.start_grid(len(dims))
        self.cond = NoiseAndClass(cfg.z_dim, cfg.n_classes, cfg.class_dim)
        c_dim = self.cond.out_dim
        self.input = nn.Linear(c_dim, self.start ** 2 * dims[0])
        self.pos = nn.ParameterList()
        self.expand = nn.ModuleList()  # linear after each pixel shuffle (the generator stays convolution-free)
        self.stages = nn.ModuleList()
        for i, dim in enumerate(dims):
            side = self.start << i
            self.pos.append(nn.Parameter(0.02 * torch.randn(1, side * side, dim)))
            if i > 0:
                self.expand.append(nn.Linear(dims[i - 1] // 4, dim))
            self.stages.append(nn.ModuleList(
                TrunkAdaNormBlock(dim, c_dim, swin_attention(cfg.attention_kind, dim, cfg.n_heads, side, cfg.window,
                                                             b, cfg.backend), cfg.mlp_ratio)
                for b in range(cfg.g_depth)))
        self.out_norm = AdaNorm(dims[-1], c_dim)
        self.out = nn.Linear(dims[-1], cfg.code_dim)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        c = self.cond(z, y)
        side = self.start
        x = self.input(c).view(z.shape[0], side * side, -1) + self.pos[0]
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.expand[i - 1](pixel_shuffle_tokens(x, side, side)) + self.pos[i]
                side *= 2
            for block in blocks:
                x = block(x, c)
        return tokens_to_grid(self.out(self.out_norm(x, c)), side, side)


# -----------------------------------------------------------------------------------------------------------------
# Discriminator


def equalize_linears(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear directly inside `module` (e.g. an attention's qkv and output projections) by an
    EqualLinear of the same shape, in place, so the attention's own forward runs on equalized weights. Returns it."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, EqualLinear(child.in_features, child.out_features, bias=child.bias is not None))
    return module


class SkipProjectionBlock(nn.Module):
    """Discriminator Swin block with skip projections: x <- Attn(LN(x)) + P1 x; x <- MLP(LN(x)) + P2 x
    [; x <- LeakyReLU(x) with `end_act`].

    The paper finds that with identity residuals a transformer D routes most of its signal around the attention
    branches; a learned (equalized) projection on the skip path replaces the identity. LeakyReLU in the MLP."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, end_act: bool = False):
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.skip1 = EqualLinear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(EqualLinear(dim, hidden), nn.LeakyReLU(0.2), EqualLinear(hidden, dim))
        self.skip2 = EqualLinear(dim, dim, bias=False)
        self.end_act = nn.LeakyReLU(0.2) if end_act else None  # no parameters: the state dict is the same either way

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x)) + self.skip1(x)
        x = self.mlp(self.norm2(x)) + self.skip2(x)
        return self.end_act(x) if self.end_act is not None else x


class STransDiscriminator(nn.Module):
    """(B, code_dim, grid, grid) [+ (B,) labels] -> (B,) logits.

    Conv tokenizer (two 3x3 equalized convs, LeakyReLU; one token per latent cell) -> stages of skip-projection Swin
    blocks, with a patch merge (SpaceToDepth + equalized linear, 2x the channels) between stages until the grid side
    is d_grid -> LayerNorm, mean over tokens -> equalized-linear LeakyReLU head (+ class projection)."""

    def __init__(self, cfg: STransGANConfig):
        super().__init__()
        c = cfg.d_dim
        self.tokenizer = nn.Sequential(EqualConv2d(cfg.code_dim, c, 3, padding=1), nn.LeakyReLU(0.2),
                                       EqualConv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2))
        last = min(cfg.d_grid, cfg.grid)
        n_stages = int(math.log2(cfg.grid // last)) + 1
        self.sides = [cfg.grid >> i for i in range(n_stages)]
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, side in enumerate(self.sides):
            if i > 0:
                self.merges.append(EqualLinear(4 * c, 2 * c))
                c *= 2
            self.stages.append(nn.Sequential(*(
                SkipProjectionBlock(c, self._attention(cfg, c, side, b), cfg.mlp_ratio, end_act=cfg.block_act)
                for b in range(cfg.d_depth))))
        self.norm = nn.LayerNorm(c)
        self.mbstd_group = cfg.mbstd_group
        self.head = nn.Sequential(EqualLinear(c + (1 if cfg.mbstd_group else 0), c), nn.LeakyReLU(0.2),
                                  EqualLinear(c, 1))
        self.project = ClassProjection(cfg.n_classes, c)

    @staticmethod
    def _attention(cfg: STransGANConfig, dim: int, side: int, index: int) -> nn.Module:
        attn = swin_attention(cfg.attention_kind, dim, cfg.n_heads, side, cfg.window, index, cfg.backend)
        # off: the same modules and the same RNG draws as before the option existed (the tokenmill D is unchanged)
        return equalize_linears(attn) if cfg.equalized_attention else attn

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        t = grid_to_tokens(self.tokenizer(x))
        for i, (side, blocks) in enumerate(zip(self.sides, self.stages)):
            if i > 0:  # patch merge: 2x2 tokens -> one token with 4x the channels -> linear to 2x
                prev = self.sides[i - 1]
                t = self.merges[i - 1](grid_to_tokens(F.pixel_unshuffle(tokens_to_grid(t, prev, prev), 2)))
            t = blocks(t)
        f = self.norm(t).mean(dim=1)
        return self.head(with_minibatch_std(f, self.mbstd_group)).squeeze(1) + self.project(f, y)
