"""Two real ranks (torchrun, gloo on the CPU), continued from test_ddp.py (a second module, so pytest-xdist can run
the two on different workers): a run killed after a checkpoint and resumed on two ranks is the uninterrupted
two-rank run, and a batch the ranks cannot split is one line."""
from __future__ import annotations

import re

import pytest
import torch

from ddp_worker import ar_cfg
from test_ddp import torchrun
from test_train_vqgan import prepare_tiny


@pytest.mark.parametrize("loop", ["train_vqgan", "train_maskgit"])
def test_two_ranks_resume_exactly(tiny_world, tmp_path, loop):
    """Killed on every rank after the step-3 checkpoint, then resumed: bitwise the uninterrupted two-rank run. Each
    rank draws MaskGIT's masks from its own generator; the checkpoint held rank 0's state alone, so after a resume
    rank 1 drew rank 0's masks and the run left the uninterrupted one at the next step. Now every rank's state is
    saved and each rank takes its own back. The VQGAN's quantizer state is buffers, the same on every rank since
    they see the whole batch. (The GAN's draws are functions of seed, step, stream and rank, with nothing to save:
    its two-rank resume was bitwise too when checked by hand with the worker's train_gan_crash, left out here for
    the suite's time.)"""
    from safetensors.torch import load_file
    base = str(prepare_tiny(tmp_path) if loop == "train_vqgan" else tiny_world["base"])
    torchrun(loop, base, str(tmp_path / "a"))
    torchrun(f"{loop}_crash", base, str(tmp_path / "b"), ok=False)
    torchrun(loop, base, str(tmp_path / "b"))
    assert [(tmp_path / "b" / f"resumed_rank{r}.txt").read_text() for r in (0, 1)] == ["3", "3"]
    assert (tmp_path / "a" / "log.tsv").read_text() == (tmp_path / "b" / "log.tsv").read_text()
    model = {"train_vqgan": "vqgan", "train_maskgit": "gpt"}[loop]
    a, b = (load_file(str(tmp_path / run / model / "model.safetensors")) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_the_ranks_cannot_split_is_one_line_per_rank_before_training(tiny_world, tmp_path):
    """8 sequences over 3 ranks: each rank says so in one line naming the keys (it was a ValueError traceback per
    rank from StepBatches), and nothing is written."""
    import dataclasses
    import json

    import yaml
    cfg = dataclasses.asdict(ar_cfg(tiny_world["base"], tmp_path / "out"))
    params = {"datasets": {"a": {"source": "idx", "path": "unused"}},
              "train_transformer": json.loads(json.dumps(cfg))}  # tuples as lists
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = torchrun("-m", "stages.train_transformer", "--params", str(tmp_path / "params.yaml"), ranks=3, ok=False)
    line = ("error: train_transformer.batch_size = 8 is not divisible by 3 rank(s) x train_transformer.grad_accum = 1: "
            "make it a multiple of 3 or run another number of ranks")
    # a rank: that line and exit 2 (a user error); torchrun stops the others once one has failed (SIGTERM, -15)
    # unless they failed first, and its own ChildFailedError is the only traceback
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert proc.stderr.count(line) >= 1 and "2" in codes and set(codes) <= {"2", "-15"}
    assert proc.stderr.count("Traceback") == 1 and "ValueError" not in proc.stderr
    assert not (tmp_path / "out" / "ckpt").exists() and not (tmp_path / "out" / "gpt").exists()


def test_batch_splits_are_checked_for_every_rank_count_and_accumulation():
    from pipeline.errors import UserError
    from training.common import check_batch_splits
    check_batch_splits("s", 12, 3, 2) or check_batch_splits("s", 12, 1, 12)  # 12 = 3 x 2 x 2, 1 x 12
    for world, accum in ((5, 1), (2, 5), (3, 3), (1, 5)):
        with pytest.raises(UserError, match=rf"^s.batch_size = 12 is not divisible by {world} rank\(s\) x "
                                            rf"s.grad_accum = {accum}: make it a multiple of {world * accum} "):
            check_batch_splits("s", 12, world, accum)
