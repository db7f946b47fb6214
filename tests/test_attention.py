"""Tests for models/attention.py: backends agree with the written-out reference, every variant equals full attention
under its mask, Lada follows its equations at linear cost, YLG patterns carry full information. CPU, small."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from models.attention import (YLG_SPARSE_MIN_TOKENS, GridAttention, KVCache, LadaAttention, MultiHeadAttention,
                              WindowAttention, YLGAttention, active_backend, attention, block_sparse_layout,
                              esa_order, grid_attention, grid_mask, lada_attention, sparse_attention, window_attention,
                              window_mask, window_partition, window_reverse, xformers_status, ylg_attention,
                              ylg_head_masks, ylg_layout, ylg_masks)

ROOT = Path(__file__).resolve().parents[1]


def randn(*shape: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def qkv(B: int, H: int, N: int, D: int, *, M: int | None = None, device: str = "cpu"):
    return (randn(B, H, M or N, D, seed=1, device=device), randn(B, H, N, D, seed=2, device=device),
            randn(B, H, N, D, seed=3, device=device))


def make_bias(kind: str | None, H: int, M: int, N: int) -> torch.Tensor | None:
    if kind == "bool":
        mask = randn(H, M, N, seed=4) > 0
        rows = torch.arange(M)
        mask[:, rows, N - M + rows] = True  # every query keeps a key it can see under causal too (its own position)
        return mask
    if kind == "float":
        return randn(H, M, N, seed=5)
    return None


# --- backends ------------------------------------------------------------------------------------------------------

def test_math_reference_by_hand():
    """The reference itself, against a per-query loop: query i of M is position N - M + i (bottom-right causal)."""
    q, k, v = qkv(1, 1, 6, 4, M=3)
    out = attention(q, k, v, causal=True, backend="math")
    for i in range(3):
        visible = 6 - 3 + i + 1
        logits = torch.stack([(q[0, 0, i] * k[0, 0, j]).sum() / 2.0 for j in range(visible)])  # sqrt(4) = 2
        weights = logits.exp() / logits.exp().sum()
        expected = sum(weights[j] * v[0, 0, j] for j in range(visible))
        assert torch.allclose(out[0, 0, i], expected, atol=1e-6)


@pytest.mark.parametrize("M", [10, 4, 1])  # M < N: the queries are the newest tokens (KV cache shapes)
@pytest.mark.parametrize("bias_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_math(causal, bias_kind, M):
    q, k, v = qkv(2, 3, 10, 8, M=M)
    bias = make_bias(bias_kind, 3, M, 10)
    sdpa = attention(q, k, v, causal=causal, attn_bias=bias, backend="sdpa")
    ref = attention(q, k, v, causal=causal, attn_bias=bias, backend="math")
    assert sdpa.shape == (2, 3, M, 8)
    assert torch.allclose(sdpa, ref, atol=1e-5)
    if (causal and M > 1) or bias_kind:  # the option really changes the result
        assert not torch.allclose(sdpa, attention(q, k, v, backend="math"), atol=1e-3)


def test_unknown_backend_and_xformers_on_cpu_are_refused():
    q = randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="flash")
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(q, q, q, backend="xformers")


def test_cpu_use_never_imports_xformers():
    code = ("import sys, torch\n"
            "from models.attention import attention, active_backend, MultiHeadAttention\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "attention(q, q, q, causal=True)\n"
            "MultiHeadAttention(16, 2, causal=True)(torch.randn(1, 5, 16))\n"
            "assert active_backend('cpu') == 'sdpa', active_backend('cpu')\n"
            "assert 'xformers' not in sys.modules, 'xformers was imported on CPU'\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "XFORMERS" not in run.stderr


# --- GPT: causality and KV cache -----------------------------------------------------------------------------------

def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """A plain 1D rotary embedding: enough to check the hook receives absolute positions."""
    half = q.shape[-1] // 2
    freqs = positions[:, None].float() / (100.0 ** (torch.arange(half) / half))
    cos, sin = freqs.cos(), freqs.sin()

    def rotate(x):
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotate(q), rotate(k)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causal_attention_never_looks_ahead(backend):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True, backend=backend).eval()
    x = randn(2, 12, 16)
    t = 7
    x2 = x.clone()
    x2[:, t] += 1.0
    y, y2 = mha(x, rotary=rope), mha(x2, rotary=rope)
    assert torch.allclose(y[:, :t], y2[:, :t], atol=1e-6, rtol=0)
    assert ((y[:, t:] - y2[:, t:]).abs().amax(-1) > 1e-4).all()  # every later token does see the change


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_kv_cache_decoding_equals_full_recompute(backend):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True, backend=backend).eval()
    x = randn(2, 11, 16)
    full = mha(x, rotary=rope)
    cache = mha.new_kv_cache(2, 16)
    steps = [mha(x[:, :5], cache, rotary=rope), mha(x[:, 5:8], cache, rotary=rope)]  # prefill, then a chunk
    steps += [mha(x[:, i:i + 1], cache, rotary=rope) for i in range(8, 11)]  # then one token at a time
    assert cache.pos == 11
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    cache.reset()
    assert cache.pos == 0 and torch.allclose(mha(x[:, :3], cache, rotary=rope), full[:, :3], atol=1e-5)


def test_kv_cache_refuses_overflow():
    cache = KVCache(1, 2, 4, 8)
    cache.append(randn(1, 2, 3, 8), randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="overflow"):
        cache.append(randn(1, 2, 2, 8), randn(1, 2, 2, 8))


# --- Swin windows and TransGAN grids -------------------------------------------------------------------------------

def test_window_partition_roundtrip():
    x = randn(2, 3, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 3, 6, 16, 5)
    assert torch.equal(windows[0, 0, 1, 0], x[0, 0, 0, 4])  # second window starts at column 4
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)


@pytest.mark.parametrize("grid,window,shift", [((8, 8), 4, 0), ((8, 12), 4, 0), ((8, 8), 4, 2), ((8, 12), 4, 2),
                                               ((6, 6), 3, 1), ((4, 4), 4, 2)])
def test_window_attention_equals_masked_full_attention(grid, window, shift):
    gh, gw = grid
    q, k, v = qkv(2, 2, gh * gw, 8)
    out = window_attention(q, k, v, grid, window, shift=shift, backend="sdpa")
    ref = attention(q, k, v, attn_bias=window_mask(gh, gw, window, shift), backend="math")
    assert torch.allclose(out, ref, atol=1e-5)


def test_window_masks_mean_what_swin_means():
    plain, shifted = window_mask(8, 8, 4), window_mask(8, 8, 4, shift=2)
    assert (plain.sum(1) == 16).all()
    assert plain[0, 3] and not plain[0, 4]  # (0, 3) shares the first window, (0, 4) is the next one
    idx = lambda r, c: r * 8 + c  # noqa: E731
    assert shifted[idx(2, 2), idx(5, 5)] and not shifted[idx(1, 1), idx(2, 2)]  # shifted windows start at row/col 2
    # the cyclic roll puts rows 6-7 and 0-1 in one window, but they are opposite edges: the mask keeps them apart
    assert not shifted[idx(0, 0), idx(7, 7)] and not shifted[idx(0, 3), idx(7, 3)]
    assert shifted[idx(0, 0), idx(1, 1)] and shifted[idx(6, 6), idx(7, 7)]


@pytest.mark.parametrize("shift", [0, 2])
def test_window_relative_bias_equals_dense_bias(shift):
    gh, gw, window, H = 8, 4, 4, 2
    L = window * window
    q, k, v = qkv(1, H, gh * gw, 8)
    bias = randn(H, L, L, seed=7)
    out = window_attention(q, k, v, (gh, gw), window, shift=shift, bias=bias, backend="sdpa")
    # scatter the per-window bias into an (H, N, N) bias over raster positions
    rolled = torch.arange(gh * gw).reshape(gh, gw).roll((-shift, -shift), dims=(0, 1))
    token = window_partition(rolled[..., None], window)[..., 0]  # (num_windows, L) raster index of each slot
    dense = torch.full((H, gh * gw, gh * gw), float("-inf"))
    for slots in token:
        dense[:, slots[:, None], slots[None, :]] = bias
    dense = dense.masked_fill(~window_mask(gh, gw, window, shift), float("-inf"))
    assert torch.allclose(out, attention(q, k, v, attn_bias=dense, backend="math"), atol=1e-5)


def test_grid_attention_equals_masked_full_attention():
    gh, gw, cell = 8, 12, 4
    q, k, v = qkv(2, 3, gh * gw, 8)
    out = grid_attention(q, k, v, (gh, gw), cell, backend="sdpa")
    mask = grid_mask(gh, gw, cell)
    assert torch.allclose(out, attention(q, k, v, attn_bias=mask, backend="math"), atol=1e-5)
    assert not torch.allclose(out, attention(q, k, v, backend="math"), atol=1e-3)
    idx = lambda r, c: r * gw + c  # noqa: E731
    # contiguous cells (TransGAN), not strided groups: (0,0)~(3,3) attend, (0,0)~(4,4) and (0,3)~(0,4) do not
    assert mask[idx(0, 0), idx(3, 3)] and not mask[idx(0, 0), idx(4, 4)] and not mask[idx(0, 3), idx(0, 4)]


# --- LadaGAN -------------------------------------------------------------------------------------------------------

LN2 = math.log(2.0)
LADA_Q = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [2 * LN2, 0.0, 0.0, 2.0]])
LADA_K = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 0.0, -1.0]])
LADA_V = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])


def test_lada_matches_its_equations_by_hand():
    """One head, d = 4 (sqrt(d) = 2), three tokens, w = e_1.
    logits w.q_i / 2 = [0, 0, ln 2]  ->  alpha = [1/4, 1/4, 1/2]
    q_bar = q_1/4 + q_2/4 + q_3/2 = [ln 2, 1/2, 1, 1]
    p_i = q_bar * k_i = [ln2, 1/2, 1, 1], [2 ln2, 1, 2, 2], [0, 1/2, 0, -1]
    u_i = p_i * v_i = [ln2, 1, 3, 4], [2 ln2, 0, 2, 0], [0, 1, 0, -2]"""
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = lada_attention(LADA_Q[None, None], LADA_K[None, None], LADA_V[None, None], w)
    expected = torch.tensor([[LN2, 1.0, 3.0, 4.0], [2 * LN2, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, -2.0]])
    assert torch.allclose(out[0, 0], expected, atol=1e-6)


def test_lada_global_key_variant_by_hand():
    """Fastformer's extra step on the same p_i, w_k = [0, 0, 2 ln 2, 0]:
    logits w_k.p_i / 2 = ln2 * [1, 2, 0]  ->  beta = [2, 4, 1] / 7
    k_bar = (2 p_1 + 4 p_2 + p_3) / 7 = [10 ln2 / 7, 5.5 / 7, 10 / 7, 9 / 7];  u_i = k_bar * v_i"""
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    w_k = torch.tensor([[0.0, 0.0, 2 * LN2, 0.0]])
    out = lada_attention(LADA_Q[None, None], LADA_K[None, None], LADA_V[None, None], w, w_k=w_k)
    k_bar = torch.tensor([10 * LN2 / 7, 5.5 / 7, 10 / 7, 9 / 7])
    assert torch.allclose(out[0, 0], k_bar * LADA_V, atol=1e-6)


def test_lada_module_is_projection_around_lada_attention():
    torch.manual_seed(0)
    mod = LadaAttention(16, 4)
    x = randn(2, 9, 16)
    q, k, v = mod.qkv(x).split(16, dim=2)
    heads = lambda t: t.view(2, 9, 4, 4).transpose(1, 2)  # noqa: E731
    u = lada_attention(heads(q), heads(k), heads(v), mod.w)
    assert torch.allclose(mod(x), mod.proj(u.transpose(1, 2).reshape(2, 9, 16)), atol=1e-6)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces (what actually gets materialised)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def largest_intermediate(fn, n: int, heads: int = 2) -> int:
    q, k, v = qkv(1, heads, n, 8)
    with ShapeRecorder() as rec:
        fn(q, k, v)
    return max(rec.numels)


def matmul_flops(fn, n: int, heads: int = 2) -> int:
    q, k, v = qkv(1, heads, n, 8)
    with FlopCounterMode(display=False) as counter:
        fn(q, k, v)
    return counter.get_total_flops()


def test_lada_cost_is_linear_in_sequence_length():
    w = randn(2, 8, seed=9)
    lada = lambda q, k, v: lada_attention(q, k, v, w)  # noqa: E731
    small, big = largest_intermediate(lada, 128), largest_intermediate(lada, 2048)
    assert big <= 16 * small  # 16x the tokens, at most 16x the largest tensor
    assert big < 2048 * 2048  # never an N x N tensor
    assert matmul_flops(lada, 2048) == 16 * matmul_flops(lada, 128)
    # the probes do see quadratic cost when it is there
    full = lambda q, k, v: attention(q, k, v, backend="math")  # noqa: E731
    assert largest_intermediate(full, 512) >= 512 * 512
    assert matmul_flops(full, 512) == 16 * matmul_flops(full, 128)


# --- YLG -----------------------------------------------------------------------------------------------------------

def test_ylg_patterns_by_hand():
    """n = 6, block 3: blocks {0,1,2} and {3,4,5}; LTR summaries are 2 and 5, RTL summaries 0 and 3."""
    m = ylg_masks(6, 3)
    ltr1 = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    eye = torch.eye(6, dtype=torch.bool)
    ltr2 = eye.clone()
    ltr2[:, [2, 5]] = True
    rtl2 = eye.clone()
    rtl2[:, [0, 3]] = True
    assert torch.equal(m["ltr"][0], ltr1) and torch.equal(m["ltr"][1], ltr2)
    assert torch.equal(m["rtl"][0], ltr1.T) and torch.equal(m["rtl"][1], rtl2)


@pytest.mark.parametrize("n,block", [(16, None), (64, None), (64, 5), (50, None), (7, 3)])
def test_ylg_pairs_have_full_information(n, block):
    for name, (step1, step2) in ylg_masks(n, block).items():
        reach = (step2.float() @ step1.float()) > 0  # output <-(step 2)- middle <-(step 1)- input
        assert reach.all(), f"{name}: some input never reaches some output"
        assert not step1.all() and not step2.all(), f"{name}: a step is dense"
        assert not ((step1.float() @ step2.float()) > 0).all(), f"{name}: the order of the steps should matter"


@pytest.mark.parametrize("h,w", [(3, 3), (4, 6), (5, 2), (1, 7)])
def test_esa_order_is_a_permutation_by_manhattan_distance(h, w):
    order = esa_order(h, w)
    assert sorted(order.tolist()) == list(range(h * w))
    rows, cols = order // w, order % w
    dist = rows + cols
    assert (dist[1:] >= dist[:-1]).all()
    ties = dist[1:] == dist[:-1]
    assert (rows[1:][ties] > rows[:-1][ties]).all()  # deterministic tie-break: by row
    if (h, w) == (3, 3):
        assert order.tolist() == [0, 1, 3, 2, 4, 6, 5, 7, 8]


def test_ylg_head_masks_layout_and_full_information_on_the_grid():
    h, w, heads = 4, 6, 8
    masks = ylg_head_masks(h, w, heads)
    assert masks.shape == (heads, 24, 24)
    for first, second in [(0, 2), (4, 6)]:  # RTL step 1 / step 2 heads, LTR step 1 / step 2 heads
        assert torch.equal(masks[first], masks[first + 1])  # two heads per pattern step
        assert ((masks[second].float() @ masks[first].float()) > 0).all()
    rank = torch.argsort(esa_order(h, w))
    assert torch.equal(masks[4], ylg_masks(24)["ltr"][0][rank][:, rank])  # raster index -> ESA rank -> pattern


@pytest.mark.parametrize("sparse", [False, True])
def test_ylg_attention_only_reads_what_each_head_may_see(sparse):
    h, w, H = 4, 4, 4
    masks = ylg_head_masks(h, w, H)
    pattern = ylg_layout(h, w, H) if sparse else masks
    q, k, v = qkv(1, H, h * w, 8)
    out = ylg_attention(q, k, v, pattern, backend="sdpa")
    assert torch.allclose(out, attention(q, k, v, attn_bias=masks, backend="math"), atol=1e-5)
    for j in [0, 5, 15]:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        changed = (ylg_attention(q, k2, v2, pattern, backend="sdpa") - out).abs().amax(-1)[0] > 1e-6  # (H, N)
        assert torch.equal(changed, masks[:, :, j])


# --- block-sparse backend: equal to the dense mask, without an N x N tensor ---------------------------------------

def assert_close_for_dtype(out: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    """out and ref sum the same terms in different orders and groupings (dot products over the head dim, softmax
    and weighted sums over the keys): each rounds at most about `terms` times by eps of the dtype, relative to the
    magnitude of the result, with a factor 8 for the exp/normalisation steps on top."""
    tol = 8 * terms * torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{out.dtype}: max error {err:.3g} > tolerance {tol:.3g}"


def forward_and_grads(fn, q, k, v):
    """fn's output and the gradients of a fixed random projection of it with respect to q, k, v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    weights = randn(*out.shape, seed=21).to(out.dtype)
    return (out, *torch.autograd.grad((out * weights).sum(), (q, k, v)))


