"""The one attention module of tokenmill: every transformer in the project (GPT, TransGAN, STransGAN, LadaGAN, YLG)
gets its attention from here.

Read top to bottom:
  1. backends   `attention(q, k, v, causal=, attn_bias=, backend=)` runs softmax attention on one of
                "xformers" (memory_efficient_attention, CUDA only), "sdpa" (torch scaled_dot_product_attention)
                or "math" (the plain reference the tests compare against). `active_backend(device)` names the one
                that runs by default, so training can log it and put it into metrics.
  2. GPT        `MultiHeadAttention` (full or causal, optional rotary hook) and `KVCache` for incremental decoding.
  3. Swin       window and shifted-window attention (STransGAN), plus the dense mask they are equivalent to.
  4. TransGAN   grid self-attention (attention inside non-overlapping grid cells), plus its dense mask.
  5. LadaGAN    linear additive attention: one attention vector per head, cost linear in the sequence length.
  6. YLG        two-step local sparse attention with the LTR/RTL patterns over the ESA enumeration of the grid.

Tensors are (B, H, N, D) inside attention (batch, heads, tokens, head dim) and (B, N, C) at module boundaries;
2D token grids are flattened in raster order (row-major), token index = row * width + col.
Masks are boolean with True = "may attend"; float biases are added to the logits.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

BACKENDS = ("xformers", "sdpa", "math")

# -----------------------------------------------------------------------------------------------------------------
# 1. Backends

# xformers is imported only the first time a CUDA tensor asks for it: on CPU machines the import is useless (no CPU
# kernels) and prints a loud warning. None = not probed yet; afterwards the module, or False with a reason.
_xformers_ops = None
_xformers_reason = "not probed yet (no CUDA tensor has asked for it)"


def _load_xformers():
    """Import xformers.ops and run one tiny CUDA call, once; return the module or None (reason logged once)."""
    global _xformers_ops, _xformers_reason
    if _xformers_ops is None:
        xlog = logging.getLogger("xformers")
        level = xlog.level
        xlog.setLevel(logging.CRITICAL)  # its own "can't load C++/CUDA extensions" warning; we log one line instead
        try:
            import xformers.ops as xops
            probe = torch.zeros(1, 8, 1, 8, device="cuda", dtype=torch.float16)
            xops.memory_efficient_attention(probe, probe, probe)  # kernels that fail to load only show up here
            _xformers_ops, _xformers_reason = xops, "loaded"
            log.info("attention: xformers memory_efficient_attention is available on CUDA")
        except Exception as exc:  # ImportError, missing kernels, CUDA/torch mismatch: all mean "use sdpa"
            first_line = (str(exc).splitlines() or [""])[0]
            _xformers_ops, _xformers_reason = False, f"{type(exc).__name__}: {first_line}"
            log.warning("attention: xformers unavailable (%s); falling back to torch sdpa", _xformers_reason)
        finally:
            xlog.setLevel(level)
    return _xformers_ops or None


def active_backend(device: torch.device | str) -> str:
    """The backend `attention(..., backend=None)` uses for tensors on `device`: "xformers" or "sdpa"."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and _load_xformers() is not None:
        return "xformers"
    return "sdpa"


def xformers_status() -> str:
    """"loaded", or why xformers is not used (for logs and for skipping GPU tests with a clear reason)."""
    return _xformers_reason


def _causal_mask(m: int, n: int, device: torch.device) -> Tensor:
    """(m, n) bool. The m queries are the *last* m of the n key positions (bottom-right aligned), which is what a KV
    cache needs: query i sits at absolute position n - m + i and sees keys 0 .. n - m + i."""
    rows = torch.arange(m, device=device)[:, None] + (n - m)
    return torch.arange(n, device=device)[None, :] <= rows


