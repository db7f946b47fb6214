"""MaskGIT (models/maskgit.py): schedules, the masked-only loss, bidirectional attention, iterative decoding, CFG."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import reference_stack
from models.gpt import GPTConfig
from models.maskgit import (MaskGIT, MaskGITConfig, cosine_schedule, decode_schedule, gumbel_noise, maskgit_config,
                            masked_loss, n_masked, random_mask)

GRID = (3, 4)  # not square, so rows and columns cannot be confused
N = GRID[0] * GRID[1]
VOCAB = 16
N_CLASSES = 5


def tiny(**kw) -> MaskGIT:
    """A 2-layer model small enough that every test runs in well under a second on one thread."""
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(vocab_size=VOCAB, grid=GRID, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_classes=N_CLASSES,
               class_dropout=0.0)
    cfg.update(kw)
    return MaskGIT(MaskGITConfig(**cfg)).eval()


def sharpened(model: MaskGIT) -> MaskGIT:
    """At init (std 0.02) the logits are nearly uniform and the class barely reaches the tokens, so near-ties would
    decide argmaxes and orderings. Unit-variance weights (embeddings N(0, 1), linears N(0, 1/fan_in)) make a random
    function of the grid and the class whose logits are well apart."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(generator=gen)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=module.in_features ** -0.5, generator=gen)
    return model


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- schedules ---------------------------------------------------------------------------------------------------

def test_cosine_schedule_endpoints_and_monotonicity():
    assert cosine_schedule(torch.tensor(0.0)).item() == 1.0  # everything masked at the start
    assert cosine_schedule(torch.tensor(1.0)).item() == 0.0  # nothing at the end
    r = torch.linspace(0, 1, 101)
    ratio = cosine_schedule(r)
    assert (ratio[1:] < ratio[:-1]).all(), "strictly decreasing"
    torch.testing.assert_close(cosine_schedule(torch.tensor(0.5)), torch.tensor(math.sqrt(0.5)))
    # concave: below the linear schedule 1 - r nowhere, above it inside (few tokens decided early)
    assert (ratio[1:-1] > 1 - r[1:-1]).all()

    # training counts: all masked at u = 0, one (never zero) as u -> 1, non-increasing, always within [1, N]
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.999, 1 - 2 ** -24])
    counts = n_masked(u, N)
    assert counts[0] == N and counts[-1] == 1 and counts[-2] == 1
    assert counts.tolist() == [math.ceil(math.cos(math.pi / 2 * x) * N) or 1 for x in u.double().tolist()]
    dense = n_masked(torch.linspace(0, 0.9999, 1000), N)
    assert (dense[1:] <= dense[:-1]).all() and dense.min() == 1 and dense.max() == N


def test_random_mask_counts_follow_the_schedule_and_positions_are_uniform():
    B = 4000
    mask = random_mask(B, N, generator=seeded(3))
    # u is the generator's first draw, one per row
    assert torch.equal(mask.sum(dim=1), n_masked(torch.rand(B, generator=seeded(3)), N))
    # which positions are masked is uniform: every position near the mean masked fraction (binomial std ~0.007)
    per_position = mask.float().mean(dim=0)
    assert (per_position - per_position.mean()).abs().max() < 0.035, per_position
    # E[cos(pi/2 u)] = 2/pi; ceil adds up to one token
    assert 2 / math.pi < per_position.mean().item() < 2 / math.pi + 1 / N


def test_decode_schedule_values_clamps_and_float64():
    assert decode_schedule(16, 4) == [14, 11, 6, 0]  # floor(16 cos(pi/2 k/4)), k = 1..3, then all decided
    assert decode_schedule(256, 8) == [251, 236, 212, 181, 142, 97, 49, 0]
    assert decode_schedule(7, 1) == [0]
    # cos(pi/3) = 0.5 exactly in the math; float32 gives 0.49999997 and would floor 8 to 7
    assert decode_schedule(16, 3) == [13, 8, 0]
    # more steps than the schedule can use: each step decides at least one token while more than one is left, then
    # the last one waits for the final step
    assert decode_schedule(4, 8) == [3, 2, 1, 1, 1, 1, 1, 0]
    for n_tokens, steps in itertools.product((1, 5, 64, 256), (1, 2, 4, 8, 12, 16, 300)):
        sched = decode_schedule(n_tokens, steps)
        assert len(sched) == steps and sched[-1] == 0
        before = [n_tokens] + sched[:-1]
        assert all(b > a or b == a == 1 for b, a in zip(before, sched)), (n_tokens, steps, sched)
    with pytest.raises(ValueError, match="steps"):
        decode_schedule(16, 0)