YLG_GRIDS = [(6, 9, None),   # N = 54, block 7: a short last block of 5
             (16, 16, None),  # N = 256 = 16 blocks of 16
             (8, 8, 5),      # explicit block 5: 12 blocks and one of 4
             (3, 11, None),  # N = 33, block 5: last block of 3
             (1, 7, 3)]      # a single row: ESA order is raster order


@pytest.mark.parametrize("esa", [True, False])
@pytest.mark.parametrize("h,w,block", YLG_GRIDS)
def test_ylg_layout_is_the_dense_pattern(h, w, block, esa):
    for heads in (4, 8):
        layout = ylg_layout(h, w, heads, block, esa=esa)
        assert torch.equal(layout.dense(), ylg_head_masks(h, w, heads, block, esa=esa))


def test_ylg_without_esa_runs_the_patterns_in_raster_order():
    raster = ylg_head_masks(6, 9, 4, esa=False)
    assert torch.equal(raster[2], ylg_masks(54)["ltr"][0]) and torch.equal(raster[1], ylg_masks(54)["rtl"][1])
    assert not torch.equal(raster, ylg_head_masks(6, 9, 4))  # the ESA order is a different pattern on the grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("esa", [True, False])
@pytest.mark.parametrize("h,w,block", YLG_GRIDS)
def test_sparse_ylg_equals_dense_ylg_forward_and_gradients(h, w, block, esa, dtype):
    heads, dim = 8, 16
    q, k, v = (t.to(dtype) for t in qkv(2, heads, h * w, dim))
    masks = ylg_head_masks(h, w, heads, block, esa=esa)
    layout = ylg_layout(h, w, heads, block, esa=esa)
    ref = forward_and_grads(lambda q, k, v: ylg_attention(q, k, v, masks, backend="math"), q, k, v)
    keys = int(masks.sum(-1).max())  # most keys any query reads
    for backend in ("math", "sdpa"):
        got = forward_and_grads(lambda q, k, v: ylg_attention(q, k, v, layout, backend=backend), q, k, v)
        for out, expected in zip(got, ref):
            assert_close_for_dtype(out, expected, dim + keys)
    # a wrong pattern is far outside that tolerance: the other ordering changes the outputs by O(1)
    other = ylg_head_masks(h, w, heads, block, esa=not esa)
    if not torch.equal(other, masks):
        assert (attention(q, k, v, attn_bias=other, backend="math") - ref[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_mask_layout_equals_dense_mask_forward_and_gradients(dtype):
    n, block, heads, dim = 23, 5, 3, 8  # 5 blocks, the last of 3 tokens
    blocks = randn(heads, 5, 5, seed=30) > 0.3
    blocks[1] = blocks[0]  # heads 0 and 1 share a pattern (one group)
    blocks[:, torch.arange(5), torch.arange(5)] = True  # every query keeps its own block
    near = lambda qi, ki: (qi - ki).abs() <= 6  # noqa: E731  a mask_mod inside the visited tiles
    layout = block_sparse_layout(blocks, block, n, mask_mod=near)
    assert [(g.heads.start, g.heads.stop) for g in layout.groups] == [(0, 2), (2, 3)]
    i = torch.arange(n)
    dense = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n] & near(i[:, None], i[None, :])
    assert torch.equal(layout.dense(), dense)
    q, k, v = (t.to(dtype) for t in qkv(2, heads, n, dim))
    ref = forward_and_grads(lambda q, k, v: attention(q, k, v, attn_bias=dense, backend="math"), q, k, v)
    got = forward_and_grads(lambda q, k, v: sparse_attention(q, k, v, layout), q, k, v)
    for out, expected in zip(got, ref):
        assert_close_for_dtype(out, expected, dim + n)
    plain = block_sparse_layout(blocks[0], block, n)  # no mask_mod: whole tiles, one group for all heads
    assert torch.equal(plain.dense()[0], blocks[0].repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n])


