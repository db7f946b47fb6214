"""The tokenize stage and the token store: exact round trip, resume after SIGKILL, fingerprint checks, readers,
rank-count independence, LMDB map growth, and adding a dataset under DVC without retraining the VQGAN."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import (ROOT, files_under, make_good_folder, make_idx_dataset, make_project, small_disk_prefix,
                     tiny_params, tiny_vqgan)
from models.vqgan import VQGAN, VQGANConfig
from pipeline.config import set_params_file
from pipeline.errors import UserError
from pipeline.prepared import PreparedImages
from pipeline.atomic import OWNER_FILE
from pipeline.runlog import read_run_facts
from pipeline.tokens import (FLAG_HFLIP, LMDBWriter, TokenLMDBDataset, decode_batch, decode_record, dtype_code,
                             encode_records, iter_token_shard, read_meta, read_txn, token_webdataset)
from pipeline.vqgan_io import fingerprint, load_vqgan, save_vqgan
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams
from stages.prepare import run as prepare
from stages.tokenize import (CodeSearch, ImageBatches, TokenizeConfig, TokenizeParams, encode_pending, load_config,
                             loader_workers, params_from, run, to_model_input)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A prepared 16x16 grey dataset (40 train + 12 val, shards of 25) and a random-init VQGAN (4x4 grid)."""
    base = tmp_path_factory.mktemp("tok")
    src = make_idx_dataset(base / "idx", n_train=40, n_val=12, seed=3)
    prepare(PrepareConfig("a", DatasetSpec(source="idx", path=str(src), resolution=16, channels=1),
                          PrepareParams(out_dir=str(base / "prepared"), shard_size=25)))
    save_vqgan(base / "vqgan", tiny_vqgan(), {"resolution": 16, "dataset": "a"})
    return {"base": base, "prepared": base / "prepared" / "a", "vqgan": base / "vqgan"}


def params(**kw) -> TokenizeParams:
    return TokenizeParams(**{"batch_size": 8, "shard_size": 10, "num_workers": 0, "roundtrip_images": 64, **kw})


def tokenize(data: dict[str, Path], out: Path, **kw) -> dict:
    """Run the stage; its metrics merged with the run's own facts (resume counts, timing: read_run_facts)."""
    metrics = out.parent / f"metrics_{out.name}.json"
    run(TokenizeConfig("a", data["prepared"], data["vqgan"], out, metrics, None, params(**kw)))
    return json.loads((out / "metrics.json").read_text()) | read_run_facts(metrics)


def records(store: Path) -> dict[bytes, bytes]:
    with read_txn(store / "tokens.lmdb") as txn:
        return dict(txn.cursor().iternext())


@pytest.fixture(scope="module")
def store(data) -> Path:
    out = data["base"] / "tokens" / "a"
    tokenize(data, out, hflip=True)
    return out


# ---------------------------------------------------------------- record format

def test_record_layout_and_dtypes():
    grids = np.arange(2 * 3 * 4).reshape(2, 3, 4) * 1000
    values = encode_records(grids, [7, -1], [0, 1], [0, FLAG_HFLIP], code=1)
    assert len(values[0]) == 16 + 3 * 4 * 2 and values[0][:4] == b"TMTK"
    rec = decode_record(values[1])
    assert rec.grid.dtype == np.dtype("<u2") and np.array_equal(rec.grid, grids[1])
    assert (rec.label, rec.split, rec.flags) == (-1, 1, FLAG_HFLIP)
    g, labels, header = decode_batch(values, 3, 4, 1)
    assert np.array_equal(g, grids) and labels.tolist() == [7, -1]
    assert dtype_code(65536) == 1 and dtype_code(65537) == 2
    big = encode_records(np.full((1, 2, 2), 70000), [0], [0], [0], code=2)[0]
    assert decode_record(big).grid.dtype == np.dtype("<i4") and decode_record(big).grid.max() == 70000
    with pytest.raises(ValueError):
        encode_records(np.full((1, 2, 2), 70000), [0], [0], [0], code=1)  # would wrap in uint16
    with pytest.raises(ValueError):
        decode_record(b"XXXX" + values[0][4:])


# ---------------------------------------------------------------- round trip and contents

