"""Behaviour of models/quantizer.py that a wrong variant would change.

First the EMA codebook update against a float64 reference of the formula, with a decay that is not 0.5 (at 0.5,
decay and 1 - decay are the same number and a swap goes unnoticed), over several steps and with both codes in use,
so the running sums, the counts and the Laplace smoothing all matter. Then the tests written from the survivors of
the mutation run (docs/mutation.md): inputs chosen so that each surviving mutant gives a different answer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.quantizer import VectorQuantizer


def reference_ema(codebook: torch.Tensor, batches: list[torch.Tensor], decay: float, eps: float) -> torch.Tensor:
    """cluster_size <- decay * size + (1 - decay) * counts; embed_sum <- decay * sum + (1 - decay) * sum of the
    assigned vectors; code = embed_sum / Laplace-smoothed size. Starts from size 1, embed_sum = code."""
    codes = codebook.double().clone()
    size = torch.ones(len(codes), dtype=torch.float64)
    embed = codes.clone()
    for z in batches:
        z = z.double()
        assign = torch.cdist(z, codes).argmin(1)
        counts = torch.bincount(assign, minlength=len(codes)).double()
        sums = torch.zeros_like(codes).index_add_(0, assign, z)
        size = decay * size + (1 - decay) * counts
        embed = decay * embed + (1 - decay) * sums
        n = size.sum()
        codes = embed / ((size + eps) / (n + len(codes) * eps) * n)[:, None]
    return codes


@pytest.mark.parametrize("decay", [0.8, 0.95])
def test_ema_codebook_follows_the_formula(decay):
    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    start = torch.tensor([[0.0, 0.0], [4.0, 4.0], [-4.0, 4.0]])
    vq = VectorQuantizer(n_codes=3, code_dim=2, ema=True, ema_decay=decay, ema_eps=eps).train()
    vq.codebook.copy_(start)
    vq.ema_embed_sum.copy_(start)
    # two clusters of different sizes around the first two codes (the third stays unused), three steps
    batches = []
    for _ in range(3):
        a = torch.tensor([1.0, 0.5]) + 0.3 * torch.randn(5, 2, generator=gen)
        b = torch.tensor([3.0, 3.5]) + 0.3 * torch.randn(2, 2, generator=gen)
        batches.append(torch.cat([a, b]))
    for z in batches:
        vq(z.t().reshape(1, 2, 7, 1))  # [B=1, D=2, h=7, w=1]: one vector per row of z
    expected = reference_ema(start, batches, decay, eps)
    # float32 arithmetic on values of size ~4 over three steps: rounding stays far below 1e-5
    assert torch.allclose(vq.codebook.double(), expected, rtol=0, atol=1e-5)
    # decay != 0.5 makes the two orders of the update differ by far more than that
    swapped = reference_ema(start, batches, 1 - decay, eps)
    assert (swapped - expected).abs().max() > 0.05


def test_codebook_fingerprint_is_the_documented_hash():
    """sha256 of the codebook as little-endian float32 bytes, then the config as compact, sorted, ASCII JSON.
    Stores record this value: another byte layout would make every existing token store look foreign. A float64
    codebook and a non-ASCII config value check the conversions."""
    import hashlib

    from models.quantizer import fingerprint_codebook
    codebook = torch.tensor([[0.1, -2.5], [3.0, 1e-3]], dtype=torch.float64)
    config = {"n_codes": 2, "name": "caf\u00e9", "dims": [2, 4]}
    h = hashlib.sha256(np.array([[0.1, -2.5], [3.0, 1e-3]], dtype="<f4").tobytes())
    h.update(b'{"dims":[2,4],"n_codes":2,"name":"caf\\u00e9"}')
    assert fingerprint_codebook(codebook, config) == h.hexdigest()
    vq = VectorQuantizer(n_codes=2, code_dim=2)
    vq.codebook.data.copy_(codebook)
    assert vq.codebook_fingerprint(config) == h.hexdigest()


# ---------------------------------------------------------------- written from the mutation run's survivors
# (docs/mutation.md, "models/quantizer.py"): each test below names the wrong variants it tells apart.

def test_nearest_code_of_a_row_does_not_depend_on_the_rest_of_the_batch():
    """A token must not change with the images it is batched with. Alone, (0.25, 0) is nearest to (0.375, 0)
    (distances 1/16 and 1/64, exact in float32); a far row in the same batch must not change that, as it would if
    the norm term were summed over the whole batch (2^24 swamps a difference of 3/64)."""
    from models.quantizer import nearest_codes
    codebook = torch.tensor([[0.0, 0.0], [0.375, 0.0]])
    near, far = torch.tensor([[0.25, 0.0]]), torch.tensor([[4096.0, 0.0]])
    assert nearest_codes(near, codebook).tolist() == [1]
    assert nearest_codes(torch.cat([far, near]), codebook).tolist() == [1, 1]


def test_nearest_codes_resolves_close_codes_far_from_the_origin():
    """Codes 4 apart at distance 2048 from the origin: every term of ||z||^2 - 2 z.c + ||c||^2 is an integer below
    2^24, so float32 computes the distances 16 and 0 exactly: the row's own squared norm cancels the large parts.
    Any other per-row term (e.g. the sum of cubes, ~2^33) rounds both distances to the same number."""
    from models.quantizer import nearest_codes
    codebook = torch.tensor([[2048.0, 0.0], [2048.0, 4.0]])
    z = torch.tensor([[2048.0, 4.0], [2048.0, 0.0]])
    assert nearest_codes(z, codebook).tolist() == [1, 0]


def test_kmeans_plus_plus_draws_only_from_its_generator():
    """kmeans_init is deterministic in its seed: every draw of the seeding (first centre and the later ones) comes
    from the generator passed in, not the global RNG, whose state differs here between the two calls."""
    from models.quantizer import _kmeans_plus_plus
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(_kmeans_plus_plus(x, 6, torch.Generator().manual_seed(7)))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], _kmeans_plus_plus(x, 6, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("seed", range(8))
def test_kmeans_plus_plus_on_k_distinct_points_picks_each_once(seed):
    """With as many distinct points as centres, k-means++ must return every point once: a chosen point is at
    distance 0 from the centres (weight ~1e-12 against >= 1e-6 for the others), and the last point must stay
    drawable. Small-scale data (distances << 1) so that clamping or offsetting the distances by 1 would make the
    draw near uniform and repeat points."""
    from models.quantizer import _kmeans_plus_plus
    gen = torch.Generator().manual_seed(100 + seed)
    x = 0.01 * torch.randn(8, 2, generator=gen)
    centres = _kmeans_plus_plus(x, 8, gen)
    assert centres.shape == (8, 2)
    assert sorted(map(tuple, centres.tolist())) == sorted(map(tuple, x.tolist()))


def test_kmeans_plus_plus_surplus_centres_follow_the_data():
    """Fewer distinct points than centres: once every distinct point is a centre all distances are 0, and the
    epsilon makes the next draw uniform over the points, so it lands on the 98 copies of B, not on A (which sits at
    both ends of the array, where a broken cumulative sum would send the search)."""
    from models.quantizer import _kmeans_plus_plus
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    x = torch.cat([a, b.repeat(98, 1), a])
    two_b = 0
    for seed in range(10):
        centres = _kmeans_plus_plus(x, 3, torch.Generator().manual_seed(seed))
        assert {tuple(r) for r in centres.tolist()} == {(1.0, 0.0), (0.0, 1.0)}  # both locations are centres
        two_b += int((centres == b).all(1).sum()) == 2
    assert two_b >= 8  # each seed gives two B's with probability ~0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fingerprint_of_a_half_precision_codebook_is_that_of_its_float32_values(dtype):
    """A codebook kept in bf16/fp16 (numpy has no bfloat16) hashes as its exact float32 upcast."""
    from models.quantizer import fingerprint_codebook
    codebook = torch.tensor([[0.1, -2.5], [3.0, 1e-3]]).to(dtype)
    assert fingerprint_codebook(codebook, {"k": 1}) == fingerprint_codebook(codebook.float(), {"k": 1})


def test_constructor_defaults():
    """The defaults (callers that leave them out get them): beta 0.25 (Taming), EMA decay 0.99 and Laplace eps 1e-5,
    a FIFO of 4096 vectors when revival is on."""
    vq = VectorQuantizer(n_codes=2, code_dim=2)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    _, _, aux = vq(torch.tensor([[0.2, 0.9], [0.1, 1.6]]).view(1, 2, 1, 2))
    assert aux["commit_loss"] > 0 and aux["codebook_loss"] > 0
    assert aux["loss"].item() == pytest.approx((aux["codebook_loss"] + 0.25 * aux["commit_loss"]).item(), rel=1e-6)

    start = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    ema = VectorQuantizer(n_codes=2, code_dim=2, ema=True).train()
    ema.codebook.copy_(start)
    ema.ema_embed_sum.copy_(start)
    z = torch.tensor([[1.0, 0.5], [0.5, 1.0], [3.0, 3.5]])
    ema(z.t().reshape(1, 2, 3, 1))
    assert torch.allclose(ema.codebook.double(), reference_ema(start, [z], 0.99, 1e-5), rtol=0, atol=1e-5)
    assert not torch.allclose(ema.codebook.double(), reference_ema(start, [z], 0.99, 1.0), rtol=0, atol=1e-3)

    assert VectorQuantizer(n_codes=2, code_dim=3, dead_code_steps=1).z_buffer.shape == (4096, 3)


def test_default_codebook_is_uniform_in_plus_minus_one_over_k():
    """Taming's init U(-1/K, 1/K): 512 draws fill the interval (each end within half its width with probability
    1 - 0.75^512) and never leave it."""
    torch.manual_seed(0)
    k = 64
    codebook = VectorQuantizer(n_codes=k, code_dim=8).codebook.detach()
    assert codebook.min() >= -1.0 / k and codebook.max() <= 1.0 / k
    assert codebook.min() < -0.5 / k and codebook.max() > 0.5 / k


def test_usage_counters_are_exact_integers():
    """The counters are int64 in the state_dict and keep counting past 2^24, where a float32 counter stops
    (2^24 + 1 rounds to 2^24): code_counts reaches that in a long logging window."""
    vq = VectorQuantizer(n_codes=2, code_dim=1, dead_code_steps=5, buffer_size=4).train()
    vq.codebook.data = torch.tensor([[0.0], [10.0]])
    for name in ("code_counts", "steps_unused", "train_steps"):
        getattr(vq, name).fill_(2 ** 24)
    vq(torch.tensor([0.1]).view(1, 1, 1, 1))  # one vector, assigned to code 0
    assert vq.code_counts.tolist() == [2 ** 24 + 1, 2 ** 24]
    assert vq.steps_unused.tolist() == [0, 2 ** 24 + 1]
    assert int(vq.train_steps) == 2 ** 24 + 1
    state = vq.state_dict()
    for name in ("code_counts", "steps_unused", "train_steps", "z_buffer_ptr", "z_buffer_filled"):
        assert state[name].dtype == torch.int64, name


def test_without_revival_no_fifo_is_kept():
    """dead_code_steps=0 turns revival off: no FIFO rows are allocated or filled (checkpoints stay small)."""
    vq = VectorQuantizer(n_codes=4, code_dim=2, dead_code_steps=0, buffer_size=16).train()
    vq(torch.randn(1, 2, 2, 2))
    assert vq.z_buffer.shape == (0, 2) and int(vq.z_buffer_filled) == 0


def collapsed_quantizer(dead_code_steps: int) -> VectorQuantizer:
    """8 codes, every input near the origin picks code 0: codes 1..7 are dead."""
    vq = VectorQuantizer(n_codes=8, code_dim=2, dead_code_steps=dead_code_steps, buffer_size=64).train()
    vq.codebook.data = torch.cat([torch.zeros(1, 2), torch.tensor([[100.0 + i, 100.0] for i in range(7)])])
    return vq


def test_revival_after_a_single_unused_step():
    """dead_code_steps=1: a code unused in one step is revived at the next one (from the FIFO that step filled)."""
    torch.manual_seed(0)
    vq = collapsed_quantizer(1)
    vq(torch.randn(2, 2, 4, 4) * 0.5)
    buffered = vq.z_buffer[: int(vq.z_buffer_filled)].clone()
    assert int(vq.z_buffer_filled) == 32
    vq(torch.randn(2, 2, 4, 4) * 0.5)
    revived = vq.codebook.detach()[1:]
    assert (torch.cdist(revived, buffered).min(1).values < 1e-6).all()


def test_eval_forward_changes_no_state_even_with_dead_codes():
    """Tokenizing (eval mode) must not touch the model: codes that are due for revival stay as they are."""
    torch.manual_seed(0)
    vq = collapsed_quantizer(2)
    for _ in range(2):
        vq(torch.randn(2, 2, 4, 4) * 0.5)
    assert vq.steps_unused[1:].min() >= 2 and int(vq.z_buffer_filled) > 0  # codes 1..7 are due
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(2, 2, 4, 4) * 0.5)
    for name, value in vq.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_l2_norm_mode_normalizes_each_vector():
    """Cosine lookup: each encoder vector is scaled to unit length on its own. (3, 4) -> (0.6, 0.8) picks code
    (0, 1), squared error 0.4; (-2, 0) -> (-1, 0) picks (0, 1) too (squared distance 2 against 4), error 2: both
    losses are 2.4 / 4 elements. One norm for the whole batch would pick the same codes but give other losses."""
    vq = VectorQuantizer(n_codes=2, code_dim=2, l2_norm=True)
    vq.codebook.data = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalized to (1, 0), (0, 1) for the lookup
    z = torch.tensor([[3.0, 4.0], [-2.0, 0.0]]).t().reshape(1, 2, 2, 1)
    z_q, indices, aux = vq(z)
    assert indices.flatten().tolist() == [1, 1]
    assert aux["commit_loss"].item() == pytest.approx(0.6, rel=1e-6)
    assert aux["codebook_loss"].item() == pytest.approx(0.6, rel=1e-6)


def test_without_a_graph_to_feed_the_output_is_the_code_bit_exactly():
    """decode_indices must reproduce the reconstruction bit-exactly: when no gradient can flow (input without grad,
    or under no_grad) z_q is the code itself, not z + (code - z), which rounds differently."""
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=16, code_dim=4)
    z = torch.randn(2, 4, 3, 3)
    z_q, indices, _ = vq(z)  # grad mode on, z needs no grad
    assert torch.equal(z_q, vq.lookup(indices))
    with torch.no_grad():
        z_q, indices, _ = vq(z.clone().requires_grad_(True))
    assert torch.equal(z_q, vq.lookup(indices))
    # the straight-through sum is not bit-exact on these inputs (what the two checks above would otherwise get)
    codes = vq.codes().detach()[indices.flatten()]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert not torch.equal(z_flat + (codes - z_flat), codes)


def test_forward_perplexity_and_usage_fraction_hand_case():
    """aux from one batch: 3 vectors on code 0, 1 on code 1, codes 2 and 3 unused. usage_fraction = 2/4 (a code used
    once counts); perplexity = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548; uniform use of two codes gives 2."""
    vq = VectorQuantizer(n_codes=4, code_dim=2)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0], [1.0, 0.1]]).t().reshape(1, 2, 4, 1)
    _, indices, aux = vq(z)
    assert indices.flatten().tolist() == [0, 0, 0, 1]
    assert aux["usage_fraction"].item() == 0.5
    assert aux["perplexity"].item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
                                                     rel=1e-5)
    z2 = torch.tensor([[0.1, 0.0], [1.0, 0.1]]).t().reshape(1, 2, 2, 1)
    assert vq(z2)[2]["perplexity"].item() == pytest.approx(2.0, rel=1e-5)
