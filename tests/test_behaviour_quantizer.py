"""The quantizer's EMA codebook update (models/quantizer.py) against a float64 reference of the formula, with a
decay that is not 0.5 (at 0.5, decay and 1 - decay are the same number and a swap goes unnoticed), over several
steps and with both codes in use, so the running sums, the counts and the Laplace smoothing all matter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.quantizer import VectorQuantizer


def reference_ema(codebook: torch.Tensor, batches: list[torch.Tensor], decay: float, eps: float) -> torch.Tensor:
    """cluster_size <- decay * size + (1 - decay) * counts; embed_sum <- decay * sum + (1 - decay) * sum of the
    assigned vectors; code = embed_sum / Laplace-smoothed size. Starts from size 1, embed_sum = code."""
    codes = codebook.double().clone()
    size = torch.ones(len(codes), dtype=torch.float64)
    embed = codes.clone()
    for z in batches:
        z = z.double()
        assign = torch.cdist(z, codes).argmin(1)
        counts = torch.bincount(assign, minlength=len(codes)).double()
        sums = torch.zeros_like(codes).index_add_(0, assign, z)
        size = decay * size + (1 - decay) * counts
        embed = decay * embed + (1 - decay) * sums
        n = size.sum()
        codes = embed / ((size + eps) / (n + len(codes) * eps) * n)[:, None]
    return codes


@pytest.mark.parametrize("decay", [0.8, 0.95])
def test_ema_codebook_follows_the_formula(decay):
    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    start = torch.tensor([[0.0, 0.0], [4.0, 4.0], [-4.0, 4.0]])
    vq = VectorQuantizer(n_codes=3, code_dim=2, ema=True, ema_decay=decay, ema_eps=eps).train()
    vq.codebook.copy_(start)
    vq.ema_embed_sum.copy_(start)
    # two clusters of different sizes around the first two codes (the third stays unused), three steps
    batches = []
    for _ in range(3):
        a = torch.tensor([1.0, 0.5]) + 0.3 * torch.randn(5, 2, generator=gen)
        b = torch.tensor([3.0, 3.5]) + 0.3 * torch.randn(2, 2, generator=gen)
        batches.append(torch.cat([a, b]))
    for z in batches:
        vq(z.t().reshape(1, 2, 7, 1))  # [B=1, D=2, h=7, w=1]: one vector per row of z
    expected = reference_ema(start, batches, decay, eps)
    # float32 arithmetic on values of size ~4 over three steps: rounding stays far below 1e-5
    assert torch.allclose(vq.codebook.double(), expected, rtol=0, atol=1e-5)
    # decay != 0.5 makes the two orders of the update differ by far more than that
    swapped = reference_ema(start, batches, 1 - decay, eps)
    assert (swapped - expected).abs().max() > 0.05


def test_codebook_fingerprint_is_the_documented_hash():
    """sha256 of the codebook as little-endian float32 bytes, then the config as compact, sorted, ASCII JSON.
    Stores record this value: another byte layout would make every existing token store look foreign. A float64
    codebook and a non-ASCII config value check the conversions."""
    import hashlib

    from models.quantizer import fingerprint_codebook
    codebook = torch.tensor([[0.1, -2.5], [3.0, 1e-3]], dtype=torch.float64)
    config = {"n_codes": 2, "name": "caf\u00e9", "dims": [2, 4]}
    h = hashlib.sha256(np.array([[0.1, -2.5], [3.0, 1e-3]], dtype="<f4").tobytes())
    h.update(b'{"dims":[2,4],"n_codes":2,"name":"caf\\u00e9"}')
    assert fingerprint_codebook(codebook, config) == h.hexdigest()
    vq = VectorQuantizer(n_codes=2, code_dim=2)
    vq.codebook.data.copy_(codebook)
    assert vq.codebook_fingerprint(config) == h.hexdigest()