def test_roundtrip_exact_and_flips_marked(data, store):
    metrics = json.loads((store / "metrics.json").read_text())
    assert json.loads((store.parent / "metrics_a.json").read_text()) == {
        "images": 52, "perplexity": metrics["code_usage"]["perplexity"],
        "usage_pct": 100 * metrics["code_usage"]["usage_fraction"]}
    assert metrics["roundtrip"]["exact"] is True and metrics["roundtrip"]["images"] == 52
    assert metrics["records"] == 104 and metrics["code_usage"]["used_codes"] >= 1
    model, meta = load_vqgan(data["vqgan"])
    store_meta = read_meta(store)
    assert store_meta["fingerprint"] == meta["fingerprint"] and store_meta["grid"] == [4, 4]
    assert store_meta["dtype"] == "uint16" and store_meta["counts"] == {"train": 40, "val": 12}
    ds = TokenLMDBDataset(store)
    assert len(ds) == 104  # 52 originals, then their 52 flipped copies
    images = torch.cat([PreparedImages(data["prepared"], s).load_all()[0] for s in ("train", "val")])
    x = to_model_input(images, 1, torch.device("cpu"))
    stored, labels = ds.get_batch(range(52))
    flipped, _ = ds.get_batch(range(52, 104))
    with torch.no_grad():
        recon, aux = model(x)
        assert torch.equal(stored, aux["indices"])  # exactly model.encode's tokens
        assert torch.equal(model.decode_indices(stored), recon)  # decoding them gives the reconstructions
        assert torch.equal(flipped, model.encode(x.flip(-1))[1])
    with read_txn(store / "tokens.lmdb") as txn:
        key = ds.keys[60]
        assert key.endswith(b"_hflip") and decode_record(txn.get(key)).flags == FLAG_HFLIP
        assert decode_record(txn.get(ds.keys[0])).flags == 0
    # the split of every record is retrievable
    val = TokenLMDBDataset(store, "val", hflip=False)
    assert len(val) == 12 and torch.equal(val.get_batch(range(12))[0], stored[40:])
    assert val[3][1] == int(labels[43])


def test_shards_hold_the_same_records(store):
    sizes = json.loads((store / "shards" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 10,
                     "train-000003.tar": 10, "train-000004.tar": 10, "train-000005.tar": 10,
                     "train-000006.tar": 10, "train-000007.tar": 10, "val-000000.tar": 10,
                     "val-000001.tar": 10, "val-000002.tar": 4}
    ds = TokenLMDBDataset(store)  # train originals + flips, val originals + flips
    streamed = [s for name in sorted(sizes) for s in iter_token_shard(store / "shards" / name)]
    assert len(streamed) == 104
    grids = torch.stack([torch.from_numpy(np.frombuffer(g, "<u2").astype(np.int64)).view(4, 4) for g, _ in streamed])
    labels = [label for _, label in streamed]
    in_order = [j for i in range(52) for j in (i, 52 + i)]  # each original followed by its flipped copy
    expected_grids, expected_labels = ds.get_batch(in_order)
    assert torch.equal(grids, expected_grids) and labels == expected_labels.tolist()
    assert [label for _, label in iter_token_shard(store / "shards" / "val-000000.tar", hflip=False)] == \
        expected_labels[80:][::2].tolist()[:5]
    ordered = list(token_webdataset(store, "val", shuffle=0, hflip=False))
    assert torch.equal(torch.stack([g for g, _ in ordered]), TokenLMDBDataset(store, "val", hflip=False)
                       .get_batch(range(12))[0])
    grids, labels = next(iter(token_webdataset(store, "train", shuffle=50, batch_size=80)))
    assert grids.shape == (80, 4, 4) and grids.dtype == torch.long and labels.shape == (80,)


def test_faiss_search_equals_torch_even_on_tied_codes():
    model = tiny_vqgan(seed=1)
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    cpu = torch.device("cpu")
    top = int(model.encode(x)[1].flatten().mode().values)  # the most used code
    copy, scaled = (14, 15) if top < 14 else (0, 1)
    with torch.no_grad():
        model.quantizer.codebook[copy] = model.quantizer.codebook[top]  # an exact tie: argmin takes the lower index
        model.quantizer.codebook[scaled] = model.quantizer.codebook[top] * 3  # a near-tie after l2-normalising
    a = CodeSearch(model, "torch", cpu)(x)
    b = CodeSearch(model, "faiss", cpu)(x)
    assert torch.equal(a, b) and torch.equal(a, model.encode(x)[1])
    assert not (a == max(top, copy)).any()
    model_l2 = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2), z_channels=8, n_codes=32, code_dim=4, l2_norm=False,
                                 dead_code_steps=0)).eval()
    assert torch.equal(CodeSearch(model_l2, "faiss", cpu)(x), model_l2.encode(x)[1])  # IndexFlatL2 path


