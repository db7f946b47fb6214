"""Where work runs: device choice, bf16 autocast on CUDA, and the torchrun process group (NCCL on CUDA, gloo on CPU)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.ranks import mean_over_ranks


def pick_device(requested: str) -> torch.device:
    # Denormal floats make CPU kernels crawl late in training, when some activations and grads get tiny.
    torch.set_flush_denormal(True)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(requested)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU, where bf16 is slow."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every rank's `t` (same shape on each), stacked in rank order on the CPU: `t` itself, unsqueezed, in one
        process. Through `device`, since NCCL moves CUDA tensors only."""
        if self.world == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t, device=device) for _ in range(self.world)]
        dist.all_gather(parts, t.to(device))
        return torch.stack([p.cpu() for p in parts])

    def mean_floats(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value's mean over the ranks (equal shares of the batch: the whole batch's mean), for the logs, which
        would otherwise hold rank 0's share alone. The same dict in one process."""
        if self.world == 1:
            return values
        mean = mean_over_ranks(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
        return dict(zip(values, mean.tolist()))


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)
