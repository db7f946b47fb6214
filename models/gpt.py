"""An autoregressive GPT over a VQ token grid (the Taming Transformers second stage, with today's block choices).

Read top to bottom:
  1. GPTConfig      every knob, validated.
  2. building blocks RMSNorm, the two MLPs, 2D rotary positions, the pre-norm Block, the class prefix and the
                    init (shared with models/maskgit.py).
  3. GPT            embeddings, forward (logits + loss), KV caches, FLOP estimate.
  4. sampling       temperature / top-k / top-p, and GPT.generate (KV cache or full recompute, CFG).

Sequence layout. An h x w grid of codes is flattened in raster order (token i sits at row i // w, col i % w). Every
sequence opens with a prefix embedding: the class embedding for a class-conditional model (or the learned "null class"
n_classes, which label dropout substitutes so classifier-free guidance works), a learned start token otherwise. The
model sees [prefix, t_0, ..., t_{T-1}] and its output at sequence position s predicts token s:

    forward(idx = tokens[:, :-1], labels, targets = tokens)   # training: logits (B, h*w, V)
    forward(idx = tokens[:, :t], labels)[0][:, -1]            # the distribution of token t (t = 0 needs only labels)

so the longest sequence is h*w positions: the block size. Attention comes from models/attention.py (the one attention
module of the project); this file only decides what goes into it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import KVCache, MultiHeadAttention

# -----------------------------------------------------------------------------------------------------------------
# 1. Config

NORMS = ("rmsnorm", "layernorm")


def at_least_f32(x: Tensor) -> Tensor:
    """x in float32, or as it is when wider: the precision-sensitive steps (norms, rotations, the loss) never run in
    bf16 under autocast, and a float64 model (a gradient or reference check) stays float64 throughout."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


MLPS = ("swiglu", "gelu")
POSITIONS = ("learned", "rope2d")