# ---------------------------------------------------------------- the encode loop: decode workers, writer thread

def test_loader_batches_are_the_stacked_images_with_plain_strides(data):
    """One worker item is one batch; it must equal torch.stack of the single images, strides included: a grey
    batch with channels-last strides is also 'contiguous' but sends the encoder down another conv kernel, whose
    rounding moved 15 of 70k Fashion-MNIST tokens."""
    splits = [PreparedImages(data["prepared"], s) for s in ("train", "val")]
    items = [(s, i) for s, d in enumerate(splits) for i in range(len(d))][::-1]  # any order, across splits
    ds = ImageBatches(splits, items, 7)
    assert len(ds) == 8  # 52 items: 7 full batches and one of 3
    for b in range(len(ds)):
        x, start = ds[b]
        want = torch.stack([splits[s][i][0] for s, i in items[start:start + 7]])
        assert start == 7 * b and torch.equal(x, want) and x.stride() == want.stride()


def test_decode_workers_and_writer_thread_make_the_same_store(data, store, tmp_path):
    out = tmp_path / "tokens" / "a"
    tokenize(data, out, hflip=True, num_workers=2, batch_size=5)
    assert records(out) == records(store)  # the fixture's store: no workers, batches of 8


def test_a_failed_write_stops_the_loop_and_keeps_the_batches_before_it(data, tmp_path, monkeypatch):
    model, _ = load_vqgan(data["vqgan"])
    splits = [PreparedImages(data["prepared"], s) for s in ("train", "val")]
    keys = [[e.key.encode() for e in d.entries] for d in splits]
    items = [(s, i) for s, d in enumerate(splits) for i in range(len(d))]
    calls = []
    real = LMDBWriter.put_batch

    def put_batch(self, batch, append=False):
        calls.append(len(batch))
        if len(calls) == 3:
            raise UserError("disk refused batch 3")
        real(self, batch, append)
    monkeypatch.setattr(LMDBWriter, "put_batch", put_batch)
    part = tmp_path / "part.lmdb"
    with pytest.raises(UserError, match="batch 3"):
        encode_pending(model, CodeSearch(model, "torch", torch.device("cpu")), splits, keys, items, part,
                       params(), torch.device("cpu"), show=False)
    assert calls == [8, 8, 8]  # nothing was written after the failure
    monkeypatch.setattr(LMDBWriter, "put_batch", real)
    assert sorted(_part_keys(part)) == sorted(keys[0][:16])  # the two batches before it, committed in order

    def failing_search(x):  # the loop's own error wins over the writes still queued
        if len(calls) >= 5:
            raise RuntimeError("encoder failed")
        calls.append(len(x))
        return model.encode(x)[1]
    with pytest.raises(RuntimeError, match="encoder failed"):
        encode_pending(model, failing_search, splits, keys, items, tmp_path / "part2.lmdb", params(),
                       torch.device("cpu"), show=False)
    assert len(_part_keys(tmp_path / "part2.lmdb")) == 2 * 8  # the batches encoded before the error are stored


def _part_keys(part: Path) -> list[bytes]:
    with read_txn(part) as txn:
        return list(txn.cursor().iternext(values=False))


def test_num_workers_is_auto_or_a_count():
    assert params_from({"num_workers": 3}, "p.yaml").num_workers == 3
    assert loader_workers("auto", torch.device("cpu")) == 1 and loader_workers(0, torch.device("cpu")) == 0
    assert 1 <= loader_workers("auto", torch.device("cuda")) <= 8
    for bad, msg in ((-1, "out of range"), ("many", "wrong type"), (1.5, "wrong type")):
        with pytest.raises(UserError, match=f"p.yaml: tokenize.num_workers = .* {msg}"):
            params_from({"num_workers": bad}, "p.yaml")


