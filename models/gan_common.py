"""Pieces shared by the transformer GANs (LadaGAN, TransGAN, STransGAN) that work in the VQGAN latent space.

Frame: a real sample is the codebook embedding of a stored token grid, a (B, d, h, w) tensor (d = code_dim, h = w =
`grid`). A generator maps noise z (and a class label when conditional) to a (B, d, h, w) grid; a discriminator maps a
(B, d, h, w) grid (and the label) to logits (B,). Snapping generator outputs to the nearest codes happens in the
sample stage, not here. The family table (which class a config builds) is models/gan.py.

Read top to bottom:
  1. configs        one dataclass per family with plain fields (GANConfig holds the shared ones), `gan_config`;
                    the two labelled recipes (`tokenmill`: the class defaults; `paper`: PAPER_RECIPES), `recipe_fields`
  2. layers         token <-> grid reshapes, pixel shuffle on tokens, the attention factory (`attention_kind`),
                    a pre-norm transformer block, the noise+class input, the projection-discriminator term
  3. (the generator EMA lives in training/common.py: one EMA for every training stage)
  4. DiffAugment    translation (zero padding) and cutout of latent grids, deterministic given a torch.Generator
  5. losses         non-saturating logistic and hinge (the VQGAN's own implementations), R1, WGAN-GP
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import MultiHeadAttention, YLGAttention
# One implementation of each GAN loss in the project: the VQGAN's discriminator module already has them.
# Their D losses average the real and fake terms (0.5 * (real + fake)); r1_gamma below is added to that average.
from models.discriminator import hinge_d_loss, hinge_g_loss, nonsaturating_d_loss, nonsaturating_g_loss

FAMILIES = ("lada", "transgan", "stransgan")
ATTENTION_KINDS = ("native", "ylg", "full")
LOSSES = ("nonsat", "hinge", "wgan-gp")
RECIPES = ("paper", "tokenmill")
AUGMENTS = ("translation", "cutout")

# -----------------------------------------------------------------------------------------------------------------
# 1. Configs
#
# Plain fields only, so a config round-trips through params.yaml / JSON. The optimisation fields (lr, betas, loss,
# r1_gamma, gp_lambda, n_critic, grad_clip, ema_decay, diffaug) are read by the training stage. Each family's class
# defaults are the `tokenmill` recipe (what measures best here, model sizes scaled down to run on a CPU); the `paper`
# recipe is the family's defaults with PAPER_RECIPES[family] on top (below the classes, with the source of each value;
# docs/gan_recipes.md has the table and the deviations the latent grid forces).


@dataclass
class GANConfig:
    family: str = ""
    code_dim: int = 16           # d: channels of a latent grid (the VQGAN codebook dimension)
    grid: int = 8                # h = w of the latent grid (a power of two: 4, 8, 16, 32)
    z_dim: int = 64              # noise dimension
    n_classes: int = 0           # 0 = unconditional; else labels 0 .. n_classes - 1 condition G and D
    class_dim: int = 32          # size of the generator's class embedding
    attention_kind: str = "native"  # "native" = the family's own attention; "ylg" / "full" replace it everywhere
    n_heads: int = 4             # a multiple of 4 when attention_kind == "ylg" (YLG's 4 patterns x steps)
    mlp_ratio: float = 2.0
    backend: str | None = None   # attention backend (models.attention.BACKENDS); None = the device's default
    # training recipe
    loss: str = "nonsat"         # "nonsat" (logistic) | "hinge" | "wgan-gp" (critic; see wgan_gp_penalty)
    r1_gamma: float = 0.0        # R1 weight: gamma / 2 * E ||grad D(x_real)||^2; 0 = off
    gp_lambda: float = 10.0      # loss "wgan-gp": weight of the gradient penalty on real/fake interpolates
    wgan_drift: float = 0.0      # loss "wgan-gp": + drift * (E[D(real)])^2 in the critic loss (TransGAN's "eps" term)
    n_critic: int = 1            # D steps per G step: G (and its EMA) is updated on steps where step % n_critic == 0
    grad_clip: float = 0.0       # > 0: clip the total gradient norm of G and of D to this before each Adam step
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.99)
    lr_decay_from: float = 1.0   # fraction of the run after which both rates fall linearly to 0 at the end; 1 = off
    ema_decay: float = 0.999
    diffaug: str = ""            # comma-separated subset of AUGMENTS, applied to real and fake grids before D
    ms_weight: float = 0.0       # mode-seeking term (MSGAN, Mao et al. 2019) in G's loss; 0 = off (see train_gan)
    mbstd_group: int = 0         # D's minibatch standard deviation over groups of this many samples; 0 = off

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML / JSON give lists; tuples keep configs comparable and hashable
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.grid < 2 or self.grid & (self.grid - 1):
            raise ValueError(f"grid must be a power of two >= 2, got {self.grid}")
        if self.attention_kind not in ATTENTION_KINDS:
            raise ValueError(f"attention_kind must be one of {ATTENTION_KINDS}, got {self.attention_kind!r}")
        if self.attention_kind == "ylg" and self.n_heads % 4:
            raise ValueError(f"YLG attention needs n_heads to be a multiple of 4, got {self.n_heads}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")
        if self.mbstd_group < 0 or self.mbstd_group == 1:
            raise ValueError(f"mbstd_group must be 0 (off) or >= 2, got {self.mbstd_group}")
        if not 0.0 <= self.lr_decay_from <= 1.0:
            raise ValueError(f"lr_decay_from must be in [0, 1] (1 = constant rates), got {self.lr_decay_from}")
        if min(self.gp_lambda, self.wgan_drift, self.grad_clip) < 0:
            raise ValueError("gp_lambda, wgan_drift and grad_clip must be >= 0")
        for name in filter(None, self.diffaug.split(",")):
            if name.strip() not in AUGMENTS:
                raise ValueError(f"diffaug entries must be in {AUGMENTS}, got {name!r}")

    def start_grid(self, n_stages: int) -> int:
        """Side of the generator's first token grid when `n_stages` stages each double it up to `grid`."""
        start = self.grid >> (n_stages - 1)
        if start < 1 or start << (n_stages - 1) != self.grid:
            raise ValueError(f"{n_stages} generator stages cannot grow a grid to {self.grid}x{self.grid}")
        return start