# --- the loss ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
def test_masked_loss_ignores_unmasked_positions(label_smoothing):
    gen = seeded(0)
    logits = torch.randn(3, N, VOCAB, generator=gen)
    targets = torch.randint(0, VOCAB, (3, N), generator=gen)
    mask = torch.rand(3, N, generator=gen) < 0.5
    mask[:, 0], mask[:, 1] = True, False  # at least one masked and one visible position per row
    loss, acc = masked_loss(logits, targets, mask, label_smoothing)
    # the definition, written out: mean over masked positions of the (smoothed) cross-entropy
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    per_token = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    torch.testing.assert_close(loss, per_token[mask].mean())
    torch.testing.assert_close(acc, (logits.argmax(-1) == targets)[mask].float().mean())

    # anything at visible positions: same loss and accuracy, bit for bit
    other_logits = torch.where(mask[..., None], logits, torch.randn(logits.shape, generator=gen) * 10)
    other_targets = torch.where(mask, targets, (targets + 7) % VOCAB)
    assert torch.equal(torch.stack(masked_loss(other_logits, other_targets, mask, label_smoothing)),
                       torch.stack([loss, acc]))
    # a change at one masked position shows
    changed_logits = logits.clone()
    changed_logits[0, 0] += torch.randn(VOCAB, generator=gen)
    assert masked_loss(changed_logits, targets, mask, label_smoothing)[0] != loss
    changed_targets = targets.clone()
    changed_targets[0, 0] = (targets[0, 0] + 1) % VOCAB
    assert masked_loss(logits, changed_targets, mask, label_smoothing)[0] != loss


def test_loss_masks_with_the_generator_and_predicts_from_the_rest():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (6, N), generator=seeded(1))
    labels = torch.arange(6) % N_CLASSES
    loss, acc = model.loss(tokens, labels, seeded(4), label_smoothing=0.1)
    mask = random_mask(6, N, generator=seeded(4))
    with torch.no_grad():
        logits = model(tokens.masked_fill(mask, model.mask_id), labels)
    expect = masked_loss(logits, tokens, mask, 0.1)
    torch.testing.assert_close(loss.detach(), expect[0], rtol=0, atol=0)
    torch.testing.assert_close(acc, expect[1], rtol=0, atol=0)
    loss.backward()  # it trains: gradients reach the token embedding, [MASK] row included
    assert model.wte.weight.grad[model.mask_id].abs().sum() > 0
    # the same seed, the same mask and loss; another seed, another mask
    assert model.loss(tokens, labels, seeded(4))[0] == model.loss(tokens, labels, seeded(4))[0]
    assert model.loss(tokens, labels, seeded(4))[0] != model.loss(tokens, labels, seeded(5))[0]


def test_label_dropout_in_the_loss_uses_the_null_class_in_training_only():
    model = tiny(class_dropout=1.0)
    tokens = torch.randint(0, VOCAB, (4, N), generator=seeded(1))
    labels = torch.tensor([0, 1, 2, 3])
    null = torch.full_like(labels, model.null_class)
    eval_null, eval_labels = model.loss(tokens, null, seeded(2))[0], model.loss(tokens, labels, seeded(2))[0]
    model.train()
    train_labels = model.loss(tokens, labels, seeded(2))[0]
    assert train_labels == eval_null and eval_labels != eval_null