# ---------------------------------------------------------------- resume

KILL_SCRIPT = """
import json, os, signal, sys
import pipeline.tokens as tokens
from pathlib import Path
from stages.tokenize import TokenizeConfig, TokenizeParams, run

kill_at, calls = int(sys.argv[2]), [0]
original = tokens.LMDBWriter.put_batch

def put_batch(self, items, append=False):
    if "parts" in str(self.path):
        calls[0] += 1
        if calls[0] == kill_at:  # die inside an open write transaction, half the batch written
            txn = self.env.begin(write=True)
            for k, v in items[: len(items) // 2]:
                txn.put(k, v)
            os.kill(os.getpid(), signal.SIGKILL)
    original(self, items, append)

tokens.LMDBWriter.put_batch = put_batch
c = json.loads(sys.argv[1])
run(TokenizeConfig("a", Path(c["prepared"]), Path(c["vqgan"]), Path(c["out"]), None, None,
                   TokenizeParams(**c["params"])))
"""


def test_sigkill_then_resume_gives_one_record_per_input(data, store, tmp_path):
    out = tmp_path / "tokens" / "a"
    cfg = {"prepared": str(data["prepared"]), "vqgan": str(data["vqgan"]), "out": str(out),
           "params": {"batch_size": 8, "shard_size": 10, "num_workers": 0, "hflip": True}}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), "4"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()  # nothing under the final name
    work = out.parent / ".a.partial"
    env = lmdb.open(str(work / "parts" / "part-00000.lmdb"), subdir=False, readonly=True, lock=False)
    assert env.stat()["entries"] == 3 * 8 * 2  # three committed batches (+ flips); the 4th was never committed
    env.close()
    metrics = tokenize(data, out, hflip=True)
    assert metrics["encoded_this_run"] == 52 - 24 and metrics["resumed_records"] == 24
    assert metrics["roundtrip"]["exact"] is True
    assert not work.exists() and [p.name for p in out.rglob("*") if p.name.startswith(".")] == [OWNER_FILE]
    assert records(out) == records(store)  # one record per input, the same as an uninterrupted run


def test_changed_inputs_discard_stale_parts(data, tmp_path):
    out = tmp_path / "a"
    work = out.parent / ".a.partial"
    (work / "parts").mkdir(parents=True)
    (work / "run.json").write_text('{"fingerprint": "another VQGAN"}')
    with LMDBWriter(work / "parts" / "part-00000.lmdb") as w:
        w.put_batch([(b"train_000000", b"stale")])
    metrics = tokenize(data, out)
    assert metrics["encoded_this_run"] == 52 and metrics["roundtrip"]["exact"] is True


# ---------------------------------------------------------------- fingerprint protection

def test_fingerprint_mismatch_names_both(data, store):
    other = fingerprint(tiny_vqgan(seed=7))
    mine = read_meta(store)["fingerprint"]
    for make in (lambda: TokenLMDBDataset(store, vqgan_fingerprint=other, vqgan_where="data/vqgan_b"),
                 lambda: token_webdataset(store, "train", vqgan_fingerprint=other, vqgan_where="data/vqgan_b")):
        with pytest.raises(UserError) as err:
            make()
        msg = str(err.value)
        assert mine[:16] in msg and other[:16] in msg and "data/vqgan_b" in msg and "\n" not in msg
    assert len(TokenLMDBDataset(store, vqgan_fingerprint=mine)) == 104


def test_load_vqgan_refuses_a_foreign_or_damaged_folder_in_one_line(tmp_path):
    good = tmp_path / "good"
    save_vqgan(good, tiny_vqgan(), {"resolution": 16})
    text = (good / "config.json").read_text()
    cases = [(text[:40], "not valid JSON"),
             ('{"architectures": ["BertModel"], "hidden_size": 768}',
              "not a tokenmill VQGAN config (KeyError: 'model')"),
             (text.replace('"z_channels"', '"latent_channels"'), "not a tokenmill VQGAN config (TypeError:"),
             (text.replace('"fingerprint": "', '"fingerprint": 1, "x": "'), "fingerprint is 1, not a string"),
             (text.replace('"n_codes": 16', '"n_codes": -3'), "not a tokenmill VQGAN config (RuntimeError:")]
    for i, (content, says) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        shutil.copytree(good, folder)
        (folder / "config.json").write_text(content)
        with pytest.raises(UserError) as err:
            load_vqgan(folder)
        assert says in str(err.value) and str(folder / "config.json") in str(err.value), (i, str(err.value))
        assert "\n" not in str(err.value)
    (tmp_path / "bad0" / "config.json").write_text(text)
    (tmp_path / "bad0" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"model.safetensors: cannot load VQGAN weights \(Error while deserializing"):
        load_vqgan(tmp_path / "bad0")


