"""MaskGIT (Chang et al. 2022): a bidirectional transformer over the VQ token grid, trained to fill in masked tokens
and sampled by iterative parallel decoding, T forward passes (8 by default) instead of GPT's h*w.

Read top to bottom:
  1. MaskGITConfig   GPTConfig's knobs (same blocks, positions, class prefix); named sizes in MASKGIT_models.
  2. schedules       the cosine mask ratio, the training mask, the decoding schedule, the masked-only loss.
  3. MaskGIT         embeddings ([MASK] = vocab_size), forward, loss, generate.

Sequence layout. The model sees [prefix, t_0, ..., t_{h*w-1}]: the prefix is GPT's (class embedding, the null class
that label dropout substitutes for classifier-free guidance, or a start token when unconditional), each t_i a code
0..vocab_size-1 or the [MASK] id vocab_size, in raster order. Attention is full, so the output at token i predicts t_i
from every visible token on both sides. Logits cover the vocab_size codes only: [MASK] is never a prediction.

The blocks, norms, MLPs, 2D rotary positions, class prefix and init are models/gpt.py's, imported, not rewritten;
attention is models/attention.py's (sdpa on CPU, xformers' memory-efficient kernel on CUDA when it loads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gpt import Block, ClassConditioning, GPTConfig, Rope2D, init_weights, make_norm, sample_logits

# -----------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class MaskGITConfig(GPTConfig):
    """Every GPTConfig knob, meaning the same thing. What differs is the sequence: the prefix plus all h*w tokens (GPT
    never feeds its last token), so block_size, the length learned and rotary positions cover, is h*w + 1."""

    @property
    def block_size(self) -> int:
        return self.n_tokens + 1

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def mask_id(self) -> int:
        return self.vocab_size


# Named sizes (width and depth; everything else from MaskGITConfig's defaults or the caller).
MASKGIT_models: dict[str, dict[str, int]] = {
    "maskgit-T": dict(n_layer=4, n_head=4, n_embd=128),    # the size of the default AR preset (params.yaml)
    "maskgit-S": dict(n_layer=8, n_head=8, n_embd=512),    # bench_sampling.py's default GPT size
    "maskgit-B": dict(n_layer=24, n_head=16, n_embd=768),  # the MaskGIT paper's ImageNet transformer
}


def maskgit_config(name: str, **overrides) -> MaskGITConfig:
    """MaskGITConfig of a named size from MASKGIT_models, any field overridden (vocab_size, grid, n_classes, ...)."""
    if name not in MASKGIT_models:
        raise ValueError(f"unknown MaskGIT size {name!r}; known: {sorted(MASKGIT_models)}")
    return MaskGITConfig(**(MASKGIT_models[name] | overrides))


# -----------------------------------------------------------------------------------------------------------------
# 2. Schedules and the loss

def cosine_schedule(r: Tensor) -> Tensor:
    """The fraction of tokens masked at progress r in [0, 1]: cos(pi/2 r), 1 at r = 0 (everything masked), 0 at
    r = 1, decreasing in between. MaskGIT found this concave schedule (few tokens decided early, many late) best."""
    return torch.cos(r * (math.pi / 2)).clamp(0.0, 1.0)  # float32 cos(pi/2) is -4e-8, not 0


def n_masked(u: Tensor, n_tokens: int) -> Tensor:
    """Training: how many of n_tokens to mask for a draw u ~ U[0, 1): ceil(cos(pi/2 u) * n_tokens), at least 1 (a
    sample with nothing masked carries no loss) and at most n_tokens."""
    return torch.ceil(cosine_schedule(u.double()) * n_tokens).long().clamp_(1, n_tokens)


def random_mask(batch: int, n_tokens: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """(batch, n_tokens) bool, True = masked: per sample u ~ U[0, 1) (drawn first, one per row), then a uniformly
    random set of n_masked(u) positions (the ones with the smallest of n_tokens further uniform scores)."""
    u = torch.rand(batch, generator=generator, device=device)
    count = n_masked(u, n_tokens).to(u.device)
    scores = torch.rand(batch, n_tokens, generator=generator, device=device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position's score within its row
    return rank < count[:, None]


def decode_schedule(n_tokens: int, steps: int) -> list[int]:
    """Decoding: how many tokens are still masked after each of the T = steps steps of generate (the last is 0).

    After step t (0-based) MaskGIT keeps floor(n_tokens * cos(pi/2 (t+1)/T)) masked, clamped so that every step but
    the last decides at least one new token and leaves at least one for later (when only one is left it waits for the
    last step). float64 math: cos(pi/3) must not round below 0.5 and floor a count one short."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    masked, out = n_tokens, []
    for t in range(steps - 1):
        target = math.floor(n_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        masked = max(1, min(masked - 1, target))
        out.append(masked)
    return out + [0]


def masked_loss(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the masked positions only (the visible tokens are given, predicting them teaches
    nothing), and the argmax accuracy there. logits (B, N, V), targets (B, N) codes, mask (B, N) bool."""
    picked = logits[mask].float()  # float32: under bf16 autocast the log-softmax over the codebook would be coarse
    wanted = targets[mask]
    loss = F.cross_entropy(picked, wanted, label_smoothing=label_smoothing)
    accuracy = (picked.argmax(dim=-1) == wanted).float().mean()
    return loss, accuracy


# -----------------------------------------------------------------------------------------------------------------
# 3. The model

class MaskGIT(ClassConditioning, nn.Module):
    def __init__(self, config: MaskGITConfig):
        super().__init__()
        if not isinstance(config, MaskGITConfig):
            raise TypeError(f"MaskGIT needs a MaskGITConfig (block_size = h*w + 1), got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size + 1, C)  # the last row is [MASK]
        self.prefix = nn.Embedding(config.n_classes + 1 if config.n_classes else 1, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.pos == "learned" else None
        self.rope = Rope2D(config) if config.pos == "rope2d" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        # tie_head: logits against the code rows of the token embedding (BERT and MaskGIT's choice); the head here
        # predicts the very token its input row stands for, so tying is natural (unlike GPT's next-token head)
        self.head = None if config.tie_head else nn.Linear(C, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, labels: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        """idx: (B, h*w) codes or mask_id. Returns logits (B, h*w, vocab_size). generator drives label dropout (only
        in training mode)."""
        B, N = idx.shape
        if N != self.config.n_tokens:
            raise ValueError(f"expected {self.config.n_tokens} tokens per grid ({self.config.grid}), got {N}")
        prefix = self.prefix(self._prefix_ids(labels, B, idx.device, generator))
        x = torch.cat([prefix[:, None], self.wte(idx)], dim=1)
        if self.wpe is not None:
            x = x + self.wpe.weight
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rotary=self.rope)
        x = self.norm_f(x[:, 1:])  # the prefix position predicts nothing
        return self.head(x) if self.head is not None else F.linear(x, self.wte.weight[:self.config.vocab_size])

    def loss(self, tokens: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None, *,
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """One training objective evaluation: mask each grid at a ratio from the cosine schedule (random_mask), predict
        the masked codes from the rest. Returns (mean cross-entropy over masked positions, masked-token accuracy).
        tokens: (B, h*w) codes; generator (on the tokens' device) draws the masks, then the label dropout, so a
        checkpoint that saves its state resumes the same masks. Under DDP run the same three lines with the forward
        through the wrapper (DDP syncs gradients only for forward calls it sees)."""
        mask = random_mask(tokens.shape[0], tokens.shape[1], generator=generator, device=tokens.device)
        logits = self(tokens.masked_fill(mask, self.mask_id), labels, generator=generator)
        return masked_loss(logits, tokens, mask, label_smoothing)

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None = None, *, steps: int = 8, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, choice_temperature: float = 4.5,
                 cfg_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Sample n token grids by iterative parallel decoding; returns (n, h*w) codes in raster order.

        Start from an all-[MASK] grid. At step t of T = steps: one forward predicts every masked position; a code is
        drawn at each (temperature / top_k / top_p as GPT's sample_logits; temperature 0 = argmax); its confidence is
        its log-probability under the guided, untempered logits plus choice_temperature * (1 - (t+1)/T) * Gumbel
        noise (the noise anneals to 0, so early steps explore and late ones commit; 4.5 is the MaskGIT reference's
        class-conditional setting), and the decode_schedule(h*w, T)[t] least confident of the new codes are masked
        again. Decided tokens are never revisited; the last step fills every remaining position.

        labels: (n,) class ids for a conditional model. cfg_scale: classifier-free guidance, logits = uncond +
        scale * (cond - uncond), conditional and null-class rows as one batch of 2n; at 1.0 the null half is skipped.
        generator: the source of all randomness (on the model's device), so a seed reproduces the samples.
        """
        device = self.wte.weight.device
        guided = cfg_scale != 1.0
        if guided and self.config.n_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        if choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
        schedule = decode_schedule(self.config.n_tokens, steps)
        was_training = self.training
        self.eval()  # no dropout, and no label dropout while sampling
        try:
            if labels is not None:
                labels = labels.to(device=device, dtype=torch.long)
            self._prefix_ids(labels, n, device)  # validate once, before the loop
            if guided:  # rows 0..n-1 conditional, n..2n-1 the null class
                labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            tokens = torch.full((n, self.config.n_tokens), self.mask_id, dtype=torch.long, device=device)
            for t, still_masked in enumerate(schedule):
                unknown = tokens == self.mask_id
                logits = self(torch.cat([tokens, tokens]) if guided else tokens, labels).float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + cfg_scale * (cond - uncond)
                logits = logits[unknown]  # (masked positions, V), row-major: the order of tokens[unknown]
                sampled = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=generator)
                decided = tokens.masked_scatter(unknown, sampled)
                if still_masked == 0:
                    tokens = decided
                    break
                # known tokens get +inf so they are never chosen to be masked again
                confidence = torch.full(tokens.shape, math.inf, device=device)
                confidence[unknown] = logits.log_softmax(dim=-1).gather(1, sampled[:, None]).squeeze(1)
                anneal = choice_temperature * (1.0 - (t + 1) / steps)
                if anneal > 0:
                    confidence = confidence + anneal * gumbel_noise(tokens.shape, generator, device)
                remask = confidence.topk(still_masked, dim=1, largest=False).indices
                tokens = decided.scatter(1, remask, self.mask_id)
        finally:
            self.train(was_training)
        return tokens


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """Standard Gumbel samples -log(-log u), u ~ U(0, 1); u is kept off 0 so the noise stays finite."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))
