"""Vector quantizer for the VQGAN tokenizer.

Each spatial vector z of the encoder output is replaced by its nearest codebook entry. Gradients pass the
quantization unchanged (straight-through estimator), and two losses tie encoder and codebook together:

    loss = ||sg[z] - c||^2  (codebook loss: moves codes to the encoder outputs)
         + beta * ||z - sg[c]||^2  (commitment loss: keeps the encoder near its codes)

Options, all off by default, each fixing a known codebook-collapse problem:
  - code_dim < in_dim: look up in a low-dimensional space (ViT-VQGAN, LlamaGen); fewer dimensions make the
    nearest-neighbour assignment spread over more codes.
  - l2_norm: compare directions only (cosine similarity), so code and encoder output norms cannot drift apart.
  - ema: codes become exponential moving averages of the vectors assigned to them (no codebook loss).
  - dead_code_steps: a code unused for that many consecutive training steps is reset to a recent encoder output.
  - kmeans_init: start the codebook at k-means centroids of real encoder outputs.

Everything training needs to resume step-exactly (usage counters, the FIFO of recent encoder outputs, EMA
statistics, the step counter that seeds revival draws) is a registered buffer, so state_dict holds it.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.ranks import gather_items


def nearest_codes(z_flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each row of z_flat [N, D]; codebook [K, D] -> [N].

    Expands ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2 so the work is one matmul instead of an N x K x D tensor.
    Callers with very large N should chunk (the distance matrix is N x K floats).
    """
    dist = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return dist.argmin(1)