@dataclass
class LadaConfig(GANConfig):
    """LadaGAN (Morales-Juarez & Fuentes-Pineda, 2024). Defaults = its paper's code (milmor/LadaGAN, config.py and
    train.py): logistic loss + R1 gamma 0.01, Adam lr 2e-4 for G and D, betas (0.5, 0.99), EMA 0.999, DiffAugment
    translation (its colour augmentation means nothing for latent channels). The two recipes differ only in the
    mode-seeking term."""
    family: str = "lada"
    g_dims: tuple[int, ...] = (128, 64, 32)  # embedding per generator stage; stage i runs at grid / 2^(S-1-i)
    g_depth: int = 1                          # Ladaformer blocks per stage (the paper uses one)
    d_base: int = 32                          # channels of the discriminator's first conv; doubles per down block
    d_grid: int = 4                           # side of the grid the discriminator's Ladaformer runs on
    d_depth: int = 1
    loss: str = "nonsat"
    r1_gamma: float = 0.01
    betas: tuple[float, float] = (0.5, 0.99)
    diffaug: str = "translation"


@dataclass
class TransGANConfig(GANConfig):
    """TransGAN (Jiang et al., 2021). Class defaults: hinge loss, Adam lr 1e-4 for G and D (the tokenmill recipe
    raises both to 5e-4 and trains D as LadaGAN does: logistic loss, R1 0.01, translation only), betas (0, 0.99),
    DiffAugment translation + cutout, grid attention on the 8x8 stage, locality masks on every full-attention layer.
    The paper's recipe (PAPER_RECIPES["transgan"]) adds WGAN-GP with 4 critic steps, gradient clipping, the
    super-resolution co-training, relative positions and full attention at these grid sizes."""
    family: str = "transgan"
    g_dim: int = 256                       # embedding of the first stage; each pixel shuffle divides it by 4
    g_depths: tuple[int, ...] = (2, 2, 2)  # blocks per stage; the number of stages sets the start grid
    grid_attention_min: int = 8            # stages whose grid side is >= this (and > a cell) use grid attention ...
    grid_cell: int = 4                     # ... inside cell x cell squares; smaller grids use full attention
    locality_radius: int = 1               # locality-aware init: start radius of the neighbourhood (Chebyshev)
    locality_until: float = 0.5            # training progress at which the mask has widened to full attention
    locality_layers: str = "all"           # which G full-attention layers start local: "all" | "last" (the last
                                           # block of the last stage, as TransGAN's code does)
    rel_pos: bool = False                  # learned relative-position bias in G's and D's full-attention layers
                                           # (grid-attention layers always have one)
    sr_weight: float = 0.0                 # > 0 enables the super-resolution co-training loss (see gan_transgan)
    d_dim: int = 64
    d_depth: int = 3
    d_patch: int = 1                       # patch side (in latent cells) of the discriminator's tokens
    loss: str = "hinge"
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    diffaug: str = "translation,cutout"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.locality_layers not in ("all", "last"):
            raise ValueError(f"locality_layers must be 'all' or 'last', got {self.locality_layers!r}")


