"""Training helpers (training/common.py) by hand values: the learning-rate schedule, the weight EMA, the
non-finite guard, the config hash and the step-batch schedule's limits."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from pipeline import checkpoint
from pipeline.device import Dist, autocast, init_distributed, pick_device
from pipeline.errors import NonFiniteLoss
from training.common import EMA, StepBatches, check_finite, config_hash, cosine_lr, seed_everything, unwrap


def test_cosine_lr_by_hand():
    lr, warmup, total, floor = 1.0, 4, 14, 0.1
    assert [cosine_lr(s, lr, warmup, total, floor) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(4, lr, warmup, total, floor) == pytest.approx(1.0)  # start of the decay
    # halfway through the decay: cos(pi / 2) = 0, so floor + (1 - floor) / 2
    assert cosine_lr(9, lr, warmup, total, floor) == pytest.approx(0.55)
    assert cosine_lr(14, lr, warmup, total, floor) == pytest.approx(0.1)
    assert cosine_lr(99, lr, warmup, total, floor) == pytest.approx(0.1)  # clamped past the end
    expected = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)))  # a fifth of the way into the decay
    assert cosine_lr(6, 2.0, warmup, total, floor) == pytest.approx(expected)
    assert cosine_lr(0, 1.0, 0, 1, 0.0) == 1.0  # no warm-up; a one-step decay does not divide by zero
    assert cosine_lr(5, 1.0, 5, 5, 0.0) == 1.0
    assert cosine_lr(3, 1.0, 2, 3, 0.0) == 0.0  # a one-step decay ends at the floor after its one step


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("stat", torch.zeros(2))


def test_ema_averages_parameters_and_copies_buffers():
    net = Net()
    with torch.no_grad():
        net.lin.weight.fill_(1.0)
        net.lin.bias.fill_(-2.0)
    ema = EMA(net, decay=0.75)
    with torch.no_grad():
        net.lin.weight.fill_(5.0)
        net.lin.bias.fill_(2.0)
        net.count.fill_(3)
        net.stat.fill_(7.0)
    ema.update()
    # params: 0.75 * old + 0.25 * new; buffers (a float one too) take the model's value
    assert torch.equal(ema.shadow["lin.weight"], torch.full((2, 2), 2.0))
    assert torch.equal(ema.shadow["lin.bias"], torch.full((2,), -1.0))
    assert int(ema.shadow["count"]) == 3 and torch.equal(ema.shadow["stat"], torch.full((2,), 7.0))
    ema.update()
    assert torch.equal(ema.shadow["lin.weight"], torch.full((2, 2), 2.75))
    # the averaged copy holds the shadow, in eval mode, and the live model is untouched
    avg = ema.averaged()
    assert not avg.training and avg is not net and net.training
    assert torch.equal(avg.lin.weight, torch.full((2, 2), 2.75))
    assert torch.equal(net.lin.weight, torch.full((2, 2), 5.0))
    # state round trip: decay and shadow come back, and the saved shadow is a copy
    state = ema.state_dict()
    state_copy = {k: v.clone() for k, v in state["shadow"].items()}
    ema.update()
    assert all(torch.equal(state["shadow"][k], state_copy[k]) for k in state_copy)
    other = EMA(Net(), decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.75 and isinstance(other.decay, float)
    assert all(torch.equal(other.shadow[k], state_copy[k]) for k in state_copy)
    target = Net()
    other.copy_to(target)
    assert torch.equal(target.lin.weight, torch.full((2, 2), 2.75))


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(Net(), decay)


def test_ema_accepts_the_ends_of_the_range():
    net = Net()
    for decay in (0.0, 1.0):
        ema = EMA(net, decay)
        with torch.no_grad():
            net.lin.weight.add_(1.0)
        before = ema.shadow["lin.weight"].clone()
        ema.update()
        assert torch.equal(ema.shadow["lin.weight"], net.lin.weight if decay == 0.0 else before)


def test_check_finite_names_step_losses_and_last_checkpoint(tmp_path):
    check_finite(3, tmp_path, a=torch.tensor(1.0), b=2.0)  # finite: nothing happens
    checkpoint.save(tmp_path, {"step": 2}, 2)
    checkpoint.save(tmp_path, {"step": 4}, 4)
    with pytest.raises(NonFiniteLoss) as exc:
        check_finite(5, tmp_path, ok=torch.tensor(0.5), bad=torch.tensor(float("nan")), worse=float("inf"))
    assert str(exc.value) == (f"non-finite loss at step 5: bad=nan, worse=inf; last good checkpoint: "
                              f"{tmp_path / 'step-00000004.pt'}")
    with pytest.raises(NonFiniteLoss, match=r"at step 0: x=-inf; last good checkpoint: none$"):
        check_finite(0, None, x=float("-inf"))
    with pytest.raises(NonFiniteLoss, match=r"last good checkpoint: none$"):
        check_finite(0, tmp_path / "empty", x=float("nan"))


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({"a": 1})) == 16
    # known value: sha256 of the canonical JSON, first 16 hex digits (changing it orphans every checkpoint)
    import hashlib
    assert config_hash({"b": 1, "a": "x"}) == hashlib.sha256(b'{"a": "x", "b": 1}').hexdigest()[:16]
    from pathlib import Path
    assert config_hash({"p": Path("/x")}) == config_hash({"p": "/x"})  # non-JSON values by their str()


def test_step_batches_limits():
    with pytest.raises(ValueError, match="larger than the dataset"):
        StepBatches(n=4, batch_size=5, seed=0)
    with pytest.raises(ValueError, match="not divisible by the number of ranks"):
        StepBatches(n=8, batch_size=3, seed=0, world=2)
    b = StepBatches(n=10, batch_size=3, seed=0)  # the ragged tail (10 = 3 * 3 + 1) is dropped
    assert b.per_epoch == 3 and b.epoch_of(2) == 0 and b.epoch_of(3) == 1
    assert all(len(b.indices(s)) == 3 for s in range(9))
    assert StepBatches(n=4, batch_size=4, seed=0).indices(0).sort().values.tolist() == [0, 1, 2, 3]
    # a fresh schedule whose first request is in epoch 1 (a resume) draws epoch 1's permutation
    assert StepBatches(n=4, batch_size=4, seed=0).indices(1).tolist() == b_perm(4, 0, 1)


def b_perm(n: int, seed: int, epoch: int) -> list[int]:
    """The documented order: torch.randperm seeded by seed * 1_000_003 + epoch. Pinned because checkpoints of
    runs made by earlier versions resume into it: another formula would silently change a resumed run's batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def test_batch_order_is_the_documented_permutation():
    b = StepBatches(n=6, batch_size=3, seed=2)
    assert [b.indices(s).tolist() for s in range(4)] == [b_perm(6, 2, 0)[:3], b_perm(6, 2, 0)[3:],
                                                         b_perm(6, 2, 1)[:3], b_perm(6, 2, 1)[3:]]


