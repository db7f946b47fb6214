"""A discriminator on decoded images, for the latent-space GANs (`train_transformer.gan.d_space: image`).

Why. Real latent grids are exact codewords while a generator's grids are continuous, so a discriminator on latent
grids can separate them by the distance to the nearest codeword, a property of the codebook and not of the image.
Decoding both through the frozen VQGAN decoder and judging pixels makes D look at what is sampled.

Layout: stride-2 3x3 convolutions with LeakyReLU(0.2) and no normalisation (R1 and per-sample gradients stay
per-sample), down to 4x4, one more conv, global sum pooling, then a linear logit plus, when conditional, the
projection term <embed(y), features> of Miyato & Koyama (2018, cGANs with projection discriminator).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.gan_common import with_minibatch_std


class PixelDiscriminator(nn.Module):
    def __init__(self, in_channels: int, resolution: int, base: int = 32, n_classes: int = 0, mbstd_group: int = 0):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"the image discriminator needs a power-of-two resolution >= 8, got {resolution}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 3, padding=1), nn.LeakyReLU(0.2)]
        c, side = base, resolution
        while side > 4:  # halve the side, double the channels (at most 8 x base)
            c_out = min(2 * c, 8 * base)
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c, side = c_out, side // 2
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.mbstd_group = mbstd_group  # the family config's: see models.gan_common.minibatch_std
        self.head = nn.Linear(c + (1 if mbstd_group else 0), 1)
        self.embed = nn.Embedding(n_classes, c) if n_classes else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.body(x).sum(dim=(2, 3))  # (B, c)
        logit = self.head(with_minibatch_std(h, self.mbstd_group)).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional discriminator needs class labels")
            logit = logit + (self.embed(y) * h).sum(1)
        return logit


def straight_through_snap(latent: Tensor, codebook: Tensor, tokens: Tensor) -> Tensor:
    """Latent grids (B, d, h, w) replaced by their nearest codes `codebook[tokens]` in the forward pass, with the
    identity as gradient (straight-through): D sees exact codewords, as in every real grid and every sample."""
    snapped = codebook[tokens].permute(0, 3, 1, 2).to(latent.dtype)
    return latent + (snapped - latent).detach()


def nearest_code_distance(latent: Tensor, codebook: Tensor) -> Tensor:
    """Per-sample mean distance of a grid's vectors to their nearest code: the feature that gives latent-space real
    and fake grids apart without looking at the image (0 for every real grid)."""
    flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).float()
    # differences, not the |a|^2 + |b|^2 - 2ab expansion: a codeword's distance to itself is exactly 0
    d = torch.cdist(flat, codebook.float(), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    return d.view(latent.shape[0], -1).mean(1)
