"""The attention modules' own settings (bias, relative position table, global key, YLG block and ESA, dropout, the
backend they were given) each change the output the way they say; the KV cache's size and dtype rules; and the
layout helpers on tiny grids where a looser formula collides. CPU, float64 where outputs are compared."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.attention as A
from models.attention import (GridAttention, KVCache, LadaAttention, MultiHeadAttention, WindowAttention,
                              YLGAttention, attention, block_sparse_layout, grid_attention, grid_mask, lada_attention,
                              sparse_attention, window_attention, window_mask, ylg_attention, ylg_head_masks,
                              ylg_layout)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    B, N, C = t.shape
    return t.view(B, N, h, C // h).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D)


def qkv_of(mod: torch.nn.Module, x: torch.Tensor, h: int):
    q, k, v = mod.qkv(x).split(x.shape[-1], dim=2)
    return heads(q, h), heads(k, h), heads(v, h)


# ---------------------------------------------------------------- backends reach the kernels

def test_every_entry_point_passes_its_backend_on():
    """xformers refuses CPU tensors: a module or function that forwards backend="xformers" fails, one that drops it
    runs the default (sdpa)."""
    x = randn(1, 16, 8, seed=0)
    q = randn(1, 4, 16, 2, seed=1)
    calls = [
        lambda: MultiHeadAttention(8, 4, backend="xformers").double()(x),
        lambda: WindowAttention(8, 4, (4, 4), 2, backend="xformers").double()(x),
        lambda: GridAttention(8, 4, (4, 4), 2, backend="xformers").double()(x),
        lambda: YLGAttention(8, 4, (4, 4), sparse=False, backend="xformers").double()(x),
        lambda: YLGAttention(8, 4, (4, 4), sparse=True, backend="xformers").double()(x),
        lambda: window_attention(q, q, q, (4, 4), 2, backend="xformers"),
        lambda: grid_attention(q, q, q, (4, 4), 2, backend="xformers"),
        lambda: ylg_attention(q, q, q, ylg_head_masks(4, 4, 4), backend="xformers"),
        lambda: ylg_attention(q, q, q, ylg_layout(4, 4, 4), backend="xformers"),
        lambda: sparse_attention(q[:, :1], q[:, :1], q[:, :1],
                                 block_sparse_layout(torch.ones(4, 4, dtype=torch.bool), 4, 16), backend="xformers"),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(RuntimeError, match="xformers backend needs CUDA tensors"):
            call()
            raise AssertionError(f"call {i} ran without xformers")


# ---------------------------------------------------------------- GPT attention

def test_multihead_defaults_and_bias():
    mod = MultiHeadAttention(8, 2)
    assert (mod.causal, mod.dropout, mod.backend) == (False, 0.0, None)
    assert mod.qkv.bias is None and mod.proj.bias is None
    mod = MultiHeadAttention(8, 2, bias=True)
    assert mod.qkv.bias.shape == (24,) and mod.proj.bias.shape == (8,)


def test_multihead_dropout_only_while_training():
    torch.manual_seed(0)
    mod = MultiHeadAttention(8, 2, dropout=0.5).double()
    x = randn(2, 6, 8, seed=3)
    plain = MultiHeadAttention(8, 2).double()
    plain.load_state_dict(mod.state_dict())
    mod.eval()
    assert torch.equal(mod(x), plain(x))  # eval: no dropout
    mod.train()
    assert not torch.allclose(mod(x), plain(x))  # training: attention weights dropped


def test_multihead_bias_and_rotary_positions_without_a_cache():
    torch.manual_seed(0)
    mod = MultiHeadAttention(8, 2).double()
    x = randn(1, 5, 8, seed=4)
    mask = torch.ones(5, 5, dtype=torch.bool).triu()  # each query sees itself and later keys
    q, k, v = qkv_of(mod, x, 2)
    expected = mod.proj(merge(attention(q, k, v, attn_bias=mask, backend="math")))
    torch.testing.assert_close(mod(x, attn_bias=mask), expected)
    seen = []
    mod(x, rotary=lambda q, k, pos: (seen.append(pos.tolist()), (q, k))[1])
    assert seen == [[0, 1, 2, 3, 4]]


def test_kv_cache_sizes_and_types():
    cache = KVCache(2, 3, 4, 5)
    assert cache.k.shape == (2, 3, 4, 5) and cache.k.dtype == torch.float32 and cache.v.dtype == torch.float32
    assert KVCache(1, 1, 2, 2, dtype=torch.float64).k.dtype == torch.float64
    k = randn(2, 3, 4, 5, seed=5).float()
    keys, values = cache.append(k, k)  # exactly max_len tokens fit
    assert torch.equal(keys, k) and cache.pos == 4
    mod = MultiHeadAttention(8, 2).double()
    assert mod.new_kv_cache(1, 3).k.dtype == torch.float64  # the layer's own dtype by default
    assert mod.new_kv_cache(1, 3, dtype=torch.float16).k.dtype == torch.float16
    assert mod.new_kv_cache(1, 3).k.shape == (1, 2, 3, 4)


# ---------------------------------------------------------------- Swin / TransGAN modules

def test_window_module_defaults_and_relative_position_table():
    torch.manual_seed(0)
    mod = WindowAttention(16, 4, (8, 8), 4)
    assert mod.qkv.bias is not None and mod.rel_table.shape == (49, 4)
    assert 0.015 < mod.rel_table.std().item() < 0.025  # std 0.02 (196 draws)
    assert "rel_index" not in mod.state_dict() and "rel_table" in mod.state_dict()  # the index is derived
    assert WindowAttention(16, 4, (8, 8), 4, bias=False).qkv.bias is None
    assert WindowAttention(16, 4, (8, 8), 4, rel_pos=False).rel_table is None


@pytest.mark.parametrize("rel_pos", [True, False])
def test_window_module_output_is_window_attention_with_its_bias(rel_pos):
    torch.manual_seed(0)
    mod = WindowAttention(8, 2, (4, 4), 2, shift=1, rel_pos=rel_pos).double()
    if rel_pos:
        with torch.no_grad():
            mod.rel_table.copy_(randn(9, 2, seed=6))
    x = randn(2, 16, 8, seed=7)
    q, k, v = qkv_of(mod, x, 2)
    bias = mod.rel_table[A._relative_position_index(2)].permute(2, 0, 1) if rel_pos else None
    expected = mod.proj(merge(window_attention(q, k, v, (4, 4), 2, shift=1, bias=bias, backend="math")))
    torch.testing.assert_close(mod(x), expected)
    if rel_pos:  # and the table matters
        plain = mod.proj(merge(window_attention(q, k, v, (4, 4), 2, shift=1, backend="math")))
        assert not torch.allclose(mod(x), plain)


def test_relative_position_index_by_hand():
    # window 2: tokens (0,0) (0,1) (1,0) (1,1); offset (dr, dc) in [-1, 1]^2 -> (dr + 1) * 3 + (dc + 1)
    assert A._relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    idx = A._relative_position_index(3)
    assert idx.shape == (9, 9) and sorted(set(idx.flatten().tolist())) == list(range(25))


def test_grid_module_is_an_unshifted_window_module():
    torch.manual_seed(0)
    mod = GridAttention(8, 2, (4, 4), 2).double()
    assert (mod.shift, mod.window, mod.backend) == (0, 2, None) and mod.qkv.bias is not None
    assert mod.rel_table is not None and mod.rel_table.shape == (9, 2)
    assert GridAttention(8, 2, (4, 4), 2, bias=False).qkv.bias is None
    assert GridAttention(8, 2, (4, 4), 2, rel_pos=False).rel_table is None
    with torch.no_grad():
        mod.rel_table.copy_(randn(9, 2, seed=8))
    x = randn(1, 16, 8, seed=9)
    q, k, v = qkv_of(mod, x, 2)
    bias = mod.rel_table[A._relative_position_index(2)].permute(2, 0, 1)
    torch.testing.assert_close(mod(x), mod.proj(merge(window_attention(q, k, v, (4, 4), 2, bias=bias,
                                                                       backend="math"))))
    # grid_attention passes the bias on
    torch.testing.assert_close(grid_attention(q, k, v, (4, 4), 2, bias=bias, backend="math"),
                               window_attention(q, k, v, (4, 4), 2, bias=bias, backend="math"))


def test_window_and_grid_masks_on_grids_where_a_loose_pairing_collides():
    # window_mask: tokens share a window iff same row group and same column group
    for h, w, window, shift in [(2, 2, 2, 1), (4, 2, 2, 1), (2, 6, 2, 1), (3, 3, 3, 0), (4, 4, 2, 1)]:
        rows = (torch.arange(h) + window - shift) // window
        cols = (torch.arange(w) + window - shift) // window
        r, c = rows.repeat_interleave(w), cols.repeat(h)
        expected = (r[:, None] == r[None, :]) & (c[:, None] == c[None, :])
        assert torch.equal(window_mask(h, w, window, shift), expected), (h, w, window, shift)
    for h, w, cell in [(2, 2, 1), (4, 2, 1), (2, 4, 2), (6, 3, 3)]:
        r, c = (torch.arange(h) // cell).repeat_interleave(w), (torch.arange(w) // cell).repeat(h)
        assert torch.equal(grid_mask(h, w, cell), (r[:, None] == r[None, :]) & (c[:, None] == c[None, :]))


def test_window_shift_must_be_smaller_than_the_window():
    q = randn(1, 1, 16, 2, seed=10)
    with pytest.raises(AssertionError, match=r"shift 2 must be in \[0, window 2\)"):
        window_attention(q, q, q, (4, 4), 2, shift=2)
    with pytest.raises(AssertionError, match="grid 4x6 is not divisible by window 4"):
        A.window_partition(torch.zeros(4, 6, 1), 4)
    with pytest.raises(AssertionError, match="grid 6x4 is not divisible by window 4"):
        A.window_partition(torch.zeros(6, 4, 1), 4)


# ---------------------------------------------------------------- Lada

def test_lada_module_parameters_and_global_key():
    torch.manual_seed(0)
    mod = LadaAttention(256, 4)
    assert mod.qkv.bias is not None and mod.w_k is None and mod.w.shape == (4, 64)
    assert 0.1 < mod.w.std().item() < 0.15  # randn / sqrt(64)
    assert LadaAttention(8, 2, bias=False).qkv.bias is None
    g = LadaAttention(256, 4, global_key=True)
    assert isinstance(g.w_k, torch.nn.Parameter) and g.w_k.shape == (4, 64) and 0.1 < g.w_k.std().item() < 0.15
    g = LadaAttention(8, 2, global_key=True).double()
    x = randn(2, 5, 8, seed=11)
    q, k, v = qkv_of(g, x, 2)
    torch.testing.assert_close(g(x), g.proj(merge(lada_attention(q, k, v, g.w, w_k=g.w_k))))
    assert not torch.allclose(g(x), g.proj(merge(lada_attention(q, k, v, g.w))))


# ---------------------------------------------------------------- YLG module

@pytest.mark.parametrize("sparse", [False, True])
def test_ylg_module_uses_its_block_and_esa(sparse):
    torch.manual_seed(0)
    grid = (4, 5)
    for block, esa in [(3, True), (None, False), (7, False)]:
        mod = YLGAttention(8, 4, grid, block=block, esa=esa, sparse=sparse).double()
        assert mod.qkv.bias is not None
        x = randn(1, 20, 8, seed=12)
        q, k, v = qkv_of(mod, x, 4)
        masks = ylg_head_masks(*grid, 4, block, esa=esa)
        expected = mod.proj(merge(attention(q, k, v, attn_bias=masks, backend="math")))
        torch.testing.assert_close(mod(x), expected)
    assert YLGAttention(8, 4, grid, bias=False, sparse=sparse).qkv.bias is None
    if not sparse:
        assert "head_masks" not in YLGAttention(8, 4, grid, sparse=False).state_dict()  # derived, not state


def test_ylg_module_keeps_one_layout_per_device():
    mod = YLGAttention(8, 4, (4, 4), sparse=True)
    cpu = mod.pattern(torch.device("cpu"))
    assert mod.pattern(torch.device("cpu")) is cpu and list(mod._layouts) == [torch.device("cpu")]
    meta = mod.pattern(torch.device("meta"))  # another device: a moved copy, made once and kept
    assert meta is mod.pattern(torch.device("meta")) and meta.groups[0].q_index.device.type == "meta"
    assert torch.equal(cpu.dense(), ylg_head_masks(4, 4, 4)) and cpu.groups[0].q_index.device.type == "cpu"
    dense = YLGAttention(8, 4, (4, 4), sparse=False)
    assert dense.pattern(torch.device("cpu")) is dense.head_masks


# ---------------------------------------------------------------- block-sparse layouts

def test_block_sparse_layout_of_uneven_rows_and_head_groups():
    n, block = 10, 3  # 4 blocks, the last one short
    bm = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(4):
        for j in range(4):
            if bm[i, j]:
                dense[i * block:(i + 1) * block, j * block:(j + 1) * block] = True
    layout = block_sparse_layout(bm, block, n)
    assert torch.equal(layout.dense()[0], dense)
    # per-head masks: heads 0-1 share one group, head 2 its own, head 3 equals head 2 but follows it
    other = torch.eye(4, dtype=torch.bool)
    layout = block_sparse_layout(torch.stack([bm, bm, other, other]), block, n)
    assert [(g.heads.start, g.heads.stop) for g in layout.groups] == [(0, 2), (2, 4)]
    eye = torch.zeros(n, n, dtype=torch.bool)
    for i in range(4):
        eye[i * block:(i + 1) * block, i * block:(i + 1) * block] = True
    assert torch.equal(layout.dense(), torch.stack([dense, dense, eye, eye]))
    q, k, v = (randn(1, 4, n, 4, seed=s) for s in (13, 14, 15))
    torch.testing.assert_close(sparse_attention(q, k, v, layout, backend="math"),
                               attention(q, k, v, attn_bias=layout.dense(), backend="math"))
    assert layout.groups[1].kv_index.shape == (4, 3)  # one visited tile per row: 1 x block keys
    bad = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(AssertionError, match=r"block mask \(1, 3, 3\) does not tile 10 tokens in blocks of 3"):
        block_sparse_layout(bad, block, n)


def test_layout_size_accounting():
    layout = block_sparse_layout(torch.eye(2, dtype=torch.bool), 4, 8)
    g = layout.groups[0]
    parts = [g.q_index, g.kv_index, g.mask, g.q_pos, g.shared]
    assert layout.nbytes() == sum(t.numel() * t.element_size() for t in parts if t is not None)


# ---------------------------------------------------------------- backends: dropout, dtype, dispatch

def test_math_dropout_is_dropout_of_the_attention_weights():
    q, k, v = (randn(2, 2, 5, 4, seed=s) for s in (20, 21, 22))
    torch.manual_seed(3)
    out = attention(q, k, v, dropout_p=0.3, backend="math")
    torch.manual_seed(3)
    weights = F.dropout((q @ k.transpose(-2, -1) / 2.0).softmax(-1), p=0.3)
    torch.testing.assert_close(out, weights @ v)
    assert torch.equal(attention(q, k, v, dropout_p=0.0, backend="math"),
                       attention(q, k, v, backend="math"))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_sparse_paths_apply_dropout(causal):
    q, k, v = (randn(1, 4, 16, 4, seed=s) for s in (23, 24, 25))
    assert not torch.allclose(attention(q, k, v, causal=causal, dropout_p=0.5, backend="sdpa"),
                              attention(q, k, v, causal=causal, backend="sdpa"))
    layout = ylg_layout(4, 4, 4)  # groups with and without shared keys
    assert not torch.allclose(sparse_attention(q, k, v, layout, dropout_p=0.5, backend="math"),
                              sparse_attention(q, k, v, layout, backend="math"))
    for g in layout.groups:  # each group on its own
        one = A.SparseLayout(16, (A.replace(g, heads=slice(0, 1)),))
        assert not torch.allclose(sparse_attention(q[:, :1], k[:, :1], v[:, :1], one, dropout_p=0.5),
                                  sparse_attention(q[:, :1], k[:, :1], v[:, :1], one))


def test_backend_names_reach_their_kernels(monkeypatch):
    q, k, v = (randn(1, 2, 4, 4, seed=s) for s in (26, 27, 28))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    attention(q, k, v, backend="sdpa")
    attention(q, k, v)  # the CPU default
    attention(q, k, v, backend="math")
    assert calls == [1, 1]


def test_a_float_bias_is_cast_to_the_query_dtype():
    q, k, v = (randn(1, 2, 4, 4, seed=s) for s in (29, 30, 31))
    bias = randn(2, 4, 4, seed=32).float()
    torch.testing.assert_close(attention(q, k, v, attn_bias=bias, backend="sdpa"),
                               attention(q, k, v, attn_bias=bias.double(), backend="math"))


def test_sdpa_with_two_new_queries_is_still_causal():
    q, k, v = randn(1, 2, 2, 4, seed=33), randn(1, 2, 6, 4, seed=34), randn(1, 2, 6, 4, seed=35)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="sdpa"),
                               attention(q, k, v, causal=True, backend="math"))


def test_shared_key_tiles_equal_a_written_out_softmax():
    """_tiles_with_shared_keys against a loop: each query's logits over the shared keys and its tile's (allowed) keys,
    one softmax, for causal tiles (with and without a mask) and for non-square tiles (T != K)."""
    b, nT, D, S = 2, 3, 4, 2
    for T, K, causal, with_mask in [(3, 3, True, False), (3, 3, True, True), (2, 5, False, True), (2, 5, False, False)]:
        qt, kt, vt = randn(b, nT, T, D, seed=36), randn(b, nT, K, D, seed=37), randn(b, nT, K, D, seed=38)
        ks, vs = randn(b, S, D, seed=39), randn(b, S, D, seed=40)
        mask = (randn(nT, T, K, seed=41) > -0.5) if with_mask else None
        if mask is not None:
            mask[:, :, 0] = True  # every query keeps one tile key
        out = A._tiles_with_shared_keys(qt, kt, vt, ks, vs, mask, causal, 0.0)
        ref = torch.empty_like(out)
        for bi in range(b):
            for t in range(nT):
                for i in range(T):
                    allowed = [j for j in range(K) if (mask is None or mask[t, i, j]) and (not causal or j <= i)]
                    keys = torch.cat([ks[bi], kt[bi, t, allowed]])
                    values = torch.cat([vs[bi], vt[bi, t, allowed]])
                    w = (keys @ qt[bi, t, i] / math.sqrt(D)).softmax(0)
                    ref[bi, t, i] = w @ values
        torch.testing.assert_close(out, ref)
    torch.manual_seed(1)
    dropped = A._tiles_with_shared_keys(qt, kt, vt, ks, vs, None, False, 0.5)
    assert not torch.allclose(dropped, A._tiles_with_shared_keys(qt, kt, vt, ks, vs, None, False, 0.0))


def test_sparse_attention_names_a_layout_of_another_size():
    layout = ylg_layout(4, 4, 4)
    for shape in [(1, 4, 9, 2), (1, 8, 16, 2)]:
        q = randn(*shape, seed=42)
        with pytest.raises(ValueError) as err:
            sparse_attention(q, q, q, layout)
        assert str(err.value) == f"layout is for 4 heads x 16 tokens, got {shape[1]} x {shape[2]}"


def test_ylg_default_block_on_tiny_sequences_is_one():
    # n < 4: isqrt(n) is 1, so every token is its own block
    for n in (2, 3):
        default, one = A.ylg_masks(n), A.ylg_masks(n, 1)
        assert all(torch.equal(default[p][s], one[p][s]) for p in ("ltr", "rtl") for s in (0, 1))
        assert torch.equal(ylg_layout(1, n, 4).dense(), ylg_head_masks(1, n, 4, 1))