def test_each_rule_of_compat_problem_decides_alone():
    """One input per rule, each wrong in exactly one way; a VQGAN without a recorded resolution is judged by its
    downsampling alone (the first rule needs a resolution, the second holds for any)."""
    from stages.tokenize import compat_problem

    assert compat_problem(32, 1, 32, 4, 1, False) is None
    assert compat_problem(64, 1, 32, 4, 1, False).startswith("resolution 64 differs from the VQGAN's training "
                                                            "resolution 32; prepare this dataset at resolution 32")
    assert compat_problem(36, 1, None, 8, 1, False) == "resolution 36 is not divisible by the VQGAN's downsampling 8"
    assert compat_problem(40, 1, None, 8, 1, False) is None
    assert compat_problem(32, 3, 32, 4, 1, False).startswith("images have 3 channel(s), the VQGAN takes 1;")
    assert compat_problem(32, 3, 32, 4, 1, True) is None and compat_problem(32, 1, 32, 4, 3, True) is None


def test_refuses_other_resolution_and_channels(data, tmp_path):
    save_vqgan(tmp_path / "v32", tiny_vqgan(), {"resolution": 32})
    with pytest.raises(UserError, match="resolution 16 differs from the VQGAN's training resolution 32"):
        run(TokenizeConfig("a", data["prepared"], tmp_path / "v32", tmp_path / "o", params=params()))
    rgb = tiny_vqgan(in_channels=3)
    save_vqgan(tmp_path / "rgb", rgb, {"resolution": 16})
    with pytest.raises(UserError, match="convert_channels"):
        run(TokenizeConfig("a", data["prepared"], tmp_path / "rgb", tmp_path / "o", params=params()))
    run(TokenizeConfig("a", data["prepared"], tmp_path / "rgb", tmp_path / "o", params=params(),
                       convert_channels=True))
    grey = PreparedImages(data["prepared"], "train").load_all()[0][:8]
    with torch.no_grad():
        expected = rgb.encode(grey.expand(-1, 3, -1, -1).float() / 127.5 - 1)[1]
    assert torch.equal(TokenLMDBDataset(tmp_path / "o", "train").get_batch(range(8))[0], expected)


# ---------------------------------------------------------------- readers

class OpenedWhere(torch.utils.data.Dataset):
    """Reports, from inside a loader worker, which process opened the Environment the read used."""

    def __init__(self, ds: TokenLMDBDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        self.ds[i]
        return os.getpid(), self.ds._pid, id(self.ds._env)


def test_reader_refuses_a_store_replaced_after_its_check(store, tmp_path):
    """A reader checked one store's fingerprint; if tokenize swaps in another store at the same path before the
    first read, the read stops with one line instead of serving the other codebook's tokens."""
    import shutil

    from pipeline.errors import UserError
    copy = tmp_path / "a"
    shutil.copytree(store, copy)
    ds = TokenLMDBDataset(copy, "train")
    moved = tmp_path / "b"
    shutil.copytree(copy, moved)
    shutil.rmtree(copy)
    moved.rename(copy)  # the same path, another file: what the stage's folder swap does
    with pytest.raises(UserError, match="replaced after this reader checked it"):
        ds[0]
    assert torch.equal(TokenLMDBDataset(copy, "train")[0][0], TokenLMDBDataset(store, "train")[0][0])


def test_multiworker_dataloader_over_lmdb(store):
    ds = TokenLMDBDataset(store)
    assert ds._env is None  # nothing open in the parent after construction
    first = ds[0]  # now the parent has its own Environment; forked workers must not reuse it
    parent_env = id(ds._env)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context="fork")
    grids = torch.cat([g for g, _ in loader])
    assert grids.shape == (104, 4, 4) and torch.equal(grids, ds.get_batch(range(104))[0])
    assert torch.equal(grids[0], first[0])
    probe = torch.utils.data.DataLoader(OpenedWhere(ds), batch_size=None, num_workers=2,
                                        multiprocessing_context="fork", sampler=range(0, 104, 13))
    seen = list(probe)
    assert {pid for pid, _, _ in seen} != {os.getpid()} and len({pid for pid, _, _ in seen}) == 2
    assert all(pid == opened_by and env != parent_env for pid, opened_by, env in seen)
    spawn = torch.utils.data.DataLoader(ds, batch_size=52, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([g for g, _ in spawn]), grids)  # the dataset pickles without its Environment