def test_sparse_ylg_cost_grows_as_n_sqrt_n():
    """Matmul FLOPs and the largest tensor of the sparse path grow as N^1.5 (8x from 256 to 1024 tokens, where full
    attention grows 16x), and no N x N tensor is ever made."""
    def sparse(n):
        layout = ylg_layout(math.isqrt(n), math.isqrt(n), 4)
        return lambda q, k, v: ylg_attention(q, k, v, layout, backend="math")
    small, big = matmul_flops(sparse(256), 256, heads=4), matmul_flops(sparse(1024), 1024, heads=4)
    assert 4 * small < big <= 8 * small
    assert big < matmul_flops(lambda q, k, v: attention(q, k, v, backend="math"), 1024, heads=4) / 8
    largest_small = largest_intermediate(sparse(256), 256, heads=4)
    largest_big = largest_intermediate(sparse(1024), 1024, heads=4)
    assert largest_big <= 8 * largest_small and largest_big < 1024 * 1024 / 16
    layout = ylg_layout(64, 64, 4)
    assert layout.nbytes() < 4 * 4096 * 4096 / 100  # the dense masks it replaces are 4 x 4096 x 4096 bools


def test_ylg_module_picks_sparse_from_the_threshold_and_both_agree():
    side = math.isqrt(YLG_SPARSE_MIN_TOKENS)
    assert YLGAttention(16, 4, (side, side)).sparse and not YLGAttention(16, 4, (side - 1, side)).sparse
    torch.manual_seed(0)
    dense = YLGAttention(32, 8, (6, 9), sparse=False)
    sparse = YLGAttention(32, 8, (6, 9), sparse=True)
    assert sparse.load_state_dict(dense.state_dict()) is not None  # same parameters, the pattern is not state
    x = randn(2, 54, 32, seed=40)
    results = []
    for module in (sparse, dense):
        xg = x.clone().requires_grad_()
        out = module(xg)
        grads = torch.autograd.grad((out * randn(*out.shape, seed=41)).sum(), [xg, *module.parameters()])
        results.append((out, *grads))
    for got, expected in zip(*results):
        assert_close_for_dtype(got, expected, 32 + 54)