def _merge_causal(bias: Tensor | None, m: int, n: int, device: torch.device) -> Tensor:
    """Fold the causal mask into `bias` (bool masks are and-ed, float biases get -inf)."""
    causal = _causal_mask(m, n, device)
    if bias is None:
        return causal
    if bias.dtype == torch.bool:
        return bias & causal
    return bias.masked_fill(~causal, float("-inf"))


def _math_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(Q K^T / sqrt(d) + bias) V, written out. The reference every other path is tested against."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _xformers_bias(bias: Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor:
    """Dense additive bias for xformers: float in the query dtype, copied once at its own size into a buffer whose rows
    are padded to a multiple of 8 elements (the alignment xformers requires), then broadcast to (B, H, M, N) as a
    stride-0 view rather than materialised per batch element and head."""
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill_(~bias, float("-inf"))
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    n = bias.shape[-1]
    aligned = torch.empty(*bias.shape[:-1], n + (-n) % 8, dtype=dtype, device=bias.device)[..., :n]
    aligned.copy_(bias)
    return aligned.expand(shape)


def _xformers_attention(xops, q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None,
                        dropout_p: float) -> Tensor:
    B, H, M, _ = q.shape
    N = k.shape[2]
    if causal and bias is None and M == N:
        xbias = xops.LowerTriangularMask()
    elif causal and bias is None:
        xbias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    else:
        if causal:
            bias = _merge_causal(bias, M, N, q.device)
        xbias = None if bias is None else _xformers_bias(bias, (B, H, M, N), q.dtype)
    # xformers wants (B, N, H, D); the transposes are views (last dim stays contiguous)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=xbias, p=dropout_p)
    return out.transpose(1, 2)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None, dropout_p: float) -> Tensor:
    M, N = q.shape[2], k.shape[2]
    if causal and M == 1:
        causal = False  # the newest token sees every cached key
    if causal and bias is None and M == N:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if causal:  # sdpa's is_causal is top-left aligned and cannot be combined with a mask: build the mask ourselves
        bias = _merge_causal(bias, M, N, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_bias: Tensor | None = None,
              dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """Softmax attention. q: (B, H, M, D); k, v: (B, H, N, D); returns (B, H, M, D).

    causal: query i (one of the last M of N positions) sees keys up to its own position.
    attn_bias: bool mask (True = attend) or float additive bias, broadcastable to (B, H, M, N).
    backend: "xformers" | "sdpa" | "math", or None for `active_backend(q.device)`.
    """
    explicit = backend is not None
    backend = backend or active_backend(q.device)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if attn_bias is not None and attn_bias.dtype != torch.bool:
        attn_bias = attn_bias.to(q.dtype)  # sdpa and xformers want the bias in the query dtype
    if backend == "xformers":
        xops = _load_xformers() if q.is_cuda else None
        if xops is None:
            raise RuntimeError(f"xformers backend needs CUDA tensors and a working xformers "
                               f"(tensor on {q.device}; xformers: {xformers_status()})")
        try:
            return _xformers_attention(xops, q, k, v, causal, attn_bias, dropout_p)
        except (NotImplementedError, ValueError) as exc:  # e.g. a dtype or head dim no xformers kernel supports
            if explicit:
                raise
            _warn_once(f"attention: xformers cannot run {tuple(q.shape)} {q.dtype} ({exc}); using sdpa for it")
            backend = "sdpa"
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, causal, attn_bias, dropout_p)
    bias = _merge_causal(attn_bias, q.shape[2], k.shape[2], q.device) if causal else attn_bias
    return _math_attention(q, k, v, bias, dropout_p)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, N, C = x.shape
    return x.view(B, N, n_heads, C // n_heads).transpose(1, 2)  # (B, H, N, D)


def _merge_heads(x: Tensor) -> Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


# -----------------------------------------------------------------------------------------------------------------
# 2. GPT: multi-head attention with an optional KV cache and rotary hook

# rotary(q, k, positions) -> (q, k): q, k are (B, H, T, D), positions the absolute token indices (T,) of those
# queries/keys. The GPT owns the embedding (e.g. 2D rotary: it maps an index to (row, col) of the token grid); this
# module only guarantees the positions are right, including after a KV cache has advanced.
Rotary = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Preallocated to max_len so decoding never reallocates; `pos` counts the tokens written so far.
    """

    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.k = torch.zeros(batch_size, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len
        self.pos = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write T new keys/values (B, H, T, D) at `pos`; return all keys/values so far, (B, H, pos, D) views."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]

    def reset(self) -> None:
        self.pos = 0


class MultiHeadAttention(nn.Module):
    """Full or causal self-attention over (B, N, C) with a fused qkv projection (nanoGPT layout)."""

    def __init__(self, dim: int, n_heads: int, *, causal: bool = False, bias: bool = False, dropout: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads, self.causal, self.dropout, self.backend = n_heads, causal, dropout, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def new_kv_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        head_dim = self.qkv.in_features // self.n_heads
        return KVCache(batch_size, self.n_heads, max_len, head_dim, device=device or self.qkv.weight.device,
                       dtype=dtype or self.qkv.weight.dtype)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, *, rotary: Rotary | None = None,
                attn_bias: Tensor | None = None) -> Tensor:
        """x: (B, T, C). With a cache, x holds the T newest tokens and attends to everything cached before them."""
        B, T, C = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).split(C, dim=2))
        start = kv_cache.pos if kv_cache is not None else 0
        if rotary is not None:
            q, k = rotary(q, k, torch.arange(start, start + T, device=x.device))
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        y = attention(q, k, v, causal=self.causal, attn_bias=attn_bias,
                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.proj(_merge_heads(y))


# -----------------------------------------------------------------------------------------------------------------
# 3. Swin window / shifted-window attention (STransGAN)
#
# The grid is cut into non-overlapping window x window squares and attention runs inside each square, so the cost is
# N * window^2 instead of N^2. Shifted windows (every other block) cyclically roll the grid by `shift` (window // 2
# in Swin) before cutting, so information crosses window borders; a mask keeps tokens that the roll brought
# together from opposite edges of the image from attending to each other.

def window_partition(x: Tensor, window: int) -> Tensor:
    """(..., H, W, C) -> (..., num_windows, window * window, C), windows in raster order."""
    *lead, h, w, c = x.shape
    assert h % window == 0 and w % window == 0, f"grid {h}x{w} is not divisible by window {window}"
    x = x.reshape(*lead, h // window, window, w // window, window, c).transpose(-4, -3)
    return x.reshape(*lead, (h // window) * (w // window), window * window, c)


def window_reverse(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of window_partition: (..., num_windows, window * window, C) -> (..., H, W, C)."""
    *lead, _, _, c = x.shape
    x = x.reshape(*lead, h // window, w // window, window, window, c).transpose(-4, -3)
    return x.reshape(*lead, h, w, c)


def _shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(num_windows, L, L) bool for the rolled grid: tokens attend only within the same pre-roll region."""
    def regions(n: int) -> Tensor:  # 0: untouched, 1: last window's own part, 2: wrapped in from the other edge
        r = torch.zeros(n, dtype=torch.long, device=device)
        r[n - window:n - shift] = 1
        r[n - shift:] = 2
        return r
    label = (regions(h)[:, None] * 3 + regions(w)[None, :])[..., None]  # (h, w, 1)
    label = window_partition(label, window).squeeze(-1)  # (num_windows, L)
    return label[:, :, None] == label[:, None, :]


def window_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], window: int, *, shift: int = 0,
                     bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Attention inside window x window squares of the token grid. q, k, v: (B, H, N, D), N = grid[0] * grid[1] in
    raster order. shift: cyclic shift of the windows (0 <= shift < window). bias: optional (H, L, L) float bias shared
    by all windows (relative position bias), L = window^2. Returns (B, H, N, D)."""
    B, H, N, D = q.shape
    gh, gw = grid
    assert N == gh * gw, f"{N} tokens do not form a {gh}x{gw} grid"
    assert 0 <= shift < window, f"shift {shift} must be in [0, window {window})"

    def to_windows(t: Tensor) -> Tensor:
        t = t.reshape(B, H, gh, gw, D)
        if shift:
            t = t.roll((-shift, -shift), dims=(2, 3))
        t = window_partition(t, window)  # (B, H, nW, L, D)
        return t.transpose(1, 2).reshape(-1, H, window * window, D)  # windows become batch: (B * nW, H, L, D)

    mask = None
    if shift:
        nw_mask = _shifted_window_mask(gh, gw, window, shift, q.device)  # (nW, L, L)
        mask = nw_mask[:, None].repeat(B, 1, 1, 1)  # (B * nW, 1, L, L), same window order as to_windows
    if bias is not None and mask is not None:
        attn_bias = torch.where(mask, bias.to(q.dtype), float("-inf"))  # (B * nW, H, L, L)
    else:
        attn_bias = bias if bias is not None else mask
    out = attention(to_windows(q), to_windows(k), to_windows(v), attn_bias=attn_bias, backend=backend)
    out = out.reshape(B, -1, H, window * window, D).transpose(1, 2)  # (B, H, nW, L, D)
    out = window_reverse(out, window, gh, gw)
    if shift:
        out = out.roll((shift, shift), dims=(2, 3))
    return out.reshape(B, H, N, D)


def window_mask(h: int, w: int, window: int, shift: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Dense (N, N) bool mask that makes full attention equal to (shifted) window attention.

    Derived directly rather than by rolling: along an axis, shifted windows are the intervals [0, s), [s, s + w),
    [s + w, s + 2w), ..., i.e. position r is in group (r + window - shift) // window (shift = 0 gives the plain
    windows). Two tokens may attend iff they share the group along both axes.
    """
    rows = (torch.arange(h, device=device) + window - shift) // window
    cols = (torch.arange(w, device=device) + window - shift) // window
    group = (rows[:, None] * (w + 1) + cols[None, :]).flatten()
    return group[:, None] == group[None, :]


def _relative_position_index(window: int) -> Tensor:
    """(L, L) index into a ((2 window - 1)^2)-entry table: one learned bias per 2D offset between two tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, L, L), each in [0, 2 window - 2]
    return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Swin (shifted-)window self-attention over a (B, N, C) token grid, with a learned relative position bias."""

    def __init__(self, dim: int, n_heads: int, grid: tuple[int, int], window: int, *, shift: int = 0,
                 bias: bool = True, rel_pos: bool = True, backend: str | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads, self.grid, self.window, self.shift, self.backend = n_heads, tuple(grid), window, shift, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_table = None
        if rel_pos:
            self.rel_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, n_heads))
            nn.init.trunc_normal_(self.rel_table, std=0.02)
            self.register_buffer("rel_index", _relative_position_index(window), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).split(C, dim=2))
        bias = None
        if self.rel_table is not None:
            bias = self.rel_table[self.rel_index].permute(2, 0, 1)  # (H, L, L)
        y = window_attention(q, k, v, self.grid, self.window, shift=self.shift, bias=bias, backend=self.backend)
        return self.proj(_merge_heads(y))


# -----------------------------------------------------------------------------------------------------------------
# 4. TransGAN grid self-attention
#
# TransGAN (Jiang et al., 2021) "partitions a full-size feature map into several non-overlapping grids, and the token
# interactions are calculated inside every local grid". The grids are contiguous cell x cell squares (the official
# code cuts them with a Swin-style window partition and no shift), NOT strided/dilated groups of positions with the
# same (i mod g, j mod g). That is what is implemented: attention inside each contiguous cell, no shift.

def grid_attention(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], cell: int, *, bias: Tensor | None = None,
                   backend: str | None = None) -> Tensor:
    """TransGAN grid self-attention: tokens attend within their cell x cell grid cell. Shapes as window_attention."""
    return window_attention(q, k, v, grid, cell, shift=0, bias=bias, backend=backend)


def grid_mask(h: int, w: int, cell: int, device: torch.device | str | None = None) -> Tensor:
    """Dense (N, N) bool mask equivalent to grid_attention: same (row // cell, col // cell)."""
    rows = torch.arange(h, device=device) // cell
    cols = torch.arange(w, device=device) // cell
    cell_id = (rows[:, None] * w + cols[None, :]).flatten()
    return cell_id[:, None] == cell_id[None, :]


class GridAttention(WindowAttention):
    """TransGAN grid self-attention block (used on the large grids of the generator)."""

    def __init__(self, dim: int, n_heads: int, grid: tuple[int, int], cell: int, *, bias: bool = True,
                 rel_pos: bool = True, backend: str | None = None):
        super().__init__(dim, n_heads, grid, cell, shift=0, bias=bias, rel_pos=rel_pos, backend=backend)


# -----------------------------------------------------------------------------------------------------------------
# 5. LadaGAN linear additive attention
#
# Morales-Juarez & Fuentes-Pineda (2024), "Efficient generative adversarial networks using linear additive-attention
# Transformers". Per head h with head dim d and tokens i = 1..N (q_i, k_i, v_i in R^d, w in R^d learned):
#
#     alpha_i = exp(w . q_i / sqrt(d)) / sum_j exp(w . q_j / sqrt(d))     one attention vector per head (softmax over N)
#     q_bar   = sum_i alpha_i q_i                                         global query vector
#     p_i     = q_bar * k_i                                               keys modulated element-wise
#     u_i     = p_i * v_i                                                 values modulated element-wise
#     out_i   = W_o [u_i^1; ...; u_i^H]                                   heads concatenated, output projection
#
# Every step is O(N d): no N x N matrix exists. This single attention vector is what distinguishes Lada from
# Fastformer, which aggregates once more: beta_i = softmax_i(w_k . p_i / sqrt(d)), k_bar = sum_i beta_i p_i,
# u_i = k_bar * v_i. That variant is available with `w_k` (LadaAttention(global_key=True)); LadaGAN does not use it.
# (The official LadaGAN code computes the logits with one dense layer from all heads' queries; we follow the
# paper's per-head w . q_i.)

def lada_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, w_k: Tensor | None = None) -> Tensor:
    """Linear additive attention. q, k, v: (B, H, N, D); w (and w_k): (H, D). Returns (B, H, N, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    alpha = torch.einsum("bhnd,hd->bhn", q, w).mul(scale).softmax(dim=-1)  # (B, H, N)
    q_bar = torch.einsum("bhn,bhnd->bhd", alpha, q)[:, :, None]  # (B, H, 1, D)
    p = q_bar * k
    if w_k is not None:  # Fastformer's global key
        beta = torch.einsum("bhnd,hd->bhn", p, w_k).mul(scale).softmax(dim=-1)
        k_bar = torch.einsum("bhn,bhnd->bhd", beta, p)[:, :, None]
        return k_bar * v
    return p * v


class LadaAttention(nn.Module):
    """Ladaformer attention over (B, N, C)."""

    def __init__(self, dim: int, n_heads: int, *, bias: bool = True, global_key: bool = False):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        head_dim = dim // n_heads
        self.w = nn.Parameter(torch.randn(n_heads, head_dim) / math.sqrt(head_dim))
        self.w_k = nn.Parameter(torch.randn(n_heads, head_dim) / math.sqrt(head_dim)) if global_key else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).split(C, dim=2))
        return self.proj(_merge_heads(lada_attention(q, k, v, self.w, w_k=self.w_k)))


# -----------------------------------------------------------------------------------------------------------------
# 6. YLG local sparse attention
#
# Daras et al. (2020), "Your Local GAN". Sparse 1D patterns with block size b (default floor(sqrt(N)), as in YLG):
#   LTR (left to right)  step 1: i sees its own block up to itself;   step 2: i sees itself and the last token of
#                                                                      every block
#   RTL (right to left)  step 1: i sees its own block from itself on; step 2: i sees itself and the first token of
#                                                                      every block
# After step 1 the last (LTR) / first (RTL) token of a block has seen the whole block, so step 2 after step 1 gives
# every output a path from every input ("full information"): reach = step2 @ step1 is all-true. (We take the last
# token of a short final block as its summary, so this holds for any N, not only multiples of b.)
# The 1D patterns are laid over the 2D grid with the ESA enumeration: positions ordered by Manhattan distance from the
# top-left corner, so neighbours in 1D are neighbours on the grid. As in YLG, each head gets one step of one pattern
# (heads split evenly over RTL-1, RTL-2, LTR-1, LTR-2: several heads per pattern), and the two steps compose across
# consecutive attention layers. The sparse pattern is expressed as a boolean mask through `attention`, so it runs on
# the memory-efficient backend where available (this saves memory, not FLOPs: the mask is dense).

def esa_order(h: int, w: int) -> Tensor:
    """ESA enumeration of an h x w grid: raster indices ordered by Manhattan distance from (0, 0), ties by row."""
    rows = torch.arange(h)[:, None].expand(h, w).flatten()
    cols = torch.arange(w)[None, :].expand(h, w).flatten()
    return torch.argsort((rows + cols) * h + rows, stable=True)  # unique keys: the order is fully determined


def ylg_masks(n: int, block: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The 1D YLG patterns as (n, n) bool masks [output, input]: {"ltr": (step1, step2), "rtl": (step1, step2)}."""
    block = block or max(1, math.isqrt(n))
    i = torch.arange(n)
    same_block = (i[:, None] // block) == (i[None, :] // block)
    last = torch.clamp((i // block) * block + block - 1, max=n - 1) == i  # summary token of each block (LTR)
    first = i % block == 0  # summary token of each block (RTL)
    eye = i[:, None] == i[None, :]
    return {"ltr": (same_block & (i[None, :] <= i[:, None]), eye | last[None, :]),
            "rtl": (same_block & (i[None, :] >= i[:, None]), eye | first[None, :])}


def ylg_head_masks(h: int, w: int, n_heads: int, block: int | None = None) -> Tensor:
    """(n_heads, N, N) bool masks over the raster-ordered h x w grid: the ESA-ordered YLG patterns, n_heads / 4
    consecutive heads each for RTL step 1, RTL step 2, LTR step 1, LTR step 2 (YLG's head layout)."""
    assert n_heads % 4 == 0, f"YLG needs a multiple of 4 heads (2 patterns x 2 steps), got {n_heads}"
    masks = ylg_masks(h * w, block)
    patterns = [masks["rtl"][0], masks["rtl"][1], masks["ltr"][0], masks["ltr"][1]]
    rank = torch.argsort(esa_order(h, w))  # rank[raster index] = position in the ESA sequence
    per_head = [patterns[head * 4 // n_heads] for head in range(n_heads)]
    return torch.stack([m[rank][:, rank] for m in per_head])


def ylg_attention(q: Tensor, k: Tensor, v: Tensor, head_masks: Tensor, *, backend: str | None = None) -> Tensor:
    """YLG sparse attention: q, k, v (B, H, N, D) in raster order, head_masks (H, N, N) from ylg_head_masks."""
    return attention(q, k, v, attn_bias=head_masks, backend=backend)


class YLGAttention(nn.Module):
    """YLG local sparse self-attention over a (B, N, C) token grid."""

    def __init__(self, dim: int, n_heads: int, grid: tuple[int, int], *, block: int | None = None, bias: bool = True,
                 backend: str | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads, self.backend = n_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("head_masks", ylg_head_masks(grid[0], grid[1], n_heads, block), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).split(C, dim=2))
        return self.proj(_merge_heads(ylg_attention(q, k, v, self.head_masks, backend=self.backend)))
