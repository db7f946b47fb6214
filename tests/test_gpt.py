"""The autoregressive GPT (models/gpt.py): causality, KV cache, sampling, CFG, label dropout, overfitting."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import reference_stack
from models.gpt import GPT, GPTConfig, Rope2D, filter_logits, sample_logits

GRID = (3, 4)  # not square, so rows and columns cannot be confused
VOCAB = 16
N_CLASSES = 5


def tiny(**kw) -> GPT:
    """A 2-layer model small enough that every test runs in well under a second on one thread."""
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(vocab_size=VOCAB, grid=GRID, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_classes=N_CLASSES,
               class_dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def labels_for(model: GPT, n: int) -> torch.Tensor | None:
    return torch.arange(n) % model.config.n_classes if model.config.n_classes else None


ALL_OPTIONS = list(itertools.product(("rmsnorm", "layernorm"), ("swiglu", "gelu"), ("learned", "rope2d"), (0, 5)))


@pytest.mark.parametrize("norm,mlp,pos,n_classes", ALL_OPTIONS)
def test_changing_token_t_never_changes_earlier_logits(norm, mlp, pos, n_classes):
    model = tiny(norm=norm, mlp=mlp, pos=pos, n_classes=n_classes, bias=norm == "layernorm")
    T = model.config.block_size - 1  # the longest input: prefix + h*w - 1 tokens
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    labels = labels_for(model, 2)
    with torch.no_grad():
        base, _ = model(idx, labels)
        assert base.shape == (2, T + 1, VOCAB)
        for t in range(T):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            logits, _ = model(changed, labels)
            # logits[:, s] predicts token s from the prefix and tokens < s: positions 0..t must not see token t
            torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, t + 1], base[:, t + 1]), "token t must reach the next position"
        if n_classes:  # the class prefix conditions everything, position 0 included
            other, _ = model(idx, (labels + 1) % n_classes)
            assert not torch.allclose(other[:, 0], base[:, 0])


@pytest.mark.parametrize("pos,n_classes", list(itertools.product(("learned", "rope2d"), (0, 5))))
def test_kv_cache_logits_equal_full_recompute_step_by_step(pos, n_classes):
    model = tiny(pos=pos, n_classes=n_classes)
    T = model.config.block_size - 1
    idx = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    labels = labels_for(model, 3)
    with torch.no_grad():
        full, _ = model(idx, labels)
        caches = model.new_kv_caches(3)
        # a multi-token prefill (prefix + 2 tokens), one chunk of 3 (queries that are not the last position), then one
        # token per step as generate does
        chunks = [(0, 2), (2, 5)] + [(t, t + 1) for t in range(5, T)]
        got = []
        for i, (a, b) in enumerate(chunks):
            logits, _ = model(idx[:, a:b], labels if i == 0 else None, kv_caches=caches)
            got.append(logits)
            assert caches[0].pos == b + 1
        torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="block size"):
            model(idx[:, :2], kv_caches=caches)  # the cache is full: prefix + h*w - 1 tokens


@pytest.mark.parametrize("pos", ("learned", "rope2d"))
@pytest.mark.parametrize("cfg_scale", (1.0, 2.5))
def test_generate_with_cache_equals_recompute(pos, cfg_scale):
    model = tiny(pos=pos)
    labels = torch.tensor([0, 3, 4, 1])
    for greedy in ({"temperature": 0.0}, {"top_k": 1}):
        a = model.generate(4, labels, cfg_scale=cfg_scale, use_cache=True, **greedy)
        b = model.generate(4, labels, cfg_scale=cfg_scale, use_cache=False, **greedy)
        assert a.shape == (4, model.config.block_size) and a.dtype == torch.long
        assert torch.equal(a, b)
    # seeded sampling draws the same tokens both ways as well
    kw = dict(cfg_scale=cfg_scale, temperature=1.3, top_k=8, top_p=0.9)
    a = model.generate(4, labels, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(4, labels, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)


def reference_sample(model: GPT, labels: torch.Tensor, cfg_scale: float, seed: int, **kw) -> torch.Tensor:
    """The plainest sampler: a full forward per step; for CFG separate conditional and null-class forwards."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(len(labels), 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(model.config.block_size):
            logits = model(tokens, labels)[0][:, -1]
            if cfg_scale != 1.0:
                uncond = model(tokens, torch.full_like(labels, model.config.n_classes))[0][:, -1]
                logits = uncond + cfg_scale * (logits - uncond)
            tokens = torch.cat([tokens, sample_logits(logits, generator=g, **kw)[:, None]], dim=1)
    return tokens


