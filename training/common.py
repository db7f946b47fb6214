"""Plumbing shared by every training stage: seeding, step-indexed batches, DDP, EMA, NaN guard, autocast.

Exact resume rests on one rule: everything random is a function of (seed, step). The batch for step s is a
slice of a permutation seeded by (seed, epoch), so resuming at step s needs no saved data-loader state, and an
interrupted-and-resumed CPU run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
from typing import Any

import torch
import torch.nn as nn

from pipeline.atomic import atomic_path
from pipeline.codegraph import code_fingerprint
from pipeline.errors import NonFiniteLoss, UserError  # noqa: F401  (NonFiniteLoss: stages import it from here)

log = logging.getLogger("tokenmill.training")


def config_hash(cfg: Any) -> str:
    """Stable hash of a JSON-able config (dataclasses via their dict), to refuse resuming another run."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_data_id(meta: dict[str, Any], *tensors: torch.Tensor) -> dict[str, Any]:
    """The input-data part of a stage-2 run's identity: the token store's provenance (codebook, prepared dataset,
    hflip, counts) and a hash of the tokens and labels as loaded. The codebook and the count alone missed tokens
    that changed under the same VQGAN and count (other images, same dataset name), and such a run was resumed."""
    content = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        content.update(f"{t.dtype}{tuple(t.shape)}".encode())
        content.update(t.numpy())  # the buffer itself: no copy of a large store
    keys = ("format", "fingerprint", "dataset", "dataset_fingerprint", "hflip", "count", "counts", "n_codes", "grid")
    return {k: meta.get(k) for k in keys} | {"content": content.hexdigest()[:16]}


def code_id(stage_module: str) -> str:
    """The code part of a run's identity: a hash of the stage's import closure (pipeline/codegraph.py). A checkpoint
    saved under another one is not resumed, so a re-run after a code change retrains with the new code."""
    return code_fingerprint(stage_module)[:16]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    import random
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def check_batch_fits(key: str, batch_size: int, n: int, what: str) -> None:
    """A batch larger than the data is the user's to fix (params or data): one line before training starts."""
    if batch_size > n:
        raise UserError(f"{key} = {batch_size} is larger than {what} ({n}); lower it or add data")


def check_batch_splits(section: str, batch_size: int, world: int, grad_accum: int) -> None:
    """Each of `world` ranks takes batch_size / world items in grad_accum equal micro-batches: one line before
    training when they do not divide it (torchrun --nproc_per_node 3 with a batch of 64 gave a traceback per rank)."""
    if batch_size % (world * grad_accum):
        raise UserError(f"{section}.batch_size = {batch_size} is not divisible by {world} rank(s) x "
                        f"{section}.grad_accum = {grad_accum}: make it a multiple of {world * grad_accum} or run "
                        f"another number of ranks")


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


def linear_decay_scale(step: int, steps: int, decay_from: float) -> float:
    """The learning-rate factor of 0-based `step` in a run of `steps`: 1 until decay_from * steps, then linear down to
    1 / (decay length) at the last step (0 just after it), the linear decay of SN-GAN's and TransGAN's code."""
    start = decay_from * steps
    if step < start:
        return 1.0
    return (steps - step) / (steps - start)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's rate, set from the step alone each step: a resumed run gets the same rates."""
    for group in opt.param_groups:
        group["lr"] = lr


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after each optimiser step; buffers are copied as they are.

    The shadow is a plain {name: tensor} dict (the model's state_dict layout), so checkpoints stay tensors-only."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # every name of a parameter: a tied one (GPT's head.weight is wte.weight) is averaged under both, not copied
        # raw under its second name and loaded over the average
        self._params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

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


def write_tsv(path: str | os.PathLike, history: list[dict], keys: list[str],
              stamp: str | os.PathLike | None = None) -> None:
    """The training log as a TSV for DVC plots (one row per logged step; empty cell = not measured). `stamp`: the run
    log written just before it, whose times the TSV takes (see `atomic_path`)."""
    with atomic_path(path, stamp=stamp) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(keys)
            for h in history:
                w.writerow(["" if h.get(k) is None else f"{h[k]:.6g}" for k in keys])


def export_weights(folder: str | os.PathLike, model: nn.Module) -> None:
    """The model's weights as `model.safetensors` in `folder` (tensors only: no pickle, loads anywhere). Tied
    weights (a GPT with tie_head) are written once per name: safetensors refuses tensors that share memory, and
    load_state_dict fills both names from equal copies."""
    from safetensors.torch import save_file
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(sd, str(tmp))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


