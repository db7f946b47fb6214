"""The xformers path of models/attention.py on a CPU: a stand-in for `xformers.ops` (memory_efficient_attention
written out in xformers' (B, N, H, D) layout, its two causal mask classes) checks what the module hands xformers
(layout, mask class, bias tensor and its alignment, dropout) and the one-time probe that decides whether xformers
is used. Whether the real kernels agree is the GPU tests' job (tests/test_attention.py, skipped without CUDA)."""
from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch

import models.attention as A


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class LowerTriangularMask:
    """Query i sees keys 0..i (top-left aligned)."""


class LowerTriangularFromBottomRightMask:
    """The M queries are the last M of N positions: query i sees keys 0..N - M + i."""


def fake_ops(calls: list, probe_error: Exception | None = None) -> types.ModuleType:
    ops = types.ModuleType("xformers.ops")
    ops.LowerTriangularMask = LowerTriangularMask
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(
        LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask))

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        if probe_error is not None:
            raise probe_error
        calls.append({"shapes": (q.shape, k.shape, v.shape), "bias": attn_bias, "p": p})
        B, M, H, D = q.shape
        N = k.shape[1]
        scores = torch.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(D)
        i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
        if isinstance(attn_bias, LowerTriangularMask):
            scores = scores.masked_fill(j > i, float("-inf"))
        elif isinstance(attn_bias, LowerTriangularFromBottomRightMask):
            scores = scores.masked_fill(j > i + N - M, float("-inf"))
        elif attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhmn,bnhd->bmhd", scores.softmax(-1), v)

    ops.memory_efficient_attention = memory_efficient_attention
    return ops


@pytest.mark.parametrize("M", [6, 2])
@pytest.mark.parametrize("bias_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_call_equals_the_math_reference(causal, bias_kind, M):
    B, H, N, D = 2, 3, 6, 4
    q, k, v = randn(B, H, M, D, seed=1), randn(B, H, N, D, seed=2), randn(B, H, N, D, seed=3)
    bias = None
    if bias_kind == "bool":
        bias = randn(H, M, N, seed=4) > 0
        bias[:, torch.arange(M), N - M + torch.arange(M)] = True  # every query keeps a key it may see
    elif bias_kind == "float":
        bias = randn(H, M, N, seed=5)
    calls: list = []
    out = A._xformers_attention(fake_ops(calls), q, k, v, causal, bias, 0.25)
    ref = A.attention(q, k, v, causal=causal, attn_bias=bias, backend="math")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # float64: the same sums up to rounding
    (call,) = calls
    assert call["shapes"] == ((B, M, H, D), (B, N, H, D), (B, N, H, D)) and call["p"] == 0.25
    kind = type(call["bias"])
    if causal and bias is None:
        assert kind is (LowerTriangularMask if M == N else LowerTriangularFromBottomRightMask)
    elif bias is None:
        assert call["bias"] is None
    else:
        assert kind is torch.Tensor and call["bias"].shape == (B, H, M, N)


def test_xformers_bias_is_a_float_view_on_rows_padded_to_8():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    out = A._xformers_bias(mask, (2, 4, 2, 3), torch.float16)
    assert out.shape == (2, 4, 2, 3) and out.dtype == torch.float16
    assert out.stride()[:2] == (0, 0) and out.stride(-2) == 8 and out.stride(-1) == 1  # broadcast, aligned rows
    expected = torch.tensor([[0.0, -math.inf, 0.0], [-math.inf, 0.0, 0.0]], dtype=torch.float16)
    assert torch.equal(out[1, 3], expected)
    bias = randn(3, 2, 9, seed=6)  # per-head float bias, 9 columns: rows padded to 16
    out = A._xformers_bias(bias, (5, 3, 2, 9), torch.float64)
    assert out.stride() == (0, 32, 16, 1) and torch.equal(out[4], bias)
    assert A._xformers_bias(randn(8, seed=7), (1, 1, 1, 8), torch.float64).stride(-2) == 8  # already aligned


@pytest.fixture
def fresh_probe(monkeypatch):
    """The probe not run yet in this process, and a CPU-made tensor where it asks for a CUDA one."""
    monkeypatch.setattr(A, "_xformers_ops", None)
    monkeypatch.setattr(A, "_xformers_reason", "not probed yet (no CUDA tensor has asked for it)")
    real = torch

    def zeros(*shape, device=None, dtype=None):
        assert device == "cuda"
        return real.zeros(*shape, dtype=dtype)
    monkeypatch.setattr(A, "torch", types.SimpleNamespace(zeros=zeros, float16=real.float16))
    logging.getLogger("xformers").setLevel(logging.INFO)
    yield monkeypatch
    logging.getLogger("xformers").setLevel(logging.NOTSET)


def install(monkeypatch, ops: types.ModuleType) -> None:
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_probe_that_works_loads_xformers_once(fresh_probe, caplog):
    calls: list = []
    ops = fake_ops(calls)
    install(fresh_probe, ops)
    with caplog.at_level(logging.INFO, logger="models.attention"):
        assert A._load_xformers() is ops and A._load_xformers() is ops
    assert len(calls) == 1 and calls[0]["shapes"][0] == (1, 8, 1, 8)  # one tiny probe call, only the first time
    assert A.xformers_status() == "loaded"
    assert [r.getMessage() for r in caplog.records] == [
        "attention: xformers memory_efficient_attention is available on CUDA"]
    assert logging.getLogger("xformers").level == logging.INFO  # its own logger's level is given back


def test_probe_that_fails_falls_back_once_with_the_first_line_of_the_reason(fresh_probe, caplog):
    install(fresh_probe, fake_ops([], probe_error=NotImplementedError("no kernel for this GPU\nsecond line")))
    with caplog.at_level(logging.INFO, logger="models.attention"):
        assert A._load_xformers() is None and A._load_xformers() is None
    assert A.xformers_status() == "NotImplementedError: no kernel for this GPU"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "attention: xformers unavailable (NotImplementedError: no kernel for this GPU); "
                          "falling back to torch sdpa")]
    assert logging.getLogger("xformers").level == logging.INFO


def test_probe_with_an_empty_error_message(fresh_probe):
    install(fresh_probe, fake_ops([], probe_error=RuntimeError("")))
    assert A._load_xformers() is None and A.xformers_status() == "RuntimeError: "


def test_probe_silences_xformers_own_warnings_while_it_runs(fresh_probe):
    seen = []
    ops = fake_ops([])
    real = ops.memory_efficient_attention
    ops.memory_efficient_attention = lambda *a, **kw: (seen.append(logging.getLogger("xformers").level),
                                                       real(*a, **kw))[1]
    install(fresh_probe, ops)
    A._load_xformers()
    assert seen == [logging.CRITICAL]


def test_active_backend(monkeypatch):
    asked = []
    monkeypatch.setattr(A, "_load_xformers", lambda: asked.append(1) or object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert A.active_backend("cuda") == "xformers" and A.active_backend(torch.device("cuda", 0)) == "xformers"
    assert A.active_backend("cpu") == "sdpa"
    monkeypatch.setattr(A, "_load_xformers", lambda: None)
    assert A.active_backend("cuda") == "sdpa"  # xformers failed its probe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(A, "_load_xformers", lambda: asked.append(2) or object())
    assert A.active_backend("cuda") == "sdpa" and asked == [1, 1]  # no CUDA: xformers is never probed