@dataclass
class STransGANConfig(GANConfig):
    """STransGAN (Xu et al., 2021). Class defaults: hinge loss, Adam lr 2e-4 for G and D (tokenmill: 4e-4),
    betas (0, 0.99), equalized learning rate in D's convs, skip projections, MLPs and head. The paper recipe
    (PAPER_RECIPES) also equalizes D's attention projections, ends every D block with a LeakyReLU and raises D's
    learning rate."""
    family: str = "stransgan"
    g_dims: tuple[int, ...] = (128, 64, 32)
    g_depth: int = 2        # Swin blocks per stage; odd blocks use shifted windows
    window: int = 4         # window side (clamped to the stage's grid; no shift when one window covers the grid)
    d_dim: int = 32         # discriminator tokens after the conv tokenizer; doubles at each patch merge
    d_depth: int = 2        # blocks per discriminator stage
    d_grid: int = 4         # the discriminator merges patches down to this grid side
    equalized_attention: bool = False  # D's attention projections (qkv, out) use equalized learning rate too
    block_act: bool = False            # every D block ends with LeakyReLU(0.2)
    loss: str = "hinge"
    betas: tuple[float, float] = (0.0, 0.99)
    diffaug: str = "translation"


# The two labelled recipes. `tokenmill` = the class defaults above + TOKENMILL_RECIPES[family]; `paper` = the class
# defaults + PAPER_RECIPES[family]. Explicit `gan:` params (model.*, lr_g, lr_d, r1_gamma, diffaug, ema_decay,
# ms_weight) are applied after either. Sources: "code" = the authors' repository, "text" = the paper; "chosen" = found
# in neither (docs/gan_recipes.md gives the reasons). Model sizes are not part of a recipe: they are scaled to the
# latent grid.

# tokenmill: what measured best here at 2000 steps on the default tokens (docs/results.md, issue 16)
MODE_SEEKING = {"ms_weight": 0.2}  # without it the conditional generators collapse within a class (recall ~0)
TOKENMILL_RECIPES: dict[str, dict[str, object]] = {
    # lada, measured on the lr-2e-3 tokens, gFID (recall), seeds 0/1/2: 44.0 (0.35) at the paper's 2e-4; mean 41.9
    # (0.31-0.33) at 4e-4; 41.5, 42.1 (0.29, 0.26) at 8e-4; mean 41.0 (0.28-0.34) at 8e-4 with ms_weight 0.5; and with
    # the rates decaying linearly to 0 over the second half: mean 40.05 (0.33-0.39), lower at every seed (the AR
    # model over the same seeds: mean 40.6)
    "lada": {**MODE_SEEKING, "lr_g": 8e-4, "lr_d": 8e-4, "ms_weight": 0.5, "lr_decay_from": 0.5},
    "transgan": {**MODE_SEEKING,  # measured gFID: 125.5 at the paper's 1e-4, 85.3 at 3e-4, 81.8 at 5e-4
                 "lr_g": 5e-4, "lr_d": 5e-4,
                 # LadaGAN's D-side training; on the lr-2e-3 tokens gFID 69.6, recall 0.147 (hinge, cutout: 91.6, 0.043)
                 "loss": "nonsat", "r1_gamma": 0.01, "diffaug": "translation"},
    "stransgan": {**MODE_SEEKING,
                  "lr_g": 4e-4, "lr_d": 4e-4,  # measured: gFID 86.8 vs 93.0 at 2e-4, better at every FID point
                  # LadaGAN's D-side training (its class default already augments by translation only); on the
                  # lr-2e-3 tokens, seeds 0/1: gFID 64.1 / 67.6, recall 0.28 / 0.28
                  # (hinge, no R1: 67.8 / 71.5, 0.21 / 0.15)
                  "loss": "nonsat", "r1_gamma": 0.01, "diffaug": "translation"},
}