def test_tiny_model_learns_a_small_token_set():
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(vocab_size=32, grid=(4, 4), n_layer=2, n_head=4, n_embd=64, n_classes=8,
                                  class_dropout=0.0))
    data = torch.randint(0, 32, (8, 16), generator=seeded(3))
    labels = torch.arange(8)  # one class per grid: the label alone determines every token
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = seeded(0)
    model.train()
    for _ in range(250):
        loss, _ = model.loss(data, labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    assert torch.equal(model.generate(8, labels, steps=4, temperature=0), data)
    assert torch.equal(model.generate(8, labels, steps=8, generator=seeded(1)), data)


# --- the model ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos,n_classes", list(itertools.product(("learned", "rope2d"), (0, N_CLASSES))))
def test_every_position_sees_every_other(pos, n_classes):
    model = tiny(pos=pos, n_classes=n_classes)
    idx = torch.randint(0, VOCAB + 1, (2, N), generator=seeded(1))  # codes and [MASK]s
    labels = torch.tensor([1, 3]) if n_classes else None
    with torch.no_grad():
        base = model(idx, labels)
        assert base.shape == (2, N, VOCAB)
        for j in (0, 5, N - 1):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1) % (VOCAB + 1)
            diff = (model(changed, labels) - base).abs().amax(dim=(0, 2))
            assert (diff > 0).all(), f"token {j} must reach every position, earlier ones included: {diff}"
        if n_classes:
            assert (model(idx, (labels + 1) % n_classes) - base).abs().amax(dim=(0, 2)).gt(0).all()


@pytest.mark.parametrize("norm,mlp,pos,n_classes,tie_head", [
    ("rmsnorm", "swiglu", "rope2d", N_CLASSES, False), ("layernorm", "gelu", "learned", 0, True),
    ("rmsnorm", "gelu", "learned", N_CLASSES, True), ("layernorm", "swiglu", "rope2d", 0, False)])
def test_forward_equals_the_reference_written_from_the_docstrings(norm, mlp, pos, n_classes, tie_head):
    """[prefix, codes or MASK] embedded (+ the learned positions), bidirectional blocks, the final norm on the grid
    positions, then the head or the code rows of the token embedding (tied): float64, exact to rounding."""
    model = tiny(norm=norm, mlp=mlp, pos=pos, n_classes=n_classes, tie_head=tie_head, n_embd=32, n_layer=3,
                 bias=norm == "layernorm", seed=3)
    with torch.no_grad():  # init leaves norm weights at 1 and biases at 0: give every parameter a value of its own
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    model = model.double()
    idx = torch.randint(0, VOCAB + 1, (2, N), generator=seeded(4))  # codes and [MASK]s
    labels = torch.tensor([4, 1]) if n_classes else None
    w = {k: v.double() for k, v in model.state_dict().items()}
    prefix_ids = labels if n_classes else torch.zeros(2, dtype=torch.long)
    x = torch.cat([w["prefix.weight"][prefix_ids][:, None], w["wte.weight"][idx]], dim=1)
    if pos == "learned":
        x = x + w["wpe.weight"]
    head = w["wte.weight"][:VOCAB] if tie_head else w["head.weight"]
    want = reference_stack(model, x, causal=False)[:, 1:] @ head.T
    with torch.no_grad():
        got = model(idx, labels)
    assert got.shape == want.shape == (2, N, VOCAB)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (got - want).abs().max()


def test_loss_draws_masks_then_label_dropout_from_one_generator():
    model = tiny(class_dropout=0.5).train()
    tokens = torch.randint(0, VOCAB, (64, N), generator=seeded(2))
    labels = torch.arange(64) % N_CLASSES
    # reproducible from the generator alone: the dropped labels come from it too, not from torch's global generator
    a = model.loss(tokens, labels, seeded(3))
    torch.rand(5)  # move the global generator on
    assert all(torch.equal(x, y) for x, y in zip(a, model.loss(tokens, labels, seeded(3))))
    # label_smoothing defaults to none: the plain cross-entropy
    logits = torch.randn(2, N, VOCAB, generator=seeded(5))
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, :3] = True
    want = torch.nn.functional.cross_entropy(logits[mask], tokens[:2][mask])
    assert float(masked_loss(logits, tokens[:2], mask)[0]) == pytest.approx(float(want), rel=1e-6)