@dataclass
class GPTConfig:
    vocab_size: int = 1024          # codebook size of the VQGAN
    grid: tuple[int, int] = (16, 16)  # token grid (h, w); block size = h * w
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0            # embedding, attention and residual dropout
    n_classes: int = 0              # 0 = unconditional; else class ids 0..n_classes-1, n_classes = the null class
    class_dropout: float = 0.1      # training-time probability that a label becomes the null class (for CFG)
    norm: str = "rmsnorm"           # "rmsnorm" | "layernorm"
    mlp: str = "swiglu"             # "swiglu" | "gelu"
    pos: str = "rope2d"             # "learned" (absolute, per sequence position) | "rope2d" (2D rotary in attention)
    bias: bool = False              # biases in linear layers and LayerNorm
    tie_head: bool = False          # share the token embedding with the output head (see GPT.__init__)

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)  # YAML/JSON hand us lists
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {self.grid}")
        for name, value, allowed in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("pos", self.pos, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos == "rope2d" and (self.n_embd // self.n_head) % 4:
            raise ValueError(f"rope2d needs a head dim divisible by 4 (two rotated halves of pairs), "
                             f"got {self.n_embd // self.n_head}")
        if self.vocab_size < 1 or self.n_classes < 0:
            raise ValueError("vocab_size must be >= 1 and n_classes >= 0")
        if not 0.0 <= self.class_dropout <= 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("class_dropout must be in [0, 1] and dropout in [0, 1)")

    @property
    def block_size(self) -> int:
        return self.grid[0] * self.grid[1]


# -----------------------------------------------------------------------------------------------------------------
# 2. Building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and bias (cheaper, as good for transformers)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # at least float32: under bf16 autocast the mean of squares would otherwise lose most of its precision
        xf = at_least_f32(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class GeluMLP(nn.Module):
    """The GPT-2 MLP: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: proj(silu(gate(x)) * up(x)). The hidden width is 2/3 of 4C so the three matrices cost
    about what GELU's two do; rounded up to a multiple of 64 for matmul-friendly shapes."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and up fused: one matmul
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Rope2D(nn.Module):
    """2D rotary positions: the first half of each head's channels rotates with the grid row, the second half with the
    grid column, so the q.k score depends on the 2D offset between tokens (not on their raster distance, which jumps
    by w at every line break).

    Sequence position s holds the prefix (s = 0) or token s - 1, and is given the (row, col) of raster index s - 1
    with floor division: token i sits at its own (i // w, i % w), and the prefix at (-1, w - 1), the cell just before
    (0, 0) in raster order, a position no token shares. Called by MultiHeadAttention with absolute sequence positions,
    so it is right after a KV cache has advanced too.
    """

    def __init__(self, config: GPTConfig, base: float = 10000.0):
        super().__init__()
        head_dim = config.n_embd // config.n_head
        half = head_dim // 2  # channels per axis
        inv_freq = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half / 2,)
        raster = torch.arange(config.block_size, dtype=torch.float64) - 1
        w = config.grid[1]
        rows, cols = torch.div(raster, w, rounding_mode="floor"), torch.remainder(raster, w)
        # the tables are derived from the config: buffers (so .to(device) moves them) but not saved in checkpoints;
        # float64, rounded to the computation's dtype where used (float32 normally: the same values as float32 tables)
        for axis, coord in (("row", rows), ("col", cols)):
            angle = coord[:, None] * inv_freq[None, :]  # (block_size, half / 2)
            self.register_buffer(f"{axis}_cos", angle.cos(), persistent=False)
            self.register_buffer(f"{axis}_sin", angle.sin(), persistent=False)

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate channel pairs (j, j + d/2) of x (..., T, d) by the angles whose cos/sin are (T, d/2)."""
        x1, x2 = at_least_f32(x).chunk(2, dim=-1)
        cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        rc, rs = self.row_cos[positions], self.row_sin[positions]
        cc, cs = self.col_cos[positions], self.col_sin[positions]

        def rope(x: Tensor) -> Tensor:
            xr, xc = x.chunk(2, dim=-1)
            return torch.cat([self._rotate(xr, rc, rs), self._rotate(xc, cc, cs)], dim=-1)

        return rope(q), rope(k)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). Pre-norm leaves the residual stream an
    identity path from embedding to head, so gradients reach the early layers unscaled (post-norm is less stable).
    causal=False gives the bidirectional block of a masked-token model (models/maskgit.py)."""

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, causal=causal, bias=config.bias,
                                       dropout=config.dropout)
        self.norm2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, rotary: Rope2D | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), kv_cache, rotary=rotary))
        return x + self.drop(self.mlp(self.norm2(x)))


class ClassConditioning:
    """The class prefix shared by the token transformers (GPT, models/maskgit.py): labels 0..n_classes-1, the null
    class n_classes that label dropout substitutes (classifier-free guidance), or prefix id 0 for an unconditional
    model. Mixed into an nn.Module whose `config` has n_classes and class_dropout."""

    config: GPTConfig
    training: bool

    @property
    def null_class(self) -> int:
        return self.config.n_classes

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability class_dropout.
        Only in training mode (forward calls this); eval and sampling see the labels they are given."""
        if not self.training or self.config.n_classes == 0 or self.config.class_dropout == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.config.class_dropout
        return labels.masked_fill(drop, self.null_class)

    def _prefix_ids(self, labels: Tensor | None, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> Tensor:
        name = type(self).__name__
        if self.config.n_classes == 0:
            if labels is not None:
                raise ValueError(f"this {name} is unconditional (n_classes = 0) but got labels")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if labels is None:
            raise ValueError(f"this {name} is class-conditional: pass labels (the null class is {self.null_class})")
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        return self.drop_labels(labels.to(device=device, dtype=torch.long), generator)


def init_weights(model: nn.Module, n_layer: int) -> None:
    """nanoGPT init: N(0, 0.02) for every linear and embedding, and the projections that write into the residual
    stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth (GPT-2)."""
    model.apply(GPT._init_weights)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


# -----------------------------------------------------------------------------------------------------------------
# 3. The model

class GPT(ClassConditioning, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        # the prefix: one row per class plus the null class, or a single learned start token (id 0)
        self.prefix = nn.Embedding(config.n_classes + 1 if config.n_classes else 1, C)
        self.wpe = nn.Embedding(config.block_size, C) if config.pos == "learned" else None
        self.rope = Rope2D(config) if config.pos == "rope2d" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        # Untied by default (as Taming and LlamaGen): the input row of a code says "this code is here", the output row
        # "this code comes next, one raster step later", roles that need not agree. tie_head=True shares them
        # (nanoGPT), saving vocab_size * n_embd parameters.
        if config.tie_head:
            self.head.weight = self.wte.weight

        init_weights(self, config.n_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- bookkeeping -------------------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied head counted once). exclude_embeddings drops the lookup tables (token embedding
        unless tied to the head, positions, prefix): what is left is what takes part in matmuls."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.prefix.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_head:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, the PaLM appendix B / nanoGPT MFU estimate:
        6 N for the weight matmuls (N = num_params(exclude_embeddings=True); 2 per multiply-add, x3 for the backward)
        plus 12 * n_layer * n_embd * T for attention scores and weighted sums over a sequence of T positions (default
        the block size). Like PaLM it counts the full T x T attention, not the causal half.
        MFU = flops_per_token * tokens_per_second / peak FLOPS of the device."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * self.config.n_layer * self.config.n_embd * T

    def new_kv_caches(self, batch_size: int, *, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One KV cache per layer, block_size long. The dtype defaults to what attention will produce: the autocast
        dtype when autocast is on (a float32 cache would hand float32 keys to bf16 queries), else the weights'."""
        device = self.wte.weight.device
        if dtype is None:
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else self.wte.weight.dtype)
        return [block.attn.new_kv_cache(batch_size, self.config.block_size, device=device, dtype=dtype)
                for block in self.blocks]

    # --- forward -----------------------------------------------------------------------------------------------

    def forward(self, idx: Tensor, labels: Tensor | None = None, targets: Tensor | None = None, *,
                kv_caches: list[KVCache] | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) codes. Returns logits (B, L, vocab) and the mean cross-entropy against targets (B, L) when
        given (target -1 = ignore), else None.

        Without caches (or with empty ones) the prefix is prepended: L = T + 1 and logits[:, s] predicts token s
        from the prefix and tokens < s. With caches that already hold a sequence, idx continues it: L = T, and the
        caches advance by the L positions of this call. labels are read only when the prefix is part of the call.
        """
        B, T = idx.shape
        start = kv_caches[0].pos if kv_caches is not None else 0
        x = self.wte(idx)
        if start == 0:
            prefix = self.prefix(self._prefix_ids(labels, B, idx.device))
            x = torch.cat([prefix[:, None], x], dim=1)
        L = x.shape[1]
        if start + L > self.config.block_size:
            raise ValueError(f"sequence of {start + L} positions exceeds the block size {self.config.block_size} "
                             f"(prefix + h*w - 1 tokens)")
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + L, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_caches[i] if kv_caches is not None else None, rotary=self.rope)
        logits = self.head(self.norm_f(x))
        loss = None
        if targets is not None:
            # float32 loss: under bf16 autocast the log-softmax over the codebook would be coarse
            loss = F.cross_entropy(at_least_f32(logits).flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    # --- sampling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None = None, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Tensor:
        """Sample n token grids, returned as (n, h*w) codes in raster order.

        labels: (n,) class ids for a conditional model (None for an unconditional one).
        temperature 0 is greedy decoding; top_k / top_p filter the (guided) distribution before sampling.
        cfg_scale: classifier-free guidance, logits = uncond + scale * (cond - uncond), with the conditional and
            null-class rows run as one batch of 2n. At 1.0 the null-class half is skipped, so the result is exactly
            plain conditional sampling.
        generator: the source of all randomness (on the model's device), so a seed reproduces the samples.
        use_cache: KV cache (one forward of the prefix, then one token per step) or, when False, a forward over the
            whole sequence so far at every step (taming's sampler). Same tokens under greedy decoding.
        """
        device = self.wte.weight.device
        guided = cfg_scale != 1.0
        if guided and self.config.n_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        was_training = self.training
        self.eval()  # no dropout, and above all no label dropout while sampling
        try:
            if labels is not None:
                labels = labels.to(device=device, dtype=torch.long)
            self._prefix_ids(labels, n, device)  # validate once, before the loop
            if guided:  # rows 0..n-1 conditional, n..2n-1 the null class
                labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            rows = 2 * n if guided else n
            tokens = torch.empty(n, 0, dtype=torch.long, device=device)
            caches = self.new_kv_caches(rows) if use_cache else None
            for t in range(self.config.block_size):
                # with a cache: t = 0 runs the prefix alone, afterwards only the token sampled last step
                inp = tokens[:, -1:] if use_cache and t > 0 else tokens
                if guided:
                    inp = torch.cat([inp, inp])
                logits = self(inp, labels, kv_caches=caches)[0][:, -1].float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + cfg_scale * (cond - uncond)
                next_token = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                           generator=generator)
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finally:
            self.train(was_training)
        return tokens


# -----------------------------------------------------------------------------------------------------------------
# 4. Sampling helpers

def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top-k (ties with the k-th are kept) and outside the nucleus: the smallest
    set of most likely tokens whose probabilities sum to >= top_p. logits: (..., V)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # a token is kept while the mass strictly before it is < top_p: the first token always stays, and the set
        # stops at the first token that brings the sum to >= top_p
        before = torch.cat([torch.zeros_like(probs[..., :1]), probs.cumsum(dim=-1)[..., :-1]], dim=-1)
        remove_sorted = before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