def test_seed_everything_seeds_every_generator():
    import random

    import numpy as np
    seed_everything(5)
    a = (torch.rand(2), random.random(), np.random.rand())
    seed_everything(5)
    b = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert a[2] == np.random.RandomState(5).rand() and a[1] == random.Random(5).random()
    seed_everything(2**32 + 5)  # numpy takes the seed modulo 2**32
    assert np.random.rand() == a[2]


def test_devices_and_single_process_helpers(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    # denormals are flushed to zero (they make CPU kernels crawl late in training)
    assert float(torch.tensor(1e-30) * torch.tensor(1e-10)) == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="^device 'cuda' requested but CUDA is not available$"):
        pick_device("cuda")
    import contextlib
    assert isinstance(autocast(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda"), enabled=False), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the object is still built as asked
        ac = autocast(torch.device("cuda"))
    assert isinstance(ac, torch.autocast) and ac.device == "cuda" and ac.fast_dtype == torch.bfloat16
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_distributed(torch.device("cpu"))
    assert (d.rank, d.world, d.local_rank, d.main) == (0, 1, 0, True)
    assert not Dist(rank=1, world=2).main
    values = {"loss": 1.5}
    assert d.mean_floats(values, torch.device("cpu")) is values  # one process: nothing to reduce
    d.barrier()
    net = Net()
    wrapped = nn.Module()
    wrapped.module = net
    assert unwrap(wrapped) is net and unwrap(net) is net


def test_init_distributed_reads_world_and_local_rank(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) with the group already joined: world from WORLD_SIZE, local rank from
    LOCAL_RANK, rank from the group (a one-process gloo group stands in for it)."""
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        d = init_distributed(torch.device("cpu"))
        assert (d.rank, d.world, d.local_rank) == (0, 2, 1)
        monkeypatch.delenv("LOCAL_RANK")
        assert init_distributed(torch.device("cpu")).local_rank == 0  # absent: 0
    finally:
        dist.destroy_process_group()


def test_ema_averages_a_tied_weight_under_both_of_its_names():
    """GPT with tie_head: head.weight is wte.weight. Copied raw under its second name, the raw weights were loaded
    over the average, so the exported model held no average at all for that matrix."""
    from training.common import EMA
    m = torch.nn.ModuleDict({"wte": torch.nn.Embedding(3, 2), "head": torch.nn.Linear(2, 3, bias=False)})
    m["head"].weight = m["wte"].weight
    start = m["wte"].weight.detach().clone()
    ema = EMA(m, 0.75)
    with torch.no_grad():
        m["wte"].weight.add_(4.0)
    ema.update()
    averaged = ema.averaged()
    want = start + 0.25 * 4.0
    assert torch.allclose(averaged["wte"].weight, want) and torch.allclose(averaged["head"].weight, want)
