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
  6. sparse     `sparse_attention(q, k, v, layout)`: any pattern given as query tiles and the keys each reads
                (`block_sparse_layout` builds one from a block mask), run on the backends above without an N x N mask.
  7. YLG        two-step local sparse attention with the LTR/RTL patterns over the ESA enumeration of the grid,
                as dense masks (the reference) or as a sparse layout (O(N sqrt N)).

Tensors are (B, H, N, D) inside attention (batch, heads, tokens, head dim) and (B, N, C) at module boundaries;
2D token grids are flattened in raster order (row-major), token index = row * width + col.
Masks are boolean with True = "may attend"; float biases are added to the logits.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
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
# 6. Block-sparse attention without an N x N mask
#
# A sparse pattern is cut into query tiles; each tile lists the keys any of its queries may read and a (T, K) mask
# over those pairs. `sparse_attention` gathers every tile's queries and keys and runs the ordinary backends on the
# tiles as a batch, then gathers the outputs back into token order. Cost and memory are sum over tiles of T * K
# logits instead of N^2, and nothing of size N x N exists: plain torch, no compile step, any device, and gradients
# flow through the gathers. Heads that share a pattern form one group and share its index tensors.
# Keys that every query reads ("global" tokens, e.g. YLG's block summaries) are listed once as `shared` instead of in
# every tile: their logits are one (N, S) matrix product, softmax-ed jointly with the tile's own logits, instead of S
# extra keys gathered into each of the N / T tiles.
# Padding (tiles of a pattern whose sizes vary) uses real token indices, so nothing is out of range: a padded key is
# masked out, a padded query row is computed and never gathered back.

