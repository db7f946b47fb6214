"""The VQGAN's losses (Taming Transformers), one function per side, beside the loop that calls them
(training/vqgan.py), as LlamaGen keeps `vq_loss.py` beside its tokenizer training.

Generator side: reconstruction (L1 or L2) + lpips_weight * LPIPS (from `lpips_start`) + quantizer loss + lambda * GAN,
where the GAN term is on only from `disc_start` and lambda = disc_weight * |grad L_rec| / (|grad L_GAN| + delta) at the
decoder's last layer (clamped to adaptive_max). Discriminator side: the chosen pair's D loss on reals against detached
fakes.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from models.discriminator import (adaptive_weight, hinge_d_loss, hinge_g_loss, nonsaturating_d_loss,
                                  nonsaturating_g_loss)


def gan_losses(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(d_loss, g_loss) for `loss.disc_loss`: hinge or non-saturating."""
    if kind == "hinge":
        return hinge_d_loss, hinge_g_loss
    return nonsaturating_d_loss, nonsaturating_g_loss


def generator_loss(x: Tensor, recon: Tensor, q_loss: Tensor, loss: Any, lpips: nn.Module | None,
                   disc: nn.Module, last_layer: Tensor, gan_on: bool,
                   lpips_on: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The autoencoder's loss for one micro-batch and its parts (rec, lpips, q, and g, d_weight when the GAN term
    is on). `loss` is the `train_vqgan.loss` section; `lpips_on` is False before `loss.lpips_start`."""
    rec = (recon - x).abs().mean() if loss.rec == "l1" else (recon - x).pow(2).mean()
    use_lpips = lpips_on and lpips is not None and loss.lpips_weight > 0
    p = lpips(x, recon).mean() if use_lpips else recon.new_zeros(())
    nll = rec + loss.lpips_weight * p
    total = nll + q_loss
    parts = {"rec": rec, "lpips": p, "q": q_loss}
    if gan_on:
        g = gan_losses(loss.disc_loss)[1](disc(recon))
        w = loss.disc_weight * adaptive_weight(nll, g, last_layer, max_weight=loss.adaptive_max)
        total = total + w * g
        parts.update(g=g, d_weight=w)
    return total, parts


def discriminator_loss(disc: nn.Module, real: Tensor, fake: Tensor, loss: Any) -> Tensor:
    """D's loss on real images against detached reconstructions."""
    return gan_losses(loss.disc_loss)[0](disc(real), disc(fake))
