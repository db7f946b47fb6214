"""PatchGAN discriminator and the GAN losses used to train the VQGAN tokenizer.

The discriminator (pix2pix / Taming layout) scores overlapping patches rather than whole images, so it judges
local texture, which is what pixel and perceptual losses leave blurry.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.ranks import mean_over_ranks


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # BatchNorm statistics are noise at batch sizes of a few images; GroupNorm does not depend on the batch
        groups = max(1, min(32, channels // 4))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        """n_layers stride-2 convs in all (the first without norm), then a stride-1 conv and a 1-channel head.
        Output: a logit map [B, 1, h, w]; for 32x32 inputs h = w = 2 with n_layers=3, 6 with n_layers=2."""
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            # no conv bias: the following norm would cancel it
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), _norm(norm, c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # DCGAN initialisation, as pix2pix and Taming use
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def nonsaturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    # softplus(-x) = -log sigmoid(x): binary cross-entropy with real=1, fake=0, numerically stable
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def nonsaturating_g_loss(logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_fake).mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, delta: float = 1e-4,
                    max_weight: float = 1e4) -> Tensor:
    """Scale for the generator loss so its gradient at the decoder's last layer matches the reconstruction
    loss's gradient there (Taming): |grad rec| / (|grad g| + delta), clamped to [0, max_weight], detached."""
    # under torchrun: the whole batch's gradients (each rank's alone gave each rank its own weight)
    rec_grad = mean_over_ranks(torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0])
    g_grad = mean_over_ranks(torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
    weight = rec_grad.norm() / (g_grad.norm() + delta)
    return weight.clamp(0.0, max_weight).detach()