# --- modules: output i depends on input j exactly where the mask allows -------------------------------------------

def dependence(module: torch.nn.Module, n: int, dim: int, columns: list[int]) -> torch.Tensor:
    x = randn(1, n, dim, seed=11)
    y = module(x)
    cols = []
    for j in columns:
        x2 = x.clone()
        x2[0, j] += 1.0
        cols.append((module(x2) - y).abs().amax(-1)[0] > 1e-6)
    return torch.stack(cols, dim=1)  # (n, len(columns))


MODULE_CASES = {
    "causal": (lambda: MultiHeadAttention(16, 4, causal=True), lambda: torch.ones(24, 24, dtype=torch.bool).tril()),
    "window": (lambda: WindowAttention(16, 4, (4, 6), 2), lambda: window_mask(4, 6, 2)),
    "shifted": (lambda: WindowAttention(16, 4, (4, 6), 2, shift=1), lambda: window_mask(4, 6, 2, shift=1)),
    "grid": (lambda: GridAttention(16, 4, (4, 6), 2), lambda: grid_mask(4, 6, 2)),
    "ylg": (lambda: YLGAttention(16, 4, (4, 6), sparse=False), lambda: ylg_head_masks(4, 6, 4).any(0)),
    "ylg sparse": (lambda: YLGAttention(16, 4, (4, 6), sparse=True), lambda: ylg_head_masks(4, 6, 4).any(0)),
    "lada": (lambda: LadaAttention(16, 4), lambda: torch.ones(24, 24, dtype=torch.bool)),  # global: sees all
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_dependence_follows_its_mask(case):
    torch.manual_seed(0)
    make_module, make_mask = MODULE_CASES[case]
    columns = [0, 7, 13, 23]
    with torch.no_grad():
        seen = dependence(make_module().eval(), 24, 16, columns)
    assert torch.equal(seen, make_mask()[:, columns])


# --- xformers (CUDA only) ------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="xformers is the CUDA backend and this machine has no CUDA device")


@needs_cuda
@pytest.mark.parametrize("M", [64, 16])
@pytest.mark.parametrize("bias_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_matches_math(causal, bias_kind, M):
    if active_backend("cuda") != "xformers":
        pytest.skip(f"xformers does not run on this CUDA machine: {xformers_status()}")
    q, k, v = qkv(2, 3, 64, 32, M=M, device="cuda")
    bias = make_bias(bias_kind, 3, M, 64)
    bias = bias.cuda() if bias is not None else None
    for dtype, tol in [(torch.float32, 2e-4), (torch.float16, 2e-2)]:
        args = (q.to(dtype), k.to(dtype), v.to(dtype))
        out = attention(*args, causal=causal, attn_bias=bias, backend="xformers")
        ref = attention(q, k, v, causal=causal, attn_bias=bias, backend="math")
        assert torch.allclose(out.float(), ref, atol=tol), (dtype, (out.float() - ref).abs().max())


@needs_cuda
def test_xformers_runs_window_and_ylg_masks():
    if active_backend("cuda") != "xformers":
        pytest.skip(f"xformers does not run on this CUDA machine: {xformers_status()}")
    q, k, v = qkv(2, 4, 12 * 12, 32, device="cuda")
    for shift in (0, 3):
        out = window_attention(q, k, v, (12, 12), 6, shift=shift, backend="xformers")
        ref = attention(q, k, v, attn_bias=window_mask(12, 12, 6, shift, device="cuda"), backend="math")
        assert torch.allclose(out, ref, atol=2e-4)
    masks = ylg_head_masks(12, 12, 4).cuda()
    assert torch.allclose(ylg_attention(q, k, v, masks, backend="xformers"),
                          attention(q, k, v, attn_bias=masks, backend="math"), atol=2e-4)
