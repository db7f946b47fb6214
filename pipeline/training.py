"""Plumbing shared by every training stage: seeding, step-indexed batches, DDP, EMA, NaN guard, autocast.

Exact resume rests on one rule: everything random is a function of (seed, step). The batch for step s is a
slice of a permutation seeded by (seed, epoch), so resuming at step s needs no saved data-loader state, and an
interrupted-and-resumed CPU run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.errors import NonFiniteLoss  # noqa: F401  (raised here; stages import it from this module)

log = logging.getLogger("tokenmill.training")


def config_hash(cfg: Any) -> str:
    """Stable hash of a JSON-able config (dataclasses via their dict), to refuse resuming another run."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    import random
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


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

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t


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


class StepBatches:
    """The global batch for any step, as a function of (seed, step): a seeded permutation per epoch.

    Each rank takes a disjoint slice of the global batch, so 1 rank x B and N ranks x B/N see the same samples.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the number of ranks {world}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // batch_size  # drop the ragged tail: every step sees a full batch
        self._epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def indices(self, step: int) -> torch.Tensor:
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        batch = self._perm[b * self.batch_size:(b + 1) * self.batch_size]
        return batch[self.rank::self.world]


def cosine_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after each optimiser step; buffers are copied as they are.

    The shadow is a plain {name: tensor} dict (the model's state_dict layout), so checkpoints stay tensors-only."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, value in self.model.state_dict().items():
            if name in self._params and value.is_floating_point():
                self.shadow[name].lerp_(value.detach(), 1.0 - self.decay)  # s + (1 - decay) (p - s)
            else:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        """Load the averaged weights into `target` (a generator of the same architecture)."""
        target.load_state_dict(self.shadow)

    def averaged(self) -> nn.Module:
        """A copy of the model holding the averaged weights, in eval mode (for evaluation and export)."""
        target = copy.deepcopy(self.model).eval()
        self.copy_to(target)
        return target

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def check_finite(step: int, ckpt_dir: str | os.PathLike | None = None, **losses: torch.Tensor | float) -> None:
    """Raise NonFiniteLoss naming the step, the bad losses and the last good checkpoint in `ckpt_dir`."""
    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        from pathlib import Path

        from pipeline.checkpoint import step_files
        last = step_files(Path(ckpt_dir)) if ckpt_dir is not None else []
        raise NonFiniteLoss(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
                            + f"; last good checkpoint: {last[0] if last else 'none'}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


