"""The GAN family table: which generator and discriminator class each `gan.family` builds, and the latent-grid
<-> token conversions that training and sampling share.

A family's config class (models/gan_common.py) carries its architecture and the tokenmill recipe (PAPER_RECIPES
beside it holds the paper recipe; docs/gan_recipes.md); its modules live in
models/gan_lada.py (LadaGAN), models/gan_transgan.py (TransGAN), models/gan_stransgan.py (STransGAN).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gan_common import GANConfig, gan_config
from models.gan_lada import LadaDiscriminator, LadaGenerator
from models.gan_stransgan import STransDiscriminator, STransGenerator
from models.gan_transgan import TransGANDiscriminator, TransGANGenerator
from models.quantizer import nearest_codes

# family -> (generator class, discriminator class)
GAN_models: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "lada": (LadaGenerator, LadaDiscriminator),
    "transgan": (TransGANGenerator, TransGANDiscriminator),
    "stransgan": (STransGenerator, STransDiscriminator),
}


def _family(cfg: GANConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    if cfg.family not in GAN_models:
        raise ValueError(f"family must be one of {tuple(GAN_models)}, got {cfg.family!r}")
    return GAN_models[cfg.family]


def build_generator(cfg: GANConfig) -> nn.Module:
    return _family(cfg)[0](cfg)


def build_discriminator(cfg: GANConfig) -> nn.Module:
    return _family(cfg)[1](cfg)


def generator_from_config(model: dict[str, Any]) -> nn.Module:
    """Rebuild a generator from `config.json`'s "model" entry (the sample stage)."""
    fields = dict(model)
    return build_generator(gan_config(fields.pop("family"), **fields))


def embed_tokens(tokens: Tensor, codebook: Tensor, h: int, w: int) -> Tensor:
    """Token grids (B, h * w) -> code vectors (B, d, h, w) in the lookup space (the real samples)."""
    return codebook[tokens].view(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


def project_to_codes_space(x: Tensor, l2_norm: bool) -> Tensor:
    """Generator output as D sees it: unit vectors per cell when the codebook is l2-normalised (like every real
    code), unchanged otherwise."""
    return F.normalize(x, dim=1) if l2_norm else x


@torch.no_grad()
def snap_to_codes(latent: Tensor, codebook: Tensor, l2_norm: bool, chunk: int = 65536) -> Tensor:
    """Latent grids (B, d, h, w) -> token grids (B, h, w): the nearest code of every vector (squared L2; after
    l2-normalising the vector when the codebook is l2-normalised, i.e. the code with the largest cosine).
    Chunked so the distance matrix stays at most chunk x n_codes."""
    B, d, h, w = latent.shape
    flat = latent.float().permute(0, 2, 3, 1).reshape(-1, d)
    if l2_norm:
        flat = F.normalize(flat, dim=1)
    codebook = codebook.float()
    idx = torch.cat([nearest_codes(part, codebook) for part in flat.split(chunk)])
    return idx.view(B, h, w)