def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre is drawn with probability proportional to its squared distance from
    the centres so far. faiss starts from random samples, which leaves clusters uncovered far more often."""
    sq_norms = x.pow(2).sum(1)
    idx = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = torch.full((len(x),), float("inf"))
    for _ in range(1, k):
        c = x[idx[-1]]
        d2 = torch.minimum(d2, (sq_norms - 2 * (x @ c) + c.dot(c)).clamp_min(0))  # matvec form: ~10x faster
        cdf = (d2 + 1e-12).cumsum(0)  # the epsilon keeps all-duplicate data drawable (uniform)
        idx.append(min(int(torch.searchsorted(cdf, torch.rand(1, generator=gen) * cdf[-1])), len(x) - 1))
    return x[idx]


def fingerprint_codebook(codebook: Tensor, model_config: dict) -> str:
    """sha256 over the codebook as little-endian float32 bytes, then the config as canonical JSON."""
    array = codebook.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    h = hashlib.sha256(array.tobytes())
    h.update(json.dumps(model_config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    return h.hexdigest()


class VectorQuantizer(nn.Module):
    def __init__(self, n_codes: int, code_dim: int, in_dim: int | None = None, beta: float = 0.25,
                 l2_norm: bool = False, ema: bool = False, ema_decay: float = 0.99, ema_eps: float = 1e-5,
                 dead_code_steps: int = 0, buffer_size: int = 4096):
        """n_codes K codes of size code_dim. in_dim: channels of the input; when it differs from code_dim a 1x1
        projection maps in and out (give in_dim=None when the caller already projects, as VQGAN's quant_conv does).
        dead_code_steps 0 disables revival; buffer_size is the FIFO of recent encoder outputs it draws from."""
        super().__init__()
        self.n_codes, self.code_dim, self.beta = n_codes, code_dim, beta
        self.l2_norm, self.ema, self.ema_decay, self.ema_eps = l2_norm, ema, ema_decay, ema_eps
        self.dead_code_steps = dead_code_steps

        in_dim = code_dim if in_dim is None else in_dim
        self.in_proj = nn.Conv2d(in_dim, code_dim, 1) if in_dim != code_dim else nn.Identity()
        self.out_proj = nn.Conv2d(code_dim, in_dim, 1) if in_dim != code_dim else nn.Identity()

        # small uniform init as in Taming; k-means init or revival replace it with data in practice
        codebook = torch.empty(n_codes, code_dim).uniform_(-1.0 / n_codes, 1.0 / n_codes)
        if ema:
            # EMA codes are not trained by the optimizer. Starting the cluster sizes at 1 with embed_sum = code keeps
            # embed_sum / cluster_size equal to the code, so a code that is never assigned stays where it is
            # (zeros would divide a decaying sum by ~eps and blow unused codes up).
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_cluster_size", torch.ones(n_codes))
            self.register_buffer("ema_embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)

        # usage tracking: consecutive training steps without an assignment, and assignments since reset_usage()
        self.register_buffer("steps_unused", torch.zeros(n_codes, dtype=torch.long))
        self.register_buffer("code_counts", torch.zeros(n_codes, dtype=torch.long))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        # FIFO of recent flattened encoder outputs (in code space) that dead codes are revived from
        self.register_buffer("z_buffer", torch.zeros(buffer_size if dead_code_steps > 0 else 0, code_dim))
        self.register_buffer("z_buffer_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("z_buffer_filled", torch.zeros((), dtype=torch.long))

    # ---- lookup ----

    def codes(self) -> Tensor:
        """The codebook as used for lookup: unit rows in l2_norm mode."""
        return F.normalize(self.codebook, dim=1) if self.l2_norm else self.codebook

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors for an index grid [B, h, w] -> [B, in_dim, h, w] (what the decoder side receives)."""
        z_q = self.codes()[indices].permute(0, 3, 1, 2).contiguous()
        return self.out_proj(z_q)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z [B, in_dim, h, w] -> (z_q [B, in_dim, h, w], indices [B, h, w], aux).

        aux: loss (codebook + beta * commitment), codebook_loss, commit_loss, perplexity, usage_fraction.
        In training mode this also updates usage counters, the FIFO, EMA codes and revives dead codes.
        """
        z = self.in_proj(z)
        B, D, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        if self.l2_norm:
            z_flat = F.normalize(z_flat, dim=1)

        if self.training and self.dead_code_steps > 0:
            # before the lookup: changing a parameter after it entered this step's graph would break backward
            self._revive_dead_codes()

        codes = self.codes()
        indices = nearest_codes(z_flat.detach(), codes.detach())
        z_q = codes[indices]

        commit_loss = F.mse_loss(z_flat, z_q.detach())
        codebook_loss = torch.zeros((), device=z.device) if self.ema else F.mse_loss(z_q, z_flat.detach())
        loss = codebook_loss + self.beta * commit_loss

        counts = torch.bincount(indices, minlength=self.n_codes)
        if self.training:
            # under torchrun: every rank's vectors, so usage, dead codes, the FIFO and the EMA codes are the same on
            # every rank and as in one process at grad_accum 1 (models/ranks.py)
            z_all, indices_all = gather_items(z_flat.detach(), h * w), gather_items(indices, h * w)
            counts_all = counts if indices_all is indices else torch.bincount(indices_all, minlength=self.n_codes)
            self._update_stats(z_all, indices_all, counts_all)
        # straight-through: forward value is z_q, gradient reaches z unchanged. Without a graph to feed (eval,
        # tokenizing) use z_q itself so decode_indices reproduces the reconstruction bit-exactly.
        if torch.is_grad_enabled() and z_flat.requires_grad:
            z_q = z_flat + (z_q - z_flat).detach()

        probs = counts.float() / counts.sum()
        aux = {
            "loss": loss,
            "codebook_loss": codebook_loss.detach(),
            "commit_loss": commit_loss.detach(),
            "perplexity": torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()).detach(),
            "usage_fraction": (counts > 0).float().mean(),
        }
        z_q = z_q.view(B, h, w, D).permute(0, 3, 1, 2).contiguous()
        return self.out_proj(z_q), indices.view(B, h, w), aux

    # ---- training-time codebook maintenance ----

    @torch.no_grad()
    def _update_stats(self, z_flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        self.train_steps += 1
        self.code_counts += counts
        self.steps_unused += 1
        self.steps_unused[counts > 0] = 0

        if self.z_buffer.shape[0] > 0:
            size = self.z_buffer.shape[0]
            if z_flat.shape[0] > size:  # keep an evenly spread subset rather than the first images of the batch
                z_flat = z_flat[torch.linspace(0, z_flat.shape[0] - 1, size, device=z_flat.device).long()]
            slots = (self.z_buffer_ptr + torch.arange(z_flat.shape[0], device=z_flat.device)) % size
            self.z_buffer[slots] = z_flat
            self.z_buffer_ptr.copy_((self.z_buffer_ptr + z_flat.shape[0]) % size)
            self.z_buffer_filled.add_(z_flat.shape[0]).clamp_(max=size)

        if self.ema:
            decay = self.ema_decay
            one_hot = F.one_hot(indices, self.n_codes).type(z_flat.dtype)
            self.ema_cluster_size.mul_(decay).add_(counts.type(z_flat.dtype), alpha=1 - decay)
            self.ema_embed_sum.mul_(decay).add_(one_hot.t() @ z_flat, alpha=1 - decay)
            # Laplace smoothing keeps every divisor positive without changing the total mass n
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.ema_eps) / (n + self.n_codes * self.ema_eps) * n
            self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _revive_dead_codes(self) -> None:
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().squeeze(1)
        filled = int(self.z_buffer_filled)
        if dead.numel() == 0 or filled == 0:
            return
        # draws seeded by the step counter (a buffer), so a resumed run revives exactly as the uninterrupted one
        gen = torch.Generator().manual_seed(int(self.train_steps) * 1_000_003 + 12345)
        pick = torch.randint(0, filled, (dead.numel(),), generator=gen).to(self.z_buffer.device)
        new_codes = self.z_buffer[pick]
        self.codebook.data[dead] = new_codes
        if self.ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def kmeans_init(self, z_samples: Tensor, seed: int, niter: int = 20) -> None:
        """Set the codebook to faiss k-means centroids of encoder outputs (k-means++ seeded, deterministic in seed).

        z_samples: [N, code_dim] vectors in code space, or [B, in_dim, h, w] encoder outputs (projected here).
        In l2_norm mode the clustering is spherical, matching the cosine lookup.
        """
        import faiss  # imported here: only initialisation needs it

        if z_samples.dim() == 4:
            z_samples = self.in_proj(z_samples).permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        if z_samples.dim() != 2 or z_samples.shape[1] != self.code_dim:
            raise ValueError(f"kmeans_init: expected [N, {self.code_dim}] samples, got {tuple(z_samples.shape)}")
        if z_samples.shape[0] < self.n_codes:
            raise ValueError(f"kmeans_init: need at least n_codes={self.n_codes} samples, got {z_samples.shape[0]}")
        x = z_samples.detach().float()
        if self.l2_norm:
            x = F.normalize(x, dim=1)
        x = x.cpu()
        gen = torch.Generator().manual_seed(seed)
        candidates = x[torch.randperm(len(x), generator=gen)[: 32 * self.n_codes]]  # bounds the seeding cost
        init = _kmeans_plus_plus(candidates, self.n_codes, gen)
        km = faiss.Kmeans(self.code_dim, self.n_codes, niter=niter, seed=seed, spherical=self.l2_norm,
                          verbose=False)
        km.train(np.ascontiguousarray(x.numpy(), dtype=np.float32), init_centroids=init.numpy())
        centroids = torch.from_numpy(km.centroids.copy()).to(self.codebook.device, self.codebook.dtype)
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(centroids)
        self.steps_unused.zero_()

    # ---- monitoring ----

    @torch.no_grad()
    def usage_stats(self, indices: Tensor | None = None) -> dict[str, float]:
        """Codebook health from an index tensor, or from the running counts (code_counts) when indices is None.

        usage_fraction: share of codes used; perplexity: exp(entropy) of the code histogram (K when uniform,
        1 when collapsed); dead_codes: codes with no assignment.
        """
        if indices is None:
            counts = self.code_counts.double()
        else:
            counts = torch.bincount(indices.reshape(-1), minlength=self.n_codes).double()
        total = counts.sum()
        if total == 0:
            return {"usage_fraction": 0.0, "perplexity": 0.0, "dead_codes": self.n_codes}
        probs = counts / total
        nz = probs[probs > 0]
        used = int((counts > 0).sum())
        return {"usage_fraction": used / self.n_codes,
                "perplexity": math.exp(float(-(nz * nz.log()).sum())),
                "dead_codes": self.n_codes - used}

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero the running assignment counts (e.g. at the start of each logging window)."""
        self.code_counts.zero_()

    def codebook_fingerprint(self, model_config: dict) -> str:
        """Content hash that token consumers compare against the VQGAN they decode with."""
        return fingerprint_codebook(self.codebook, model_config)
