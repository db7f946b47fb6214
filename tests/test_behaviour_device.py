"""pipeline.device under torchrun, without a second process or a GPU: the calls into torch.distributed and
torch.cuda are recorded, so the backend choice, the device a rank binds and when a barrier waits are pinned."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.device import Dist, init_distributed


@pytest.fixture
def calls(monkeypatch):
    """Record init_process_group / set_device / barrier; the group reports rank 1 once joined."""
    seen: list[tuple] = []
    joined = []

    def init_process_group(backend=None, **kw):
        # torch lowercases backend names itself (dist.Backend), so "NCCL" and "nccl" are the same request
        seen.append(("init", None if backend is None else str(dist.Backend(backend))))
        joined.append(True)

    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "barrier", lambda *a, **kw: seen.append(("barrier",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(("set_device", device)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return seen, joined


@pytest.mark.parametrize("device, expected", [
    ("cuda", [("init", "nccl"), ("set_device", 1)]),  # NCCL, and this rank's own GPU (LOCAL_RANK)
    ("cpu", [("init", "gloo")]),  # gloo, and no CUDA call at all
])
def test_init_distributed_joins_with_the_device_backend(calls, device, expected):
    seen, _ = calls
    d = init_distributed(torch.device(device))
    assert seen == expected
    assert (d.rank, d.world, d.local_rank) == (1, 2, 1)


def test_init_distributed_does_not_join_twice(calls):
    seen, joined = calls
    joined.append(True)  # e.g. a second stage in the same process: the group exists
    init_distributed(torch.device("cpu"))
    assert seen == []


@pytest.mark.parametrize("world, waits", [(1, False), (2, True), (3, True)])
def test_barrier_waits_exactly_when_there_are_other_ranks(calls, world, waits):
    seen, _ = calls
    Dist(rank=0, world=world).barrier()
    assert seen == ([("barrier",)] if waits else [])
