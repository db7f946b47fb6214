"""Two real ranks (torchrun, gloo on the CPU) against one process. Each rank takes items r, r + 2, ... of every global
batch and DDP averages the gradients, so a two-rank run is the one-process run up to float rounding, except where
something is computed from a rank's own share: the quantizer's usage counts, dead codes, revival FIFO and EMA codes,
Taming's adaptive GAN weight (gradients from a separate autograd.grad), and the logged losses. Those now see the
whole batch; before, they were rank 0's share (DDP broadcast its buffers), which these tests tell apart. Then: a run
killed after a checkpoint and resumed on two ranks is the uninterrupted two-rank run, and a batch the ranks cannot
split is one line."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_worker import adaptive_run, ar_cfg, gan_ddp_cfg, quantizer_run
from helpers import ROOT
from test_train_vqgan import prepare_tiny

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args: str, ranks: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone` with `ranks` processes: the worker script with a plan file, or `-m stages.X ...`."""
    # gloo on the loopback interface: it would otherwise resolve the host name, which some containers cannot
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{WORKER.parent}", "OMP_NUM_THREADS": "1",
                        "GLOO_SOCKET_IFNAME": "lo"}
    script = list(args) if args[0] == "-m" else [str(WORKER), *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def run_plan(plan: list[list], path: Path) -> None:
    path.write_text(json.dumps([[str(x) for x in step] for step in plan]))
    torchrun(str(path))


@pytest.fixture(scope="module")
def two(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """Every two-rank run of this module in two launches: the first runs the statistics, each loop uninterrupted,
    and the VQGAN, MaskGIT and GAN runs killed after their step-3 checkpoint; the second resumes the killed runs in
    fresh processes. Returns the folders: base (the token fixture), vq_base (a prepared dataset), and one per run."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {"base": Path(tiny_world["base"]), "vq_base": prepare_tiny(root)}
    runs |= {name: root / name for name in ("stats", "ar", "vqgan", "gan", "maskgit", "vqgan_b", "maskgit_b",
                                            "gan_b")}
    base, vq = runs["base"], runs["vq_base"]
    run_plan([["stats", runs["stats"]], ["train_transformer", base, runs["ar"]], ["train_vqgan", vq, runs["vqgan"]],
              ["train_gan", base, runs["gan"]], ["train_maskgit", base, runs["maskgit"]],
              ["train_vqgan_crash", vq, runs["vqgan_b"]], ["train_maskgit_crash", base, runs["maskgit_b"]],
              ["train_gan_crash", base, runs["gan_b"]]], root / "plan1.json")
    run_plan([["train_vqgan", vq, runs["vqgan_b"]], ["train_maskgit", base, runs["maskgit_b"]],
              ["train_gan", base, runs["gan_b"]]], root / "plan2.json")
    return runs


def log_rows(path: Path) -> list[dict[str, float | None]]:
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    return [{k: float(v) if v else None for k, v in r.items()} for r in rows]


def assert_logs_close(one: Path, two: Path, rel: float) -> None:
    a, b = log_rows(one), log_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if ra[k] is None or k == "lr":
                assert ra[k] == rb[k], k
            else:
                assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-7), (ra["step"], k)


def test_quantizer_statistics_and_the_adaptive_weight_see_the_whole_batch(two):
    ranks = [torch.load(two["stats"] / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: bitwise equality below needs the same kernels and the same splits
    try:
        runs = {ema: (quantizer_run(ema, 0, 1), quantizer_run(ema, 0, 2)) for ema in (False, True)}
    finally:
        torch.set_num_threads(threads)
    for kind, ema in (("plain", False), ("ema", True)):
        whole, share = runs[ema]  # one process: every item, and rank 0's half alone
        assert int(whole["train_steps"]) == 6 and not torch.equal(whole["code_counts"], share["code_counts"])
        if not ema:  # plain codes move only by revival here (no optimiser): codes died and were revived
            from models.quantizer import VectorQuantizer
            torch.manual_seed(0)
            assert not torch.equal(whole["codebook"], VectorQuantizer(16, 4, dead_code_steps=2).codebook.detach())
        for rank in ranks:
            for k, v in whole.items():
                # bitwise: the gathered vectors are one process's, in its order, so every sum is the same
                assert torch.equal(rank[f"{kind}.{k}"], v), (kind, k)
    # the adaptive weight from the two halves' averaged gradients: float32 sums in another order
    assert adaptive_run(0, 2) != pytest.approx(float(adaptive_run(0, 1)), rel=1e-3)
    for rank in ranks:
        assert float(rank["adaptive_weight"]) == pytest.approx(float(adaptive_run(0, 1)), rel=1e-5)


def test_train_transformer_on_two_ranks_logs_and_ends_as_one_process(two, tmp_path):
    from stages import train_transformer
    train_transformer.run(ar_cfg(two["base"], tmp_path / "one"))
    # train loss: the mean over both ranks (rank 0's half alone differs in the second digit)
    assert_logs_close(tmp_path / "one" / "log.tsv", two["ar"] / "log.tsv", rel=1e-4)
    from pipeline import checkpoint as ckpt
    assert ckpt.read(two["ar"] / "ckpt" / "last.pt")["step"] == 6


def test_train_vqgan_on_two_ranks_logs_and_ends_as_one_process(two, tmp_path):
    from stages import train_vqgan
    from test_train_vqgan import tiny_cfg
    train_vqgan.run(tiny_cfg(two["vq_base"], tmp_path / "one"))
    # rec, q, g, d, the adaptive weight, code usage and perplexity: each the whole batch's on both
    assert_logs_close(tmp_path / "one" / "log.tsv", two["vqgan"] / "log.tsv", rel=1e-3)
    # checkpoints and the export once, from rank 0
    from pipeline import checkpoint as ckpt
    assert [p.name for p in ckpt.step_files(two["vqgan"] / "ckpt")] == ["step-00000006.pt", "step-00000003.pt"]
    assert json.loads((two["vqgan"] / "vqgan" / "metrics.json").read_text())["steps"] == 6  # the full record
    assert (two["vqgan"] / "vqgan" / "model.safetensors").exists()


def test_train_gan_on_two_ranks_logs_and_ends_as_one_process(two, tmp_path):
    """G and D average their gradients over the ranks (training.gan.average_gradients) and the log's losses and D
    accuracies are means over them: with no per-rank draws in the recipe, two ranks are one process."""
    from stages import train_transformer
    train_transformer.run(gan_ddp_cfg(two["base"], tmp_path / "one"))
    assert_logs_close(tmp_path / "one" / "log.tsv", two["gan"] / "log.tsv", rel=1e-4)


def test_gather_stacks_every_ranks_tensor_and_is_an_unsqueeze_in_one_process():
    from pipeline.device import Dist
    state = torch.Generator().manual_seed(5).get_state()
    assert torch.equal(Dist().gather(state, torch.device("cpu")), state.unsqueeze(0))


@pytest.mark.parametrize("loop", ["train_vqgan", "train_maskgit", "train_gan"])
def test_two_ranks_resume_exactly(two, loop):
    """Killed on every rank after the step-3 checkpoint, then resumed in fresh processes: bitwise the uninterrupted
    two-rank run. Each rank draws MaskGIT's masks from its own generator; the checkpoint held rank 0's state alone,
    so after a resume rank 1 drew rank 0's masks and the run left the uninterrupted one at the next step. Now every
    rank's state is saved and each rank takes its own back. The VQGAN's quantizer state is buffers, the same on every
    rank since they see the whole batch; the GAN's draws are functions of seed, step, stream and rank."""
    from safetensors.torch import load_file
    name = loop.removeprefix("train_")
    a, b = two[name], two[f"{name}_b"]
    assert [(a / f"resumed_rank{r}.txt").read_text() for r in (0, 1)] == ["none", "none"]
    assert [(b / f"resumed_rank{r}.txt").read_text() for r in (0, 1)] == ["3", "3"]
    assert (a / "log.tsv").read_text() == (b / "log.tsv").read_text()
    model = {"vqgan": "vqgan", "maskgit": "gpt", "gan": "model"}[name]
    files = sorted(p.name for p in (a / model).glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (b / model).glob("*.safetensors"))
    for f in files:
        wa, wb = (load_file(str(run / model / f)) for run in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f


def test_a_batch_the_ranks_cannot_split_is_one_line_per_rank_before_training(tiny_world, tmp_path):
    """8 sequences over 3 ranks: each rank says so in one line naming the keys (it was a ValueError traceback per
    rank from StepBatches), and nothing is written."""
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