PAPER_RECIPES: dict[str, dict[str, object]] = {
    # LadaGAN: the class defaults are already its code's recipe (milmor/LadaGAN pytorch/config.py, train.py)
    "lada": {"ms_weight": 0.0},
    # TransGAN: VITA-Group/TransGAN exps/cifar_train.py + functions.py (NeurIPS version), and the v1 paper/code for
    # the two techniques the NeurIPS code no longer carries (super-resolution co-training, locality-aware init)
    "transgan": {
        "loss": "wgan-gp",            # code: --loss wgangp-eps
        "gp_lambda": 10.0,            # code: gradient_penalty * 10 / phi^2, phi = 1
        "wgan_drift": 1e-3,           # code: + (mean D(real))^2 * 1e-3 (the "eps" of wgangp-eps)
        "n_critic": 4,                # code: --n_critic 4 (CIFAR-10)
        "grad_clip": 5.0,             # code: clip_grad_norm_(..., 5.) on G and D
        "lr_g": 1e-4, "lr_d": 1e-4,   # code: --g_lr 0.0001 --d_lr 0.0001, constant (no --lr_decay)
        "betas": (0.0, 0.99),         # code: --beta1 0 --beta2 0.99
        "ema_decay": 0.9999,          # code: --ema 0.9999; its 500-kimg half-life at batch 64 is 0.99991 per step
        "diffaug": "translation,cutout",  # code: translation,cutout,color (colour has no meaning on latent channels)
        "sr_weight": 50.0,            # v1 text: lambda = 50 for the super-resolution co-training loss
        "locality_layers": "last",    # v1 code: the mask sits on the last block of the last generator stage only
        "rel_pos": True,              # code: every G attention and D's patch-token attention has a relative bias
        "grid_attention_min": 64,     # code: full attention up to 32x32, grid attention from 64x64 on ...
        "grid_cell": 16,              # ... inside 16x16 cells (--g_window_size 16)
        "ms_weight": 0.0,
    },
    # STransGAN: no code is public and the text could not be read here; values per the issue and chosen (see docs)
    "stransgan": {
        "equalized_attention": True,  # issue: equalized LR in every D layer, attention projections included
        "block_act": True,            # issue: activations at the end of the blocks
        "lr_g": 2e-4,                 # chosen: the rate the family trained with before tokenmill measured 4e-4
        "lr_d": 2e-3,                 # chosen: StyleGAN2's rate for equalized-LR layers (the D is equalized throughout)
        "ms_weight": 0.0,
    },
}


def recipe_fields(family: str, recipe: str) -> dict[str, object]:
    """The config fields `recipe` sets on top of `family`'s class defaults."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if recipe == "tokenmill":
        return dict(TOKENMILL_RECIPES[family])
    elif recipe == "paper":
        return dict(PAPER_RECIPES[family])
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")


def gan_config(family: str, **fields) -> GANConfig:
    """The config dataclass for `family` with `fields` overriding its defaults (e.g. from params.yaml)."""
    if family == "lada":
        return LadaConfig(**fields)
    elif family == "transgan":
        return TransGANConfig(**fields)
    elif family == "stransgan":
        return STransGANConfig(**fields)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


# -----------------------------------------------------------------------------------------------------------------
# 2. Layers shared by the families. Token grids are (B, N, C) in raster order (token = row * w + col), as in
# models.attention; latent grids are (B, C, h, w).

def grid_to_tokens(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h * w, C)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h * w, C) -> (B, C, h, w)."""
    B, N, C = x.shape
    assert N == h * w, f"{N} tokens do not form a {h}x{w} grid"
    return x.transpose(1, 2).reshape(B, C, h, w)


def pixel_shuffle_tokens(x: Tensor, h: int, w: int) -> Tensor:
    """Upsample a token grid 2x by pixel shuffle: (B, h w, C) -> (B, 4 h w, C / 4). Each token's channels become a
    2x2 block of tokens, so resolution grows without new parameters while the embedding shrinks (TransGAN, LadaGAN)."""
    return grid_to_tokens(F.pixel_shuffle(tokens_to_grid(x, h, w), 2))


def make_attention(kind: str, dim: int, n_heads: int, grid: int, native: Callable[[], nn.Module], *,
                   backend: str | None = None) -> nn.Module:
    """The attention a family's block gets: its own (`native()`), or YLG sparse / full attention in its place."""
    if kind == "native":
        return native()
    elif kind == "ylg":
        return YLGAttention(dim, n_heads, (grid, grid), backend=backend)
    elif kind == "full":
        return MultiHeadAttention(dim, n_heads, bias=True, backend=backend)
    raise ValueError(f"attention_kind must be one of {ATTENTION_KINDS}, got {kind!r}")


