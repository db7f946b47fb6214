"""The few model-side statistics that must see the whole batch under torchrun: the quantizer's code usage, revival
FIFO and EMA codebook, and the VQGAN's adaptive GAN weight. DDP averages parameter gradients, but these are computed
inside the forward or from a separate autograd.grad, so without a collective each rank would use its own share of the
batch (and DDP's buffer broadcast would keep rank 0's). In one process every function returns its input."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Ranks in the process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of `t` over the ranks: for a gradient of a batch-mean loss, the whole batch's (equal shares)."""
    world = world_size()
    if world == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world


def gather_items(t: Tensor, per_item: int) -> Tensor:
    """Every rank's rows of `t` in the order one process would hold them: rank r has items r, r + W, r + 2W, ... of
    the batch (training.common.StepBatches), each `per_item` consecutive rows (an image's h * w vectors)."""
    world = world_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    per_rank = [p.reshape(-1, per_item, *t.shape[1:]) for p in parts]
    return torch.stack(per_rank, dim=1).reshape(-1, *t.shape[1:])  # item-major: item 0 of every rank, then item 1