def test_cfg_scale_one_is_plain_conditional_sampling():
    model = tiny()
    with torch.no_grad():  # at init (std 0.02) logits are near uniform and classes barely differ: make both visible
        model.prefix.weight.normal_(generator=torch.Generator().manual_seed(0))
        model.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 4])
    batch_sizes = []
    hook = model.wte.register_forward_hook(lambda mod, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        got = model.generate(3, labels, cfg_scale=1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    finally:
        hook.remove()
    assert torch.equal(got, reference_sample(model, labels, 1.0, seed=7, top_p=0.95))
    assert set(batch_sizes) == {3}, "at scale 1 the null-class half must not run at all"
    # a guidance scale != 1 runs both halves in one batch and mixes as uncond + s * (cond - uncond)
    guided = model.generate(3, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(guided, reference_sample(model, labels, 3.0, seed=7))
    assert not torch.equal(guided, model.generate(3, labels, generator=torch.Generator().manual_seed(7)))


def test_label_dropout_maps_to_null_class_only_in_training():
    model = tiny(class_dropout=0.5)
    labels = torch.randint(0, N_CLASSES, (4000,), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    dropped = model.drop_labels(labels)
    changed = dropped != labels
    assert (dropped[changed] == model.null_class).all()
    assert 0.45 < changed.float().mean().item() < 0.55
    model.eval()
    assert torch.equal(model.drop_labels(labels), labels)

    # through forward: with class_dropout 1 every training-mode label is the null class; eval keeps the labels
    model = tiny(class_dropout=1.0)
    idx = torch.randint(0, VOCAB, (3, 5))
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        eval_null, eval_labels = model(idx, null)[0], model(idx, labels)[0]
        model.train()
        train_labels = model(idx, labels)[0]
        model.eval()
    torch.testing.assert_close(train_labels, eval_null, rtol=0, atol=0)
    assert not torch.allclose(eval_labels, eval_null)
    # generate leaves the mode as it found it and never drops labels while sampling
    model.train()
    a = model.generate(3, labels, temperature=0)
    assert model.training
    assert torch.equal(a, model.eval().generate(3, labels, temperature=0))


def test_tiny_model_overfits_a_small_token_set():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, grid=(4, 4), n_layer=2, n_head=4, n_embd=64, n_classes=8, class_dropout=0.0)
    model = GPT(cfg)
    data = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8)  # one class per sequence: the whole sequence is then determined, loss can reach 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(250):
        _, loss = model(data[:, :-1], labels, targets=data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.02, loss.item()
    assert torch.equal(model.generate(8, labels, temperature=0), data)


def test_top_k_one_is_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (0.5, 1.0, 3.0):
        got = sample_logits(logits, temperature=temperature, top_k=1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(dim=-1))
    kept = filter_logits(logits, top_k=5).isfinite()
    assert (kept.sum(dim=-1) == 5).all()
    assert torch.equal(kept, logits >= logits.topk(5, dim=-1).values[:, -1:])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    for p, expect in ((0.3, [1]), (0.7, [1, 3]), (0.8, [1, 2, 3]), (0.95, [0, 1, 2, 3])):
        kept = filter_logits(logits, top_p=p).isfinite()[0].nonzero().flatten().tolist()
        assert kept == expect, (p, kept)
    # against brute force on random distributions: the k most likely tokens with the least k whose mass >= p
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 30, generator=gen) * 2
    p = torch.rand(200, generator=gen).tolist()
    for row, p_row in zip(logits, p):
        sorted_probs = row.softmax(-1).sort(descending=True).values.double()
        k = int((sorted_probs.cumsum(0) < p_row).sum()) + 1
        kept = filter_logits(row[None], top_p=p_row).isfinite()[0]
        assert torch.equal(kept, row >= row.sort(descending=True).values[k - 1])
    # filtered tokens are never sampled
    draws = sample_logits(logits, top_p=0.5, generator=gen)
    assert filter_logits(logits, top_p=0.5).gather(1, draws[:, None]).isfinite().all()


def test_sampling_is_reproducible_from_the_generator():
    model = tiny()
    labels = torch.tensor([1, 2])
    run = lambda seed: model.generate(2, labels, top_k=10, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


def test_rope2d_scores_depend_on_the_2d_offset():
    cfg = GPTConfig(vocab_size=VOCAB, grid=GRID, n_layer=1, n_head=1, n_embd=16)
    rope = Rope2D(cfg)
    q = torch.randn(1, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 1, 1, 16, generator=torch.Generator().manual_seed(1))
    w = GRID[1]

    def score(token_q: int, token_k: int) -> float:  # token i is sequence position i + 1; -1 is the prefix
        rq, _ = rope(q, q, torch.tensor([token_q + 1]))
        _, rk = rope(k, k, torch.tensor([token_k + 1]))
        return (rq * rk).sum().item()

    def token(row: int, col: int) -> int:
        return row * w + col

    # same (drow, dcol) offset, across a line break or not: same score
    assert math.isclose(score(token(1, 2), token(0, 1)), score(token(2, 1), token(1, 0)), rel_tol=1e-5)
    # same raster distance (5) but a different 2D offset: a different score
    assert not math.isclose(score(token(1, 2), token(0, 1)), score(token(2, 0), token(0, 3)), rel_tol=1e-3)
    # the prefix sits at (-1, w - 1): one row above the last column of row 0
    assert math.isclose(score(token(0, w - 1), -1), score(token(1, 0), token(0, 0)), rel_tol=1e-5)


def test_bf16_autocast_sampling_uses_matching_cache_dtype():
    model = tiny()
    labels = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_kv_caches(2)[0].k.dtype == torch.bfloat16
        tokens = model.generate(2, labels, temperature=0, cfg_scale=2.0)
    assert tokens.shape == (2, model.config.block_size)


def test_params_flops_and_tied_head():
    untied, tied = tiny(pos="learned"), tiny(pos="learned", tie_head=True)
    assert tied.head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == VOCAB * 16
    cfg = untied.config
    matmul = sum(p.numel() for p in untied.blocks.parameters()) + sum(
        p.numel() for p in untied.norm_f.parameters()) + untied.head.weight.numel()
    assert untied.num_params(exclude_embeddings=True) == matmul
    assert tied.num_params(exclude_embeddings=True) == matmul  # the tied table is the head, a matmul
    assert untied.flops_per_token() == 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    # nanoGPT init: N(0, 0.02) for linears and embeddings, residual projections 0.02 / sqrt(2 * n_layer) = 0.01 here
    for table in (untied.blocks[0].mlp.fc.weight, untied.blocks[1].attn.qkv.weight, untied.wte.weight,
                  untied.wpe.weight, untied.prefix.weight, untied.head.weight):
        assert abs(table.std().item() - 0.02) < 0.003 and abs(table.mean().item()) < 0.003
    for block in untied.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert abs(proj.weight.std().item() - 0.01) < 0.002 and abs(proj.weight.mean().item()) < 0.002


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_layout_is_the_checkpoint_format(bias):
    """The state dict's names and shapes are what checkpoints hold: biases exactly where `bias` says (the head never
    has one), SwiGLU's hidden width 2/3 of 4C rounded up to 64, no rotary tables (derived, not saved), one prefix row
    per class plus the null class."""
    model = tiny(n_embd=32, n_layer=1, bias=bias, norm="layernorm", pos="rope2d")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    norms = ["blocks.0.norm1", "blocks.0.norm2", "norm_f"]
    want = {"wte.weight": (VOCAB, 32), "prefix.weight": (N_CLASSES + 1, 32), "head.weight": (VOCAB, 32),
            "blocks.0.attn.qkv.weight": (96, 32), "blocks.0.attn.proj.weight": (32, 32),
            "blocks.0.mlp.fc.weight": (2 * 128, 32), "blocks.0.mlp.proj.weight": (32, 128),
            **{f"{n}.weight": (32,) for n in norms}}
    if bias:
        want.update({f"{n}.bias": (shapes[f"{n}.weight"][0],) for n in linears + norms})
    assert shapes == want
    assert tuple(tiny(n_classes=0).prefix.weight.shape) == (1, 16)
    assert all(b.attn.dropout == 0.25 for b in tiny(dropout=0.25).blocks)  # attention dropout is the config's too
    for n_embd, hidden in ((32, 128), (96, 256), (97, 320), (100, 320), (192, 512)):  # 64 * ceil(8 C / 3 / 64)
        assert tiny(n_embd=n_embd, n_head=1, pos="learned").blocks[0].mlp.proj.in_features == hidden
    gelu = tiny(mlp="gelu", bias=bias, pos="learned")
    assert {k for k in gelu.state_dict() if k.startswith("blocks.0.mlp")} == (
        {"blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"} | ({"blocks.0.mlp.fc.bias", "blocks.0.mlp.proj.bias"}
                                                                  if bias else set()))


def test_precision_sensitive_steps_run_in_at_least_float32():
    from models.gpt import at_least_f32

    assert at_least_f32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_f32(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    # a float32 rotation is float32 arithmetic exactly (the float64 tables rounded first, not the products)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    c, s = cos.float(), sin.float()
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(Rope2D._rotate(x, cos, sin), torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1))


def test_config_and_label_validation():
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    for kw, message in ((dict(norm="batchnorm"), "norm must be one of ('rmsnorm', 'layernorm'), got 'batchnorm'"),
                        (dict(mlp="relu"), "mlp must be one of ('swiglu', 'gelu'), got 'relu'"),
                        (dict(pos="sinusoid"), "pos must be one of ('learned', 'rope2d'), got 'sinusoid'"),
                        (dict(grid=(2, 2, 2)), "grid must be (h, w) with h, w >= 1, got (2, 2, 2)"),
                        (dict(grid=(0, 4)), "grid must be (h, w) with h, w >= 1, got (0, 4)"),
                        (dict(n_embd=30, n_head=4), "n_embd 30 is not divisible by n_head 4"),
                        (dict(vocab_size=0), "vocab_size must be >= 1 and n_classes >= 0"),
                        (dict(n_classes=-1), "vocab_size must be >= 1 and n_classes >= 0"),
                        (dict(class_dropout=1.5), "class_dropout must be in [0, 1] and dropout in [0, 1)"),
                        (dict(dropout=1.0), "class_dropout must be in [0, 1] and dropout in [0, 1)")):
        with pytest.raises(ValueError) as err:
            GPTConfig(**kw)
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"rope2d needs a head dim divisible by 4 \(two rotated halves of pairs\), "
                                         r"got 6$"):
        GPTConfig(n_embd=12, n_head=2, pos="rope2d")
    # the boundaries are allowed
    GPTConfig(grid=(1, 4), vocab_size=1, class_dropout=1.0, dropout=0.0, pos="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        GPTConfig(n_embd=12, n_head=2, pos="rope2d")
    assert GPTConfig(grid=[2, 3]).block_size == 6
    idx = torch.randint(0, VOCAB, (2, 3))
    with pytest.raises(ValueError, match=r"^this GPT is unconditional \(n_classes = 0\) but got labels$"):
        tiny(n_classes=0)(idx, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^labels must have shape \(2,\), got \(3,\)$"):
        tiny()(idx, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^sequence of 13 positions exceeds the block size 12 \(prefix \+ h\*w - 1"):
        tiny()(torch.zeros(2, 12, dtype=torch.long), torch.tensor([0, 1]))
    assert tiny()(idx, torch.tensor([0, 1]))[1] is None  # no targets, no loss
    with pytest.raises(ValueError, match="class-conditional"):
        tiny()(idx)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny(n_classes=0).generate(2, cfg_scale=2.0)


# ---------------------------------------------------------------- an independent reference forward

def reference_logits(model: GPT, idx: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The GPT from its docstrings in float64: [prefix, tokens] embedded (+ the learned positions), the causal
    reference stack (tests/helpers.py), the head."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    prefix_ids = labels if cfg.n_classes else torch.zeros(idx.shape[0], dtype=torch.long)
    x = torch.cat([w["prefix.weight"][prefix_ids][:, None], w["wte.weight"][idx]], dim=1)
    if cfg.pos == "learned":
        x = x + w["wpe.weight"][:x.shape[1]]
    return reference_stack(model, x, causal=True) @ w["head.weight"].T


@pytest.mark.parametrize("norm,mlp,pos,n_classes", ALL_OPTIONS)
def test_forward_equals_the_reference_written_from_the_docstrings(norm, mlp, pos, n_classes):
    model = tiny(norm=norm, mlp=mlp, pos=pos, n_classes=n_classes, n_embd=32, n_layer=3, bias=norm == "layernorm",
                 seed=3)
    with torch.no_grad():  # init leaves norm weights at 1 and biases at 0: give every parameter a value of its own
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    model = model.double()
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, VOCAB, (2, GRID[0] * GRID[1] - 1), generator=gen)
    labels = torch.tensor([4, 1]) if n_classes else None
    logits, _ = model(idx, labels)
    want = reference_logits(model, idx, labels)
    assert logits.shape == want.shape == (2, GRID[0] * GRID[1], VOCAB)
    assert torch.allclose(logits, want, rtol=1e-9, atol=1e-9), (logits - want).abs().max()


def test_loss_is_the_mean_cross_entropy_over_targets_that_are_not_minus_one():
    model = tiny().double()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (3, GRID[0] * GRID[1]), generator=gen)
    labels = torch.tensor([0, 1, 2])
    targets = tokens.clone()
    targets[0, :4] = -1  # e.g. padding: not counted
    logits, loss = model(tokens[:, :-1], labels, targets)
    logp = logits.log_softmax(-1)
    keep = targets != -1
    want = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)


def test_sampling_draws_from_the_tempered_filtered_softmax_exactly():
    """The draw is torch.multinomial over softmax(filter(logits / temperature)) with the caller's generator: the same
    seed gives the same tokens as that formula, so temperature, top-k and top-p enter exactly as written."""
    logits = torch.randn(500, 12, generator=torch.Generator().manual_seed(6)) * 2
    for temperature, top_k, top_p in ((2.0, None, None), (0.5, None, None), (1.5, 6, None), (0.7, None, 0.8),
                                      (1.3, 8, 0.9)):
        got = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=torch.Generator().manual_seed(7))
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7))[:, 0]
        assert torch.equal(got, want), (temperature, top_k, top_p)
    hot = sample_logits(logits, temperature=2.0, generator=torch.Generator().manual_seed(7))
    cold = sample_logits(logits, temperature=0.5, generator=torch.Generator().manual_seed(7))
    # a higher temperature flattens the distribution: fewer draws land on the argmax
    assert (hot == logits.argmax(-1)).sum() < (cold == logits.argmax(-1)).sum()


def test_filter_logits_works_on_any_leading_dims():
    logits = torch.randn(3, 5, 9, generator=torch.Generator().manual_seed(8))
    for top_k, top_p in ((4, None), (None, 0.6), (7, 0.8)):
        rows = torch.stack([filter_logits(b, top_k, top_p) for b in logits])
        assert torch.equal(filter_logits(logits, top_k, top_p), rows), (top_k, top_p)


def test_top_p_boundary_keeps_the_token_that_reaches_p_and_no_more():
    # four equal logits: probabilities are exactly 1/4, cumulative masses before each token exactly 0, 1/4, 1/2, 3/4
    for p, n in ((0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)):
        assert int(filter_logits(torch.zeros(1, 4), top_p=p).isfinite().sum()) == n, p
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        filter_logits(torch.zeros(1, 4), top_p=0)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        filter_logits(torch.zeros(1, 4), top_k=0)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        sample_logits(torch.zeros(1, 4), temperature=-1)
    # top_k larger than the vocabulary keeps everything
    assert bool(filter_logits(torch.randn(2, 4), top_k=10).isfinite().all())


def test_label_dropout_follows_the_generator_and_spares_a_single_class_model():
    model = tiny(class_dropout=0.5).train()
    labels = torch.arange(200) % N_CLASSES
    a = model.drop_labels(labels, torch.Generator().manual_seed(1))
    b = model.drop_labels(labels, torch.Generator().manual_seed(1))
    c = model.drop_labels(labels, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 60 < int((a == N_CLASSES).sum()) < 140  # about half become the null class
    one = tiny(n_classes=1, class_dropout=1.0).train()
    assert bool((one.drop_labels(torch.zeros(8, dtype=torch.long)) == 1).all())  # the null class of a 1-class model
