"""Determinism that a single process cannot see: a random split that holds across processes (Python salts
`hash()` per process, so two runs in one process agree even when keyed on it), and a batch order that is a
function of (seed, step) yet changes from one epoch to the next."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from helpers import ROOT
from training.common import StepBatches

PREPARE = """
import json, sys
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams, run
from pipeline.shards import iter_tar_samples
src, out = sys.argv[1], sys.argv[2]
cfg = PrepareConfig("d", DatasetSpec(source="folder", path=src, resolution=8, channels=1, split="random",
                                     val_fraction=0.3), PrepareParams(out_dir=out))
run(cfg)
manifest = json.loads((cfg.out / "manifest.json").read_text())
print(json.dumps({split: sorted(key for shard in manifest["splits"][split]["shards"]
                                for key, _, _ in iter_tar_samples(cfg.out / shard))
                  for split in ("train", "val")}))
"""


def test_random_split_is_the_same_in_processes_with_different_hash_seeds(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c in ("x", "y"):
        (src / c).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(src / c / f"{i}.png")
    splits = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", PREPARE, str(src), str(tmp_path / f"out{hash_seed}")],
                             env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        splits.append(json.loads(out.strip().splitlines()[-1]))
    # both splits used (a split that sends everything one way would agree trivially)
    assert len(splits[0]["train"]) + len(splits[0]["val"]) == 30 and 0 < len(splits[0]["val"]) < 30
    assert splits[0] == splits[1]


def epoch_orders(batches: StepBatches, epochs: int) -> list[list[int]]:
    per = batches.per_epoch
    return [torch.cat([batches.indices(e * per + b) for b in range(per)]).tolist() for e in range(epochs)]


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    batches = StepBatches(n=12, batch_size=4, seed=0)
    orders = epoch_orders(batches, 4)
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # 4 epochs, 4 different orders


def test_batch_of_a_step_depends_only_on_seed_and_step():
    # a fresh schedule asked for steps out of order (as after a resume) gives the same batches
    a, b = StepBatches(n=12, batch_size=4, seed=3), StepBatches(n=12, batch_size=4, seed=3)
    forward = {s: a.indices(s).tolist() for s in range(12)}
    assert all(b.indices(s).tolist() == forward[s] for s in (7, 0, 11, 4, 7))
    assert epoch_orders(StepBatches(n=12, batch_size=4, seed=4), 1) != epoch_orders(a, 1)


def test_ranks_split_the_global_batch():
    whole = StepBatches(n=12, batch_size=4, seed=1)
    ranks = [StepBatches(n=12, batch_size=4, seed=1, rank=r, world=2) for r in range(2)]
    for step in (0, 2, 5):
        parts = [r.indices(step).tolist() for r in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(whole.indices(step).tolist())
        assert not set(parts[0]) & set(parts[1])
