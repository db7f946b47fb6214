"""VQGAN tokenizer: convolutional encoder -> vector quantizer -> convolutional decoder.

Follows the Taming Transformers layout (residual blocks with GroupNorm + SiLU, one self-attention block at the
lowest resolution) with LlamaGen's low-dimensional, optionally l2-normalised codebook: quant_conv projects the
encoder's z_channels down to code_dim for the lookup and post_quant_conv projects back up.

Images are in [-1, 1], shape [B, in_channels, H, W] with H and W divisible by f = 2 ** (len(ch_mult) - 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.quantizer import VectorQuantizer


@dataclass
class VQGANConfig:
    in_channels: int = 1             # image channels: 1 (grey) or 3 (RGB)
    ch: int = 32                     # base channel count; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level; downsampling f = 2 ** (len - 1)
    num_res_blocks: int = 1          # residual blocks per level (decoder uses one more per level, as Taming)
    attn: bool = True                # self-attention in the middle block (lowest resolution only: cheap there)
    z_channels: int = 32             # encoder output / decoder input channels
    n_codes: int = 512               # codebook size K
    code_dim: int = 16               # codebook vector size (lookup space; quant_conv maps z_channels -> code_dim)
    beta: float = 0.25               # commitment loss weight
    l2_norm: bool = True             # cosine lookup on unit vectors (LlamaGen)
    ema: bool = False                # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99          # EMA decay, only with ema
    dead_code_steps: int = 50        # revive a code unused for this many training steps; 0 disables
    buffer_size: int = 4096          # FIFO of recent encoder outputs that dead codes are revived from

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Norm(channels: int) -> nn.GroupNorm:
    # Taming uses 32 groups at ch=128; small models would get 1-channel groups (instance norm), so keep
    # at least 4 channels per group and pick the largest group count <= 32 that divides the channels.
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; used only at the lowest resolution (e.g. 8x8 = 64 tokens)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = Norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # each [B, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)  # learned stride-2 conv rather than pooling

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)  # nearest + conv avoids transposed-conv checkerboards

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c: int, attn: bool):
        super().__init__()
        self.res1 = ResBlock(c, c)
        self.attn = AttnBlock(c) if attn else nn.Identity()
        self.res2 = ResBlock(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        blocks: list[nn.Module] = []
        c = cfg.ch
        for level, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, c_out))
                c = c_out
            if level < len(chans) - 1:
                blocks.append(Downsample(c))
        self.down = nn.Sequential(*blocks)
        self.mid = MidBlock(c, cfg.attn)
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        c = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = MidBlock(c, cfg.attn)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks + 1):  # one extra block per level: decoding is the harder half
                blocks.append(ResBlock(c, chans[level]))
                c = chans[level]
            if level > 0:
                # the upsampling conv already drops to the next level's width, so no full-resolution conv runs
                # at the wider width (Taming keeps it wide until the next block: ~15% more compute here)
                blocks.append(Upsample(c, chans[level - 1]))
                c = chans[level - 1]
        self.up = nn.Sequential(*blocks)
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        if cfg.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)       # z_channels -> low-dim lookup space
        self.quantizer = VectorQuantizer(cfg.n_codes, cfg.code_dim, beta=cfg.beta, l2_norm=cfg.l2_norm,
                                         ema=cfg.ema, ema_decay=cfg.ema_decay,
                                         dead_code_steps=cfg.dead_code_steps, buffer_size=cfg.buffer_size)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)  # back up for the decoder
        self.decoder = Decoder(cfg)

    def encode_latent(self, x: Tensor) -> Tensor:
        """Continuous encoder output in code space [B, code_dim, h, w] (before quantization; for k-means init)."""
        f = self.cfg.downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {f}")
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Images -> (z_q [B, code_dim, h, w], indices [B, h, w], quantizer aux: losses and usage stats)."""
        return self.quantizer(self.encode_latent(x))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Token grid [B, h, w] -> images [B, in_channels, h * f, w * f]."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images -> (reconstruction, aux). aux: quantizer loss terms and stats, plus the indices."""
        z_q, indices, aux = self.encode(x)
        return self.decode(z_q), {**aux, "indices": indices}

    def last_layer(self) -> Tensor:
        """Weight of the decoder's final conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def codebook_fingerprint(self) -> str:
        """Hash of the codebook and this model's config; stored with tokens and checked on decode."""
        return self.quantizer.codebook_fingerprint(asdict(self.cfg))