def test_webdataset_workers_and_resampled_epochs(store):
    ds = token_webdataset(store, "train", shuffle=0, hflip=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    seen = sorted(g.flatten().tolist() + [label] for g, label in loader)
    assert len(seen) == 40  # split_by_worker: every sample exactly once across the two workers
    direct = TokenLMDBDataset(store, "train", hflip=False)
    assert seen == sorted(direct[i][0].flatten().tolist() + [direct[i][1]] for i in range(40))
    resampled = token_webdataset(store, "train", resampled=True, epoch_length=7, batch_size=4)
    loader = torch.utils.data.DataLoader(resampled, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == 14 and all(b[0].shape == (4, 4, 4) for b in batches)  # 7 batches per worker


def test_lmdb_map_grows_from_a_tiny_map(tmp_path):
    path = tmp_path / "grow.lmdb"
    value = encode_records(np.zeros((1, 8, 8)), [0], [0], [0], 1)[0]
    with LMDBWriter(path, map_size=32 << 10) as w:
        for start in range(0, 3000, 500):
            w.put_batch([(f"k{i:06d}".encode(), value) for i in range(start, start + 500)])
        w.put_batch([(f"z{i:06d}".encode(), value) for i in range(3000)])  # one batch bigger than the map
        assert w.grows >= 4
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    assert env.stat()["entries"] == 6000
    env.close()


# ---------------------------------------------------------------- scale-out

def test_two_gloo_ranks_make_the_same_store_as_one(data, store, tmp_path):
    p = {"datasets": {"a": {"source": "idx", "path": "unused"}},
         "tokenize": {"prepared_dir": str(data["prepared"].parent), "vqgan_dir": str(data["vqgan"]),
                      "out_dir": str(tmp_path / "tokens"), "metrics_dir": str(tmp_path / "metrics"),
                      "plots_dir": str(tmp_path / "plots"), "batch_size": 8, "shard_size": 10, "hflip": True,
                      "num_workers": 0, "device": "cpu"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stages.tokenize", "--dataset", "a", "--params", str(tmp_path / "params.yaml")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "tokens" / "a"
    metrics = read_run_facts(tmp_path / "metrics" / "tokenize_a.json")
    assert metrics["ranks"] == 2 and metrics["encoded_this_run"] == 52
    assert records(two) == records(store)
    for rel in ("meta.json", "shards/sizes.json", "shards/train-000003.tar", "shards/val-000002.tar",
                "tokens.lmdb"):
        assert (two / rel).read_bytes() == (store / rel).read_bytes(), rel
    assert (tmp_path / "plots" / "tokenize_a_code_usage.png").stat().st_size > 1000


# ---------------------------------------------------------------- DVC: a new dataset, no retraining

TOKENIZE_PARAMS = """tokenize:
  prepared_dir: data/prepared
  vqgan_dir: data/vqgan
  out_dir: data/tokens
  metrics_dir: data/metrics
  plots_dir: data/plots
  batch_size: 16
  shard_size: 20
  num_workers: 0
  roundtrip_images: 16
"""


def test_new_dataset_is_tokenized_without_retraining(tmp_path):
    def dvc(*args):
        proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    a = make_idx_dataset(tmp_path / "src_a", n_train=20, n_val=4, seed=1)
    b = make_idx_dataset(tmp_path / "src_b", n_train=12, n_val=4, seed=2)
    # the real prepare + tokenize blocks; the VQGAN is an existing folder, so no training runs in the test
    project = make_project(tmp_path / "p", tiny_params({"a": a}) + TOKENIZE_PARAMS, stages=("prepare", "tokenize"))
    fp = save_vqgan(project / "data" / "vqgan", tiny_vqgan(), {"resolution": 16})
    out = dvc("repro")
    assert "Running stage 'prepare@a'" in out and "Running stage 'tokenize@a'" in out
    vqgan_before = {p.name: p.read_bytes() for p in (project / "data" / "vqgan").iterdir()}
    store_a = records(project / "data" / "tokens" / "a")

    set_params_file(project / "params.yaml", ["datasets.b.source=idx", f"datasets.b.path={b}",
                                              "datasets.b.resolution=16", "datasets.b.channels=1"])
    status = dvc("status")
    assert "tokenize@b" in status and "prepare@b" in status
    assert "tokenize@a" not in status and "prepare@a" not in status
    out = dvc("repro")
    assert "Running stage 'tokenize@b'" in out and "Running stage 'tokenize@a'" not in out
    assert "Data and pipelines are up to date." in dvc("status")
    assert {p.name: p.read_bytes() for p in (project / "data" / "vqgan").iterdir()} == vqgan_before
    assert records(project / "data" / "tokens" / "a") == store_a
    meta_b = read_meta(project / "data" / "tokens" / "b")
    assert meta_b["fingerprint"] == fp and meta_b["counts"] == {"train": 12, "val": 4}
    assert json.loads((project / "data" / "tokens" / "b" / "metrics.json").read_text())["roundtrip"]["exact"]

    # A per-dataset option (here channel conversion, a no-op for a grey dataset) re-runs only that dataset's stages.
    set_params_file(project / "params.yaml", ["datasets.b.convert_channels=true"])
    status = dvc("status")
    assert "tokenize@b" in status and "tokenize@a" not in status and "prepare@a" not in status
    out = dvc("repro")
    assert "Running stage 'tokenize@b'" in out and "Running stage 'tokenize@a'" not in out
    assert records(project / "data" / "tokens" / "a") == store_a


def test_channel_conversion_is_a_per_dataset_option(tmp_path):
    params = yaml.safe_load(tiny_params({"a": tmp_path, "b": tmp_path}) + TOKENIZE_PARAMS)
    params["datasets"]["b"]["convert_channels"] = True
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert [load_config(str(path), n).convert_channels for n in ("a", "b")] == [False, True]
    params["datasets"]["b"]["convert_channels"] = "yes"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="datasets.b.convert_channels = 'yes' must be true or false"):
        load_config(str(path), "b")
    params["datasets"]["b"].pop("convert_channels")
    params["tokenize"]["convert_channels"] = True  # where it used to be: the error says where it went
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="now per dataset: set datasets.<name>.convert_channels"):
        load_config(str(path), "a")


# ---------------------------------------------------------------- CLI

def test_cli_tokenizes_an_image_folder(data, tmp_path):
    from pipeline.cli import main
    rgb = tiny_vqgan(in_channels=3)
    save_vqgan(tmp_path / "vq", rgb, {"resolution": 16})
    folder = make_good_folder(tmp_path / "imgs", per_class=5, size=(20, 24))
    out = tmp_path / "tok" / "pets"
    main(["tokenize", str(folder), "--vqgan", str(tmp_path / "vq"), "--out", str(out), "--batch-size", "4",
          "--num-workers", "0", "--hflip"])
    meta = read_meta(out)
    assert meta["fingerprint"] == fingerprint(rgb) and sum(meta["counts"].values()) == 10 and meta["hflip"]
    assert len(TokenLMDBDataset(out)) == 20
    assert not (tmp_path / "tok" / ".pets.prepared").exists()


def test_cli_refuses_colour_images_for_a_grey_vqgan_unless_asked(tmp_path, capsys):
    from pipeline.cli import main
    save_vqgan(tmp_path / "vq", tiny_vqgan(in_channels=1), {"resolution": 16})
    folder = make_good_folder(tmp_path / "imgs", per_class=2, size=(20, 24))  # colour noise
    out = tmp_path / "tok" / "pets"
    args = ["tokenize", str(folder), "--vqgan", str(tmp_path / "vq"), "--out", str(out), "--num-workers", "0"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "the images are colour" in err[0]
    assert "--convert-channels" in err[0] and not out.exists()
    main(args + ["--convert-channels"])
    err = capsys.readouterr().err
    assert "converting colour images to grey" in err and "images of 20x24 made 16x16 (--resize pad)" in err
    assert read_meta(out)["channels"] == 1
    # grey images for a colour VQGAN: refused the other way round
    grey = tmp_path / "grey" / "c"
    grey.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8), "L").save(grey / f"{i}.png")
    save_vqgan(tmp_path / "vq3", tiny_vqgan(in_channels=3), {"resolution": 16})
    with pytest.raises(SystemExit):
        main(["tokenize", str(grey.parent), "--vqgan", str(tmp_path / "vq3"), "--out", str(tmp_path / "t3" / "g")])
    assert "the images are grey, the VQGAN" in capsys.readouterr().err


# ---------------------------------------------------------------- damaged stores and resource limits

@pytest.mark.parametrize("damage", ["zero-byte", "not-lmdb", "truncated"])
def test_damaged_store_is_a_one_line_error_naming_it(store, tmp_path, damage):
    bad = tmp_path / "a"
    shutil.copytree(store, bad)
    lmdb_file = bad / "tokens.lmdb"
    raw = lmdb_file.read_bytes()
    lmdb_file.write_bytes({"zero-byte": b"", "not-lmdb": b"not an lmdb file\n" * 512,
                           "truncated": raw[: len(raw) // 2]}[damage])
    with pytest.raises(UserError) as e:  # truncated: without the size check this is SIGBUS through the mmap
        ds = TokenLMDBDataset(bad, "train", hflip=False)
        [ds[i] for i in range(len(ds))]
    assert str(lmdb_file) in str(e.value) and "\n" not in str(e.value)
    assert "re-run the tokenize stage" in str(e.value)


def test_map_ceiling_stops_clearly_and_keeps_the_existing_store(data, tmp_path):
    out = tmp_path / "tokens" / "a"
    tokenize(data, out)
    before, n_records = files_under(out), len(records(out))
    with pytest.raises(UserError, match=r"LMDB map is full at .* max_map_mb") as e:
        tokenize(data, out, hflip=True, max_map_mb=0.01)  # ~10 KB: three pages, fewer than the store needs
    assert "\n" not in str(e.value)
    assert files_under(out) == before  # the previous store is untouched
    tokenize(data, out, hflip=True)  # without the ceiling the same run completes
    assert len(records(out)) > n_records  # the flipped copies


def test_full_disk_is_one_line_naming_the_work_folder(data, tmp_path):
    """LMDB calls a full disk "Input/output error" and names no file: the stage says what and where."""
    disk = tmp_path / "disk"
    prefix = small_disk_prefix(disk, 48)
    if prefix is None:
        pytest.skip("needs root and unshare for a small tmpfs")
    script = ("import sys; from pathlib import Path; from pipeline.errors import main_guard; "
              "from stages.tokenize import TokenizeConfig, TokenizeParams, run; "
              f"main_guard(lambda: run(TokenizeConfig('a', Path('{data['prepared']}'), Path('{data['vqgan']}'), "
              f"Path('{disk}/tok/a'), None, None, TokenizeParams(num_workers=0, map_size_mb=1, batch_size=8))))")
    proc = subprocess.run(prefix + [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=ENV)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: {disk}/tok/.a.partial") and "space left on device" in last
    assert "free some space" in last


def test_the_usage_plot_is_never_newer_than_the_run_log(data, tmp_path, monkeypatch):
    """The out guard reads the code-usage plot (a file out) as this run's when no newer than the run log beside the
    metrics: at every rename a plot in place has its run log, at least as new (a pause after the run log's rename
    makes a later write strictly newer). scripts/kill_resume.py found a kill between the plot and the run log: the
    next run refused the plot."""
    from helpers import check_never_newer_than_run_log
    metrics, plot = tmp_path / "m.json", tmp_path / "usage.png"
    check_never_newer_than_run_log(monkeypatch, plot, tmp_path / "m.run.json")
    run(TokenizeConfig("a", data["prepared"], data["vqgan"], tmp_path / "o", metrics, plot, params()))
    assert plot.is_file()
