"""Run under `torchrun --standalone --nproc_per_node 2` by tests/test_ddp.py: one rank of a real two-process gloo
group (CPU), which runs the steps of a plan (a JSON list of [mode, *args]) in order, in one process group: each
launch costs ~10 s of CPU (the launcher and both ranks import torch), so one launch does many runs. Modes:
  stats OUT            the quantizer (plain and EMA) and the adaptive GAN weight on this rank's share of fixed
                       batches; writes OUT/rank<r>.pt (tensors only) for the test to hold against one process
  LOOP[_crash] BASE OUT
                       LOOP (train_vqgan, train_transformer, train_maskgit, train_gan) run on a test fixture
                       (helpers' configs, read back through the stage's params check as a params file would be),
                       both ranks in one run, each recording the step it resumed from; `_crash` stops every rank
                       after the first checkpoint, like a kill of the whole job (a resume belongs in a later launch:
                       fresh processes)
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from pipeline import env  # noqa: F401  (before torch, as in every entry point: the same CPU kernels as the test)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def stats_batches(steps: int = 6) -> list[torch.Tensor]:
    """Encoder outputs of 4 images of 2x2 vectors per step: 16 vectors against 16 codes, so codes die and revive."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(4, 4, 2, 2, generator=g) for _ in range(steps)]


def quantizer_run(ema: bool, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share (items rank, rank + world, ...) of every batch through a fresh quantizer; its buffers after."""
    from models.quantizer import VectorQuantizer
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, l2_norm=True, ema=ema, dead_code_steps=2, buffer_size=24).train()
    for z in stats_batches():
        q(z[rank::world])
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


def adaptive_run(rank: int, world: int) -> torch.Tensor:
    """Taming's adaptive weight for a linear 'decoder' on this rank's share of 6 items."""
    from models.discriminator import adaptive_weight
    g = torch.Generator().manual_seed(3)
    x, target, w = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g)
    last = w.clone().requires_grad_(True)
    out = x[rank::world] @ last
    return adaptive_weight((out - target[rank::world]).abs().mean(), -(out * out).mean(), last)


def ar_cfg(base: Path, out: Path):
    """helpers.transformer_cfg without label dropout: each rank draws its own from the global RNG, so with it one
    process and two ranks train on differently dropped labels (by design, like any per-rank dropout)."""
    import dataclasses

    from helpers import transformer_cfg
    cfg = transformer_cfg(base, out)
    return dataclasses.replace(cfg, ar=dataclasses.replace(cfg.ar, class_dropout=0.0))


def gan_ddp_cfg(base: Path, out: Path):
    """A TransGAN run whose two ranks compute what one process does: no augmentation (each rank draws its own) and
    no mode-seeking term (each rank's ratio is of its own share, and 1 / ratio is not linear in it)."""
    from test_train_gan import gan_cfg
    return gan_cfg({"base": base}, out, "transgan", gan={"diffaug": "", "ms_weight": 0.0})


@contextlib.contextmanager
def recording_resumed_step(out: Path) -> Iterator[None]:
    """Rank r writes OUT/resumed_rank<r>.txt: the step of the checkpoint it resumed from, or "none"."""
    from pipeline import checkpoint as ckpt
    real_load = ckpt.load_latest

    def load_latest(*args, **kwargs):
        state = real_load(*args, **kwargs)
        (out / f"resumed_rank{dist.get_rank()}.txt").write_text("none" if state is None else str(state["step"]))
        return state

    out.mkdir(parents=True, exist_ok=True)
    ckpt.load_latest = load_latest
    try:
        yield
    finally:
        ckpt.load_latest = real_load


@contextlib.contextmanager
def crashing_after_first_checkpoint_on_every_rank() -> Iterator[None]:
    """Every rank stops (KeyboardInterrupt) right after the first checkpoint is saved, past the barrier that
    follows it, like a kill of the whole job between two steps."""
    from pipeline import checkpoint as ckpt
    from pipeline.device import Dist
    real_save, real_barrier, saved = ckpt.save, Dist.barrier, []

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(True)

    def barrier(self):
        real_barrier(self)
        flag = torch.tensor([1.0 if saved else 0.0])
        dist.all_reduce(flag)  # rank 0 saved: every rank stops together
        if flag.item():
            raise KeyboardInterrupt("killed after the first checkpoint")

    ckpt.save, Dist.barrier = save, barrier
    try:
        yield
    except KeyboardInterrupt:
        pass  # the kill this mode asked for
    else:
        raise AssertionError("the run ended without the kill: no checkpoint was saved")
    finally:
        ckpt.save, Dist.barrier = real_save, real_barrier


def checked(section: str, cfg, datasets: dict, project: Path):
    """`cfg` as a params file in `project` holds it (tuples as lists), read back by the stage's own check."""
    import dataclasses
    import importlib

    from pipeline.config import PROJECT_ROOT
    raw = json.loads(json.dumps(dataclasses.asdict(cfg)))
    token = PROJECT_ROOT.set(project)  # outputs must lie inside the project
    try:
        return importlib.import_module(f"stages.{section}").check({"datasets": datasets, section: raw},
                                                                  str(project / "params.yaml"))
    finally:
        PROJECT_ROOT.reset(token)


def run_mode(mode: str, args: list[str]) -> None:
    if mode == "stats":
        rank, world = dist.get_rank(), dist.get_world_size()
        out = {f"plain.{k}": v for k, v in quantizer_run(False, rank, world).items()}
        out |= {f"ema.{k}": v for k, v in quantizer_run(True, rank, world).items()}
        out["adaptive_weight"] = adaptive_run(rank, world)
        Path(args[0]).mkdir(parents=True, exist_ok=True)
        torch.save(out, Path(args[0]) / f"rank{rank}.pt")
        return
    base, out = Path(args[0]), Path(args[1])
    loop = mode.removesuffix("_crash")
    with contextlib.ExitStack() as stack:
        stack.enter_context(recording_resumed_step(out))
        if mode.endswith("_crash"):
            stack.enter_context(crashing_after_first_checkpoint_on_every_rank())
        if loop == "train_vqgan":
            from stages import train_vqgan
            from test_train_vqgan import tiny_cfg
            cfg = tiny_cfg(base, out)
            train_vqgan.run(checked("train_vqgan", cfg, {cfg.dataset: {}}, out.parent))
        elif loop in ("train_transformer", "train_maskgit", "train_gan"):
            import dataclasses

            from stages import train_transformer
            cfg = gan_ddp_cfg(base, out) if loop == "train_gan" else ar_cfg(base, out)
            cfg = dataclasses.replace(cfg, kind="maskgit") if loop == "train_maskgit" else cfg
            datasets = {"a": {"source": "idx", "path": "unused"}}
            train_transformer.run(checked("train_transformer", cfg, datasets, out.parent))
        else:
            raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers
    dist.init_process_group("gloo")
    for mode, *args in json.loads(Path(sys.argv[1]).read_text()):
        run_mode(mode, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE") == "2", "run me under torchrun --nproc_per_node 2"
    main()