def test_config_sizes_and_tied_head():
    cfg = MaskGITConfig(vocab_size=VOCAB, grid=GRID)
    assert cfg.n_tokens == N and cfg.block_size == N + 1 and cfg.mask_id == VOCAB
    with pytest.raises(TypeError, match=r"MaskGIT needs a MaskGITConfig \(block_size = h\*w \+ 1\), got GPTConfig"):
        MaskGIT(GPTConfig(vocab_size=VOCAB, grid=GRID))
    # the prefix table: one row per class plus the null class, or the single start row (the checkpoint format)
    assert tiny().prefix.weight.shape == (N_CLASSES + 1, 16) and tiny(n_classes=0).prefix.weight.shape == (1, 16)
    with pytest.raises(ValueError, match="norm"):
        MaskGITConfig(norm="batchnorm")  # GPTConfig's validation applies
    big = maskgit_config("maskgit-B", vocab_size=1024, grid=(16, 16))
    assert (big.n_layer, big.n_head, big.n_embd, big.vocab_size) == (24, 16, 768, 1024)
    with pytest.raises(ValueError, match="unknown MaskGIT size"):
        maskgit_config("maskgit-XXL")
    untied, tied = tiny(), tiny(tie_head=True)
    assert untied.wte.weight.shape == (VOCAB + 1, 16)  # one row for [MASK]
    assert untied.num_params() - tied.num_params() == VOCAB * 16
    idx = torch.randint(0, VOCAB, (2, N))
    assert tied.head is None  # logits from the code rows of the token embedding
    with torch.no_grad():
        logits = tied(idx, torch.tensor([0, 1]))
    assert logits.shape == (2, N, VOCAB)
    with pytest.raises(ValueError, match="tokens per grid"):
        untied(idx[:, :-1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        untied(idx)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        tiny(n_classes=0).generate(2, cfg_scale=2.0)


# --- decoding ----------------------------------------------------------------------------------------------------

def all_masked(model: MaskGIT, n: int) -> torch.Tensor:
    return torch.full((n, N), model.mask_id, dtype=torch.long)


def test_one_step_from_all_masked_is_the_argmax():
    model = sharpened(tiny())
    labels = torch.tensor([0, 3, 4, 1])
    with torch.no_grad():
        cond = model(all_masked(model, 4), labels)
        uncond = model(all_masked(model, 4), torch.full_like(labels, model.null_class))
    assert torch.equal(model.generate(4, labels, steps=1, temperature=0), cond.argmax(-1))
    # the same step under guidance: argmax of uncond + s * (cond - uncond)
    guided = model.generate(4, labels, steps=1, temperature=0, cfg_scale=3.0)
    assert torch.equal(guided, (uncond + 3.0 * (cond - uncond)).argmax(-1))
    assert not torch.equal(guided, cond.argmax(-1))


@pytest.mark.parametrize("steps", (1, 2, 8, 12, 16, 40))
def test_decoded_grid_has_no_mask_left(steps):
    model = tiny()
    labels = torch.tensor([0, 1, 2])
    for kw in ({}, {"temperature": 0.0}, {"top_k": 3, "cfg_scale": 2.0}, {"top_p": 0.5, "choice_temperature": 0.0}):
        out = model.generate(3, labels, steps=steps, generator=seeded(0), **kw)
        assert out.shape == (3, N) and out.dtype == torch.long
        assert ((out >= 0) & (out < VOCAB)).all(), (kw, out)


def record_inputs(model: MaskGIT, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `run()` and return its result with the token grid that went into every forward."""
    seen: list[torch.Tensor] = []
    hook = model.wte.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        return run(), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("steps", (4, 8, 16))
def test_tokens_fixed_after_each_step_follow_the_schedule(steps):
    model = tiny()
    labels = torch.tensor([2, 0, 4])
    out, seen = record_inputs(model, lambda: model.generate(3, labels, steps=steps, generator=seeded(1)))
    assert len(seen) == steps
    still_masked = [(grid == model.mask_id).sum(dim=1) for grid in seen]
    expect = [N] + decode_schedule(N, steps)[:-1]
    for t, (got, want) in enumerate(zip(still_masked, expect)):
        assert (got == want).all(), (t, got, want)
    # a decided token is never revisited, and the output keeps every one of them
    for before, after in zip(seen + [out], seen[1:] + [out]):
        known = before != model.mask_id
        assert torch.equal(after[known], before[known])


def test_each_step_keeps_the_most_confident_predictions():
    """Without Gumbel noise (choice_temperature 0) and with greedy codes, step 0 keeps exactly the positions whose
    argmax probability is highest and masks the rest again; keeping the least confident would fail."""
    model = sharpened(tiny())
    labels = torch.tensor([1, 2])
    steps = 4
    _, seen = record_inputs(model, lambda: model.generate(2, labels, steps=steps, temperature=0,
                                                          choice_temperature=0.0))
    with torch.no_grad():
        probs = model(all_masked(model, 2), labels).softmax(-1)
    confidence, best = probs.max(-1)
    n_keep = N - decode_schedule(N, steps)[0]
    for row in range(2):
        kept = (seen[1][row] != model.mask_id).nonzero().flatten()
        top = confidence[row].topk(n_keep).indices
        assert set(kept.tolist()) == set(top.tolist())
        assert torch.equal(seen[1][row, kept], best[row, kept])
    # with noise on the confidences the choice is no longer the plain top-k for every seed
    picks = set()
    for seed in range(8):
        _, seen = record_inputs(model, lambda: model.generate(2, labels, steps=steps, temperature=0,
                                                              choice_temperature=20.0, generator=seeded(seed)))
        picks.add(tuple((seen[1][0] != model.mask_id).tolist()))
    assert len(picks) > 1


def test_the_gumbel_noise_on_confidences_is_scaled_by_the_steps_left():
    """Step t adds choice_temperature * (1 - (t+1)/T) Gumbel noise: at T = 2 step 0 uses half the temperature (one
    step late it would be the whole). Greedy codes draw nothing, so the noise is the generator's first draw and
    step 0's kept positions can be rebuilt by hand."""
    model = sharpened(tiny())
    labels = torch.tensor([1, 2, 0])
    steps, c = 2, 3.0
    _, seen = record_inputs(model, lambda: model.generate(3, labels, steps=steps, temperature=0,
                                                          choice_temperature=c, generator=seeded(4)))
    with torch.no_grad():
        confidence = model(all_masked(model, 3), labels).float().log_softmax(-1).max(-1).values
    noise = gumbel_noise((3, N), seeded(4), torch.device("cpu"))
    remasked = decode_schedule(N, steps)[0]

    def kept(scale: float) -> torch.Tensor:
        masked = (confidence + scale * noise).topk(remasked, dim=1, largest=False).indices
        return torch.ones(3, N, dtype=torch.bool).scatter(1, masked, False)

    assert torch.equal(seen[1] != model.mask_id, kept(c * 0.5))
    assert not torch.equal(kept(c * 0.5), kept(c))  # the inputs tell the two schedules apart


def test_cfg_scale_zero_is_the_unconditional_path_and_one_skips_it():
    model = sharpened(tiny())
    labels = torch.tensor([2, 0, 4])
    null = torch.full_like(labels, model.null_class)
    kw = dict(steps=6, top_k=8)
    zero = model.generate(3, labels, cfg_scale=0.0, generator=seeded(7), **kw)
    assert torch.equal(zero, model.generate(3, null, generator=seeded(7), **kw))
    assert not torch.equal(zero, model.generate(3, labels, generator=seeded(7), **kw))
    # at scale 1 only the conditional rows run
    _, seen = record_inputs(model, lambda: model.generate(3, labels, generator=seeded(7), **kw))
    assert {grid.shape[0] for grid in seen} == {3}
    _, seen = record_inputs(model, lambda: model.generate(3, labels, cfg_scale=2.0, generator=seeded(7), **kw))
    assert {grid.shape[0] for grid in seen} == {6}


def test_sampling_is_reproducible_from_the_generator_and_restores_the_mode():
    model = tiny()
    labels = torch.tensor([1, 2])
    run = lambda seed: model.generate(2, labels, cfg_scale=1.5, generator=seeded(seed))  # noqa: E731
    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))
    model.train()
    a = model.generate(2, labels, temperature=0, generator=seeded(3))
    assert model.training
    assert torch.equal(a, model.eval().generate(2, labels, temperature=0, generator=seeded(3)))


def test_bf16_autocast_generation():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(2, torch.tensor([0, 1]), steps=4, cfg_scale=2.0, generator=seeded(0))
        loss, _ = model.loss(torch.randint(0, VOCAB, (2, N)), torch.tensor([0, 1]), seeded(0))
    assert out.shape == (2, N) and (out < VOCAB).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