def mlp(dim: int, ratio: float, act: Callable[[], nn.Module] = nn.GELU) -> nn.Sequential:
    hidden = max(1, int(dim * ratio))
    return nn.Sequential(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with both residuals: x + Attn(LN(x)), then x + MLP(LN(x)).

    `attn_bias` (a bool mask, True = may attend) is handed to the attention only when given; only
    MultiHeadAttention takes one (TransGAN's locality mask)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, act: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio, act)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + (self.attn(h) if attn_bias is None else self.attn(h, attn_bias=attn_bias))
        return x + self.mlp(self.norm2(x))


class NoiseAndClass(nn.Module):
    """The generator's conditioning vector: z, or [z, embedding(y)] when conditional (BigGAN-style concatenation, so
    every layer that reads it sees both the sample's noise and its class)."""

    def __init__(self, z_dim: int, n_classes: int, class_dim: int):
        super().__init__()
        self.embed = nn.Embedding(n_classes, class_dim) if n_classes > 0 else None
        self.out_dim = z_dim + (class_dim if n_classes > 0 else 0)

    def forward(self, z: Tensor, y: Tensor | None) -> Tensor:
        if self.embed is None:
            if y is not None:
                raise ValueError("this generator is unconditional (n_classes = 0) but got labels")
            return z
        if y is None:
            raise ValueError("this generator is conditional: pass class labels y")
        return torch.cat([z, self.embed(y)], dim=1)


class ClassProjection(nn.Module):
    """Projection discriminator term (Miyato & Koyama, 2018): <embedding(y), features>, added to the logit, so D
    judges "is this a real sample of class y" rather than "is this real"."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(n_classes, dim) if n_classes > 0 else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(dim))

    def forward(self, features: Tensor, y: Tensor | None) -> Tensor:
        """features: (B, dim) -> (B,) (zeros when unconditional)."""
        if self.embed is None:
            if y is not None:
                raise ValueError("this discriminator is unconditional (n_classes = 0) but got labels")
            return features.new_zeros(features.shape[0])
        if y is None:
            raise ValueError("this discriminator is conditional: pass class labels y")
        return (self.embed(y) * features).sum(dim=1)


# -----------------------------------------------------------------------------------------------------------------
# 3. EMA of the generator weights (sampling uses the averaged generator: smoother than the last iterate)

# -----------------------------------------------------------------------------------------------------------------
# 4. DiffAugment (Zhao et al., 2020) for latent grids. The same random transform family is applied to real and fake
# grids right before D (and differentiably, so G gets gradients through it). Colour jitter is left out: latent
# channels are not colours. Ratios are DiffAugment's: shifts up to 1/8 of the side, a cutout square of half the side.

def diff_augment(x: Tensor, policy: str, generator: torch.Generator | None = None, *,
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> Tensor:
    """Augment (B, C, h, w) latent grids with the comma-separated `policy` (subset of AUGMENTS, in that order).
    Randomness comes from `generator` (a CPU torch.Generator; None = the global RNG), one draw per sample."""
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name == "translation":
            x = _translate(x, translation_ratio, generator)
        elif name == "cutout":
            x = _cutout(x, cutout_ratio, generator)
        else:
            raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTS}")
    return x


def _randint(low: int, high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n integers in [low, high), drawn on the generator's (CPU) device and moved to the data."""
    return torch.randint(low, high, (n,), generator=generator).to(device)


def _translate(x: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Shift each sample by (dy, dx) in [-s, s]^2 cells, s = round(side * ratio); cells shifted in are zeros."""
    B, C, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-sy, sy + 1, B, generator, x.device)
    dx = _randint(-sx, sx + 1, B, generator, x.device)
    padded = F.pad(x, [sx, sx, sy, sy])  # zero border: out[i, j] = x[i - dy, j - dx] or 0 outside the grid
    rows = torch.arange(h, device=x.device)[None, :, None] + sy - dy[:, None, None]  # (B, h, 1)
    cols = torch.arange(w, device=x.device)[None, None, :] + sx - dx[:, None, None]  # (B, 1, w)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)


def _cutout(x: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Zero one square of side round(side * ratio) per sample, its centre anywhere on the grid (clipped at borders)."""
    B, C, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(0, h, B, generator, x.device)
    cx = _randint(0, w, B, generator, x.device)
    rows = torch.arange(h, device=x.device)[None, :, None] - (cy - ch // 2)[:, None, None]  # offset into the square
    cols = torch.arange(w, device=x.device)[None, None, :] - (cx - cw // 2)[:, None, None]
    inside = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)  # (B, h, w)
    return x * (~inside)[:, None].to(x.dtype)


# -----------------------------------------------------------------------------------------------------------------
# 5. Losses. d_loss / g_loss pick the pair by name (cfg.loss); r1_penalty regularises D on real data; WGAN-GP's
# critic adds wgan_gp_penalty on random interpolates (random_interpolates).

def d_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    if kind == "nonsat":
        return nonsaturating_d_loss(logits_real, logits_fake)
    elif kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    elif kind == "wgan-gp":  # the critic's part of WGAN-GP: E[D(fake)] - E[D(real)] (no 0.5: Gulrajani et al.'s form)
        return logits_fake.mean() - logits_real.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def g_loss(kind: str, logits_fake: Tensor) -> Tensor:
    if kind == "nonsat":
        return nonsaturating_g_loss(logits_fake)
    elif kind == "hinge":
        return hinge_g_loss(logits_fake)
    elif kind == "wgan-gp":
        return -logits_fake.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def random_interpolates(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x_hat = a * real + (1 - a) * fake with one a ~ U[0, 1) per sample, drawn from `generator` (a CPU generator,
    so a seeded run draws the same a on any device). The result is a leaf that requires grad."""
    a = torch.rand(real.shape[0], generator=generator).to(device=real.device, dtype=real.dtype)
    a = a.view(-1, *([1] * (real.dim() - 1)))
    return (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)


def wgan_gp_penalty(logits_hat: Tensor, x_hat: Tensor, lam: float) -> Tensor:
    """WGAN-GP (Gulrajani et al., 2017): lam * E_x_hat (||grad_x_hat D(x_hat)||_2 - 1)^2, the norm taken over all of a
    sample's entries. `logits_hat = D(x_hat)` with x_hat from random_interpolates; the graph is kept (create_graph)
    so the penalty trains D."""
    (grad,) = torch.autograd.grad(logits_hat.sum(), x_hat, create_graph=True)
    return lam * (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def minibatch_std(features: Tensor, group: int) -> Tensor:
    """(B, ...) -> (B, 1): the standard deviation of each feature across a group of samples, averaged over the
    features (Karras et al. 2018, "minibatch standard deviation"; groups of strided samples as in StyleGAN2).

    Appended to D's last features it lets D see how varied a batch is, which a per-sample D cannot: a generator
    that maps a class to a few images is then penalised for it. Sample i is in group i % (B / g), where g is the
    largest divisor of B not above `group`."""
    b = features.shape[0]
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    x = features.float().reshape(g, b // g, -1)
    std = (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # (B / g,)
    return std.repeat(g).unsqueeze(1).to(features.dtype)


def with_minibatch_std(features: Tensor, group: int) -> Tensor:
    """Channel-last features (B, C) or channel-first maps (B, C, H, W) with minibatch_std appended as one more
    channel (broadcast over H, W); unchanged when group is 0."""
    if not group:
        return features
    std = minibatch_std(features, group)
    if features.dim() == 4:
        std = std[:, :, None, None].expand(-1, 1, *features.shape[2:])
    return torch.cat([features, std], dim=1)


def r1_penalty(logits_real: Tensor, x_real: Tensor, gamma: float) -> Tensor:
    """R1 (Mescheder et al., 2018): gamma / 2 * E_x ||grad_x D(x)||^2 on real samples.

    `x_real` must have requires_grad set before `logits_real = D(x_real)` was computed; the graph is kept
    (create_graph) so the penalty trains D."""
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(dim=1).mean()


__all__ = [
    "FAMILIES", "ATTENTION_KINDS", "LOSSES", "AUGMENTS", "RECIPES", "GANConfig", "LadaConfig", "TransGANConfig",
    "STransGANConfig", "TOKENMILL_RECIPES", "PAPER_RECIPES", "recipe_fields", "gan_config", "grid_to_tokens",
    "tokens_to_grid",
    "pixel_shuffle_tokens", "make_attention", "mlp", "TransformerBlock", "NoiseAndClass", "ClassProjection",
    "diff_augment", "d_loss", "g_loss", "minibatch_std", "with_minibatch_std", "r1_penalty", "random_interpolates",
    "wgan_gp_penalty", "hinge_d_loss", "hinge_g_loss", "nonsaturating_d_loss",
    "nonsaturating_g_loss",
]
