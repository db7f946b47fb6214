"""Two real ranks (torchrun, gloo on the CPU) against one process. Each rank takes items r, r + 2, ... of every global
batch and DDP averages the gradients, so a two-rank run is the one-process run up to float rounding, except where
something is computed from a rank's own share: the quantizer's usage counts, dead codes, revival FIFO and EMA codes,
Taming's adaptive GAN weight (gradients from a separate autograd.grad), and the logged losses. Those now see the
whole batch; before, they were rank 0's share (DDP broadcast its buffers), which these tests tell apart."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_worker import adaptive_run, ar_cfg, gan_ddp_cfg, quantizer_run
from helpers import ROOT

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args: str, ranks: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone` with `ranks` processes: the worker script's mode, or `-m stages.X ...`."""
    # gloo on the loopback interface: it would otherwise resolve the host name, which some containers cannot
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{WORKER.parent}", "OMP_NUM_THREADS": "1",
                        "GLOO_SOCKET_IFNAME": "lo"}
    script = list(args) if args[0] == "-m" else [str(WORKER), *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


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


def test_quantizer_statistics_and_the_adaptive_weight_see_the_whole_batch(tmp_path):
    torchrun("stats", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
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


def test_train_transformer_on_two_ranks_logs_and_ends_as_one_process(tiny_world, tmp_path):
    from stages import train_transformer
    base = tiny_world["base"]
    train_transformer.run(ar_cfg(base, tmp_path / "one"))
    torchrun("train_transformer", str(base), str(tmp_path / "two"))
    # train loss: the mean over both ranks (rank 0's half alone differs in the second digit)
    assert_logs_close(tmp_path / "one" / "log.tsv", tmp_path / "two" / "log.tsv", rel=1e-4)
    from pipeline import checkpoint as ckpt
    assert ckpt.read(tmp_path / "two" / "ckpt" / "last.pt")["step"] == 6


def test_train_vqgan_on_two_ranks_logs_and_ends_as_one_process(tmp_path):
    from stages import train_vqgan
    from test_train_vqgan import prepare_tiny, tiny_cfg
    prepared = prepare_tiny(tmp_path)
    train_vqgan.run(tiny_cfg(prepared, tmp_path / "one"))
    torchrun("train_vqgan", str(prepared), str(tmp_path / "two"))
    # rec, q, g, d, the adaptive weight, code usage and perplexity: each the whole batch's on both
    assert_logs_close(tmp_path / "one" / "log.tsv", tmp_path / "two" / "log.tsv", rel=1e-3)


def test_train_gan_on_two_ranks_logs_and_ends_as_one_process(tiny_world, tmp_path):
    """G and D average their gradients over the ranks (training.gan.average_gradients) and the log's losses and D
    accuracies are means over them: with no per-rank draws in the recipe, two ranks are one process."""
    from stages import train_transformer
    base = tiny_world["base"]
    train_transformer.run(gan_ddp_cfg(base, tmp_path / "one"))
    torchrun("train_gan", str(base), str(tmp_path / "two"))
    assert_logs_close(tmp_path / "one" / "log.tsv", tmp_path / "two" / "log.tsv", rel=1e-4)


def test_gather_stacks_every_ranks_tensor_and_is_an_unsqueeze_in_one_process():
    from pipeline.device import Dist
    state = torch.Generator().manual_seed(5).get_state()
    assert torch.equal(Dist().gather(state, torch.device("cpu")), state.unsqueeze(0))