@dataclass(frozen=True)
class SparseTiles:
    """One pattern, shared by a contiguous range of heads.

    q_index (nT, T) long: the queries of each tile, every token exactly once over all tiles (plus padding).
    kv_index (nT, K) long: the keys each tile reads.
    mask (nT, T, K) bool or None: which (query, key) pairs of a tile attend; None = all of them.
    causal: the pairs are the lower triangle (T == K): run as the kernels' causal case, no mask tensor.
    q_pos (N,) long: where token n sits in q_index.flatten(), to put the outputs back in token order.
    shared (S,) long or None: keys every query reads besides its tile's (must not repeat a tile's key).
    """
    heads: slice
    q_index: Tensor
    kv_index: Tensor
    mask: Tensor | None
    causal: bool
    q_pos: Tensor
    shared: Tensor | None = None

    def to(self, device: torch.device | str) -> SparseTiles:
        moved = {name: None if getattr(self, name) is None else getattr(self, name).to(device)
                 for name in ("q_index", "kv_index", "mask", "q_pos", "shared")}
        return replace(self, **moved)

    def dense(self) -> Tensor:
        """The (N, N) bool mask this pattern stands for (tests and small references only: it is N x N)."""
        n = self.q_pos.numel()
        nT, T = self.q_index.shape
        pairs = torch.ones(nT, T, self.kv_index.shape[1], dtype=torch.bool, device=self.q_index.device)
        if self.causal:
            pairs = pairs.tril()
        if self.mask is not None:
            pairs = pairs & self.mask
        # keep only the rows gathered back (padded query rows are not), then scatter the listed keys of each row
        rows = pairs.reshape(nT * T, -1)[self.q_pos]  # (N, K), row n = query token n
        keys = self.kv_index[self.q_pos // T]  # (N, K)
        out = torch.zeros(n, n, dtype=torch.bool, device=rows.device)
        out[torch.arange(n, device=rows.device)[:, None].expand_as(keys)[rows], keys[rows]] = True
        if self.shared is not None:
            out[:, self.shared] = True
        return out


@dataclass(frozen=True)
class SparseLayout:
    """A sparse attention pattern over n tokens for n_heads heads: one SparseTiles per group of heads, in head order."""
    n: int
    groups: tuple[SparseTiles, ...]

    @property
    def n_heads(self) -> int:
        return self.groups[-1].heads.stop

    def to(self, device: torch.device | str) -> SparseLayout:
        return SparseLayout(self.n, tuple(g.to(device) for g in self.groups))

    def dense(self) -> Tensor:
        """(n_heads, n, n) bool, the mask the layout stands for (for tests: this one is N x N)."""
        return torch.cat([g.dense()[None].expand(g.heads.stop - g.heads.start, -1, -1) for g in self.groups])

    def nbytes(self) -> int:
        """Bytes the layout holds (index and mask tensors): what replaces the dense (H, N, N) mask."""
        return sum(t.numel() * t.element_size() for g in self.groups
                   for t in (g.q_index, g.kv_index, g.mask, g.q_pos, g.shared) if t is not None)

    def logits(self) -> int:
        """Query-key pairs computed per batch element (all heads): the sparse counterpart of n_heads * n^2."""
        return sum((g.heads.stop - g.heads.start) * g.q_index.numel()
                   * (g.kv_index.shape[1] + (0 if g.shared is None else g.shared.numel())) for g in self.groups)


def _tiles(heads: slice, order: Tensor, q_seq: Tensor, kv_seq: Tensor, mask: Tensor | None, causal: bool,
           shared_seq: Tensor | None = None) -> SparseTiles:
    """SparseTiles from positions in a 1D sequence (-1 = padding), mapped to tokens by order[position]."""
    n = order.numel()
    flat = q_seq.flatten()
    q_pos = torch.empty(n, dtype=torch.long)
    q_pos[order[flat[flat >= 0]]] = torch.arange(flat.numel())[flat >= 0]
    if mask is not None:  # padded keys never attend; padded query rows attend everywhere, so they stay finite (a
        # NaN row, even one never gathered back, would turn the gradients of its tile's keys into NaN)
        mask = (mask & (kv_seq >= 0)[:, None, :]) | (q_seq < 0)[:, :, None]
        mask = None if mask.all() else mask
    shared = None if shared_seq is None else order[shared_seq]
    return SparseTiles(heads, order[q_seq.clamp(min=0)], order[kv_seq.clamp(min=0)], mask, causal, q_pos, shared)


def block_sparse_layout(block_mask: Tensor, block: int, n: int, *,
                        mask_mod: Callable[[Tensor, Tensor], Tensor] | None = None) -> SparseLayout:
    """Layout of a pattern given as a block mask, FlexAttention style: block_mask (nQ, nK) or (H, nQ, nK) bool says
    which block x block tiles of the (n, n) matrix are visited (tokens in raster order, a short last block allowed);
    mask_mod(q_idx, kv_idx) -> bool (broadcasting index tensors), if given, masks pairs inside visited tiles.
    Each query tile reads the keys of its visited tiles, padded to the most any row visits."""
    nb = -(-n // block)
    bm = block_mask if block_mask.dim() == 3 else block_mask[None]
    assert bm.shape[1:] == (nb, nb), f"block mask {tuple(bm.shape)} does not tile {n} tokens in blocks of {block}"
    groups, start = [], 0
    for h in range(bm.shape[0]):  # consecutive heads with the same block mask share one group
        if h + 1 < bm.shape[0] and torch.equal(bm[h], bm[h + 1]):
            continue
        width = max(int(bm[h].sum(1).max()), 1)
        # visited key tiles of each query tile first (stable sort), the rest as padding tiles
        tiles = torch.sort((~bm[h]).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (nb, width)
        visited = torch.gather(bm[h], 1, tiles)
        kv_seq = (tiles[:, :, None] * block + torch.arange(block)).reshape(nb, width * block)
        kv_ok = (visited[:, :, None].expand(-1, -1, block).reshape(nb, -1)) & (kv_seq < n)
        q_seq = torch.arange(nb * block).reshape(nb, block)
        mask = kv_ok[:, None, :].expand(-1, block, -1)
        if mask_mod is not None:
            mask = mask & mask_mod(q_seq[:, :, None], kv_seq[:, None, :])
        kv_seq = kv_seq.masked_fill(~kv_ok, -1)
        q_seq = q_seq.masked_fill(q_seq >= n, -1)
        groups.append(_tiles(slice(start, h + 1), torch.arange(n), q_seq, kv_seq, mask.contiguous(), False))
        start = h + 1
    return SparseLayout(n, tuple(groups))


def _tiles_with_shared_keys(qt: Tensor, kt: Tensor, vt: Tensor, ks: Tensor, vs: Tensor, mask: Tensor | None,
                            causal: bool, dropout_p: float) -> Tensor:
    """Softmax over each query's tile keys and the shared keys together, written out (the backends cannot take two
    key sets). qt (b, nT, T, D), kt/vt (b, nT, K, D), ks/vs (b, S, D) -> (b, nT, T, D); logits are (b, N, S + K)."""
    b, nT, T, D = qt.shape
    scale = 1.0 / math.sqrt(D)
    tile = (qt @ kt.transpose(-2, -1)) * scale  # (b, nT, T, K)
    if causal:
        mask = _causal_mask(T, T, qt.device) if mask is None else mask & _causal_mask(T, T, qt.device)
    if mask is not None:
        tile = tile.masked_fill(~mask, float("-inf"))
    shared = ((qt.reshape(b, nT * T, D) @ ks.transpose(-2, -1)) * scale).reshape(b, nT, T, -1)  # (b, nT, T, S)
    weights = torch.cat([shared, tile], dim=-1).softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    w_shared, w_tile = weights.split([shared.shape[-1], tile.shape[-1]], dim=-1)
    return (w_shared.reshape(b, nT * T, -1) @ vs).reshape(b, nT, T, D) + w_tile @ vt


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: SparseLayout, *, dropout_p: float = 0.0,
                     backend: str | None = None) -> Tensor:
    """Attention under a sparse layout: q, k, v (B, H, N, D) -> (B, H, N, D), equal to `attention` with
    attn_bias=layout.dense(), at the cost of the layout's tiles."""
    B, H, N, D = q.shape
    if layout.n != N or layout.n_heads != H:
        raise ValueError(f"layout is for {layout.n_heads} heads x {layout.n} tokens, got {H} x {N}")
    outs = []
    for g in layout.groups:
        if g.q_index.device != q.device:
            g = g.to(q.device)
        nT, T = g.q_index.shape
        K = g.kv_index.shape[1]
        hg = g.heads.stop - g.heads.start
        # (B, hg, N, D) -> (B * hg, nT, T or K, D): tiles become the head axis, so the (nT, T, K) mask broadcasts
        qt = q[:, g.heads].index_select(2, g.q_index.flatten()).reshape(B * hg, nT, T, D)
        kt = k[:, g.heads].index_select(2, g.kv_index.flatten()).reshape(B * hg, nT, K, D)
        vt = v[:, g.heads].index_select(2, g.kv_index.flatten()).reshape(B * hg, nT, K, D)
        if g.shared is None:
            out = attention(qt, kt, vt, causal=g.causal, attn_bias=g.mask, dropout_p=dropout_p, backend=backend)
        else:
            ks = k[:, g.heads].index_select(2, g.shared).reshape(B * hg, -1, D)
            vs = v[:, g.heads].index_select(2, g.shared).reshape(B * hg, -1, D)
            out = _tiles_with_shared_keys(qt, kt, vt, ks, vs, g.mask, g.causal, dropout_p)
        outs.append(out.reshape(B, hg, nT * T, D).index_select(2, g.q_pos))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# -----------------------------------------------------------------------------------------------------------------
# 7. YLG local sparse attention
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
# consecutive attention layers.
# Two equal ways to run it: the dense (H, N, N) mask through `attention` (the reference; N^2 time and memory), and a
# SparseLayout through `sparse_attention` (section 6): step 1's query tiles are the YLG blocks, each reading its own
# block (the causal case; RTL lists the block backwards); step 2 reads the ceil(N / b) summaries as shared keys plus
# a one-query tile holding the query itself (masked for the summaries, which already see themselves). Each query
# costs O(sqrt N) and the whole layer O(N sqrt N). YLGAttention picks the sparse one from
# YLG_SPARSE_MIN_TOKENS on, where it measured faster (bench/bench_attention.py).

YLG_SPARSE_MIN_TOKENS = 256


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


def _ylg_sequence(h: int, w: int, esa: bool) -> Tensor:
    """order[s] = raster index of the token at position s of the 1D sequence the patterns run along."""
    return esa_order(h, w) if esa else torch.arange(h * w)


def ylg_head_masks(h: int, w: int, n_heads: int, block: int | None = None, *, esa: bool = True) -> Tensor:
    """(n_heads, N, N) bool masks over the raster-ordered h x w grid: the ESA-ordered YLG patterns, n_heads / 4
    consecutive heads each for RTL step 1, RTL step 2, LTR step 1, LTR step 2 (YLG's head layout).
    esa=False lays the 1D patterns along the raster order instead (the ablation without ESA)."""
    assert n_heads % 4 == 0, f"YLG needs a multiple of 4 heads (2 patterns x 2 steps), got {n_heads}"
    masks = ylg_masks(h * w, block)
    patterns = [masks["rtl"][0], masks["rtl"][1], masks["ltr"][0], masks["ltr"][1]]
    rank = torch.argsort(_ylg_sequence(h, w, esa))  # rank[raster index] = position in the 1D sequence
    per_head = [patterns[head * 4 // n_heads] for head in range(n_heads)]
    return torch.stack([m[rank][:, rank] for m in per_head])


def ylg_layout(h: int, w: int, n_heads: int, block: int | None = None, *, esa: bool = True) -> SparseLayout:
    """The same patterns as ylg_head_masks as a SparseLayout (O(N sqrt N) entries): layout.dense() equals
    ylg_head_masks(h, w, n_heads, block, esa=esa)."""
    assert n_heads % 4 == 0, f"YLG needs a multiple of 4 heads (2 patterns x 2 steps), got {n_heads}"
    n = h * w
    b = block or max(1, math.isqrt(n))
    nb = -(-n // b)
    order = _ylg_sequence(h, w, esa)
    seq = torch.arange(nb * b).reshape(nb, b)  # row j = positions of block j
    length = (n - seq[:, :1]).clamp(max=b)  # (nb, 1) tokens in each block (the last may be short)
    r = torch.arange(b)
    ltr_q = seq.masked_fill(seq >= n, -1)
    rtl_q = torch.where(r < length, seq[:, :1] + length - 1 - r, -1)  # each block backwards, padding still last
    summary = {"ltr": seq[:, 0] + length[:, 0] - 1, "rtl": seq[:, 0]}  # (nb,) last / first token of each block
    itself = torch.arange(n)[:, None]  # step 2: n tiles of one query, whose one key is the query itself
    groups = []
    for i, (name, step) in enumerate([("rtl", 1), ("rtl", 2), ("ltr", 1), ("ltr", 2)]):
        heads = slice(i * n_heads // 4, (i + 1) * n_heads // 4)
        if step == 1:  # the lower triangle of the tile's own queries: RTL's "itself on" is it, listed backwards
            q_seq = rtl_q if name == "rtl" else ltr_q
            groups.append(_tiles(heads, order, q_seq, q_seq, None, True))
            continue
        is_summary = torch.zeros(n, dtype=torch.bool)
        is_summary[summary[name]] = True
        groups.append(_tiles(heads, order, itself, itself, ~is_summary[:, None, None], False, summary[name]))
    return SparseLayout(n, tuple(groups))


def ylg_attention(q: Tensor, k: Tensor, v: Tensor, head_masks: Tensor | SparseLayout, *,
                  backend: str | None = None) -> Tensor:
    """YLG sparse attention: q, k, v (B, H, N, D) in raster order; head_masks either the dense (H, N, N) masks from
    ylg_head_masks (reference) or the equal SparseLayout from ylg_layout."""
    if isinstance(head_masks, SparseLayout):
        return sparse_attention(q, k, v, head_masks, backend=backend)
    return attention(q, k, v, attn_bias=head_masks, backend=backend)


class YLGAttention(nn.Module):
    """YLG local sparse self-attention over a (B, N, C) token grid.

    sparse: run the SparseLayout (True) or the dense masks (False); None = sparse from YLG_SPARSE_MIN_TOKENS on.
    """

    def __init__(self, dim: int, n_heads: int, grid: tuple[int, int], *, block: int | None = None, bias: bool = True,
                 backend: str | None = None, esa: bool = True, sparse: bool | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads, self.backend = n_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.sparse = grid[0] * grid[1] >= YLG_SPARSE_MIN_TOKENS if sparse is None else sparse
        if self.sparse:  # index tensors, not buffers: moved to the input's device on first use and kept there
            self._layouts = {torch.device("cpu"): ylg_layout(grid[0], grid[1], n_heads, block, esa=esa)}
        else:
            self.register_buffer("head_masks", ylg_head_masks(grid[0], grid[1], n_heads, block, esa=esa),
                                 persistent=False)

    def pattern(self, device: torch.device) -> Tensor | SparseLayout:
        if not self.sparse:
            return self.head_masks
        if device not in self._layouts:
            self._layouts[device] = self._layouts[torch.device("cpu")].to(device)
        return self._layouts[device]

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).split(C, dim=2))
        return self.proj(_merge_heads(ylg_attention(q, k, v, self.pattern(x.device), backend=self.backend)))
