"""Benchmark of the tokenize stage, one run, as ratios against the targets of issues 4 and 19:

(a) nearest-code search alone: the torch matmul-argmin (`nearest_codes`, what the quantizer runs) against a
    faiss flat index (k=2, as `CodeSearch` uses it) on the same l2-normalised vectors;
(b) the encode loop bound by its real costs (issue 19): three figures measured back to back in each round, the
    bare read + decode rate (the stage's loader alone: PNG shards -> uint8 batches in the auto-sized workers),
    the bare encode rate (encoder + the auto lookup on ready float batches) and the stage's encode loop (loader ->
    encode -> records written on the writer thread), and the ratio stage / min(read+decode, encode), median over
    rounds. Target >= 0.85. Run twice: with the default VQGAN (the encoder is the bound on a CPU) and with the
    tiny preset's encoder (ch 8), which stands in for a fast GPU encoder, so reading and decoding become the
    bound. Then the whole default stage once (`run`: + setup, merge, shards, round-trip check, metrics), whose
    fixed costs only amortise on a real dataset;
(c) readers over a 70k-record store of the default 8x8 grid: LMDB random reads (TokenLMDBDataset) and
    WebDataset streaming (token_webdataset). Target: >= 50k samples/s each.

Uses data/vqgan when it exists, else a random-init VQGAN with params.yaml's model config (throughput does not
depend on the weights), and the Fashion-MNIST IDX files when installed, else random images.

Usage: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_tokenize.py [--images 4096] [--rounds 5]
       [--batch-size 256]
(one torch thread + one decode worker + the writer thread: the work spread over a 2-core machine's cores)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from models.quantizer import nearest_codes  # noqa: E402
from models.vqgan import VQGAN, VQGANConfig  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.prepared import PreparedImages  # noqa: E402
from pipeline.tokens import (FORMAT, LMDBWriter, TokenLMDBDataset, encode_records,  # noqa: E402
                             token_webdataset)
from pipeline.vqgan_io import load_vqgan, save_vqgan  # noqa: E402
from pipeline.runlog import read_run_facts  # noqa: E402
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams  # noqa: E402
from stages.prepare import run as prepare  # noqa: E402
from stages.tokenize import (CodeSearch, ImageBatches, TokenizeConfig, TokenizeParams, assemble,  # noqa: E402
                             encode_pending, loader_workers, resolve_search, run, to_model_input)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def best_of(fn, seconds: float = 1.0) -> float:
    """Fastest of repeated calls within `seconds` (after one warm-up): the least disturbed by other load."""
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_search(code_sizes: list[tuple[int, int]], n_vectors: int) -> None:
    import faiss
    print(f"(a) nearest-code search, {n_vectors} l2-normalised vectors (one batch of 256 8x8 grids)")
    print(f"    {'codebook':>10} {'torch ms':>9} {'faiss ms':>9} {'speed-up':>9} {'agree':>6}")
    for k, d in code_sizes:
        g = torch.Generator().manual_seed(0)
        z = F.normalize(torch.randn(n_vectors, d, generator=g), dim=1)
        codes = F.normalize(torch.randn(k, d, generator=g), dim=1)
        index = faiss.IndexFlatIP(d)
        index.add(codes.numpy())
        t_torch = best_of(lambda: nearest_codes(z, codes))
        t_faiss = best_of(lambda: index.search(z.numpy(), 2))
        agree = float((nearest_codes(z, codes).numpy() == index.search(z.numpy(), 2)[1][:, 0]).mean())
        print(f"    {k:>6} x {d:<2} {1e3 * t_torch:9.1f} {1e3 * t_faiss:9.1f} {t_torch / t_faiss:8.1f}x {agree:6.3f}")


def make_vqgan(folder: Path, tiny: bool) -> tuple[Path, str]:
    """The trained default VQGAN (data/vqgan) when there is one, else a random init of params.yaml's model config
    (throughput does not depend on the weights); tiny: the tiny preset's 4x smaller encoder (ch 8), which stands
    in for a fast (GPU) encoder so that reading and decoding become the bound."""
    if not tiny and (ROOT / "data" / "vqgan" / "config.json").is_file():
        return ROOT / "data" / "vqgan", "the trained default (data/vqgan)"
    raw = dict(load_params(ROOT / "params.yaml")["train_vqgan"]["model"])
    if tiny:
        raw.update(load_params(ROOT / "configs" / "tiny.yaml")["train_vqgan"]["model"])
    raw["ch_mult"] = tuple(raw["ch_mult"])
    torch.manual_seed(0)
    save_vqgan(folder, VQGAN(VQGANConfig(**raw)), {"resolution": 32})
    return folder, ("the tiny preset's (ch 8)" if tiny else "params.yaml's") + " config, random init"


def make_prepared(root: Path, n: int) -> Path:
    if FASHION.is_dir():
        spec = DatasetSpec(source="idx", path=str(FASHION), resolution=32, channels=1, max_per_split=n // 2)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_idx_dataset
        spec = DatasetSpec(source="idx", path=str(make_idx_dataset(root / "idx", n // 2, n // 2)), resolution=32,
                           channels=1)
    prepare(PrepareConfig("bench", spec, PrepareParams(out_dir=str(root / "prepared"))))
    return root / "prepared" / "bench"


def bench_throughput(root: Path, prepared: Path, batch: int, rounds: int, tiny: bool) -> None:
    """The three costs of the encode loop, each alone, and the loop itself, in paired rounds."""
    vqgan_dir, which = make_vqgan(root / ("vqgan-tiny" if tiny else "vqgan"), tiny)
    model, _ = load_vqgan(vqgan_dir)
    cpu = torch.device("cpu")
    splits = [PreparedImages(prepared, s) for s in ("train", "val")]
    keys = [[e.key.encode() for e in d.entries] for d in splits]
    items = [(s, i) for s, d in enumerate(splits) for i in range(len(d))]
    images = torch.cat([d.load_all()[0] for d in splits])
    inputs = [to_model_input(chunk, model.cfg.in_channels, cpu) for chunk in images.split(batch)]
    method = resolve_search("auto", cpu)
    search = CodeSearch(model, method, cpu)
    workers = loader_workers("auto", cpu)
    print(f"(b) encode loop, {len(items)} images 32x32, batch {batch}, VQGAN: {which}; {method} lookup, "
          f"torch threads {torch.get_num_threads()}, loader workers {workers} (auto), {os.cpu_count()} cores")

    def read_decode() -> float:  # the loader alone: the same workers, prefetch and batches as the stage
        t = time.perf_counter()
        loader = torch.utils.data.DataLoader(ImageBatches(splits, items, batch), batch_size=None,
                                             num_workers=workers, prefetch_factor=4 if workers else None)
        assert sum(len(x) for x, _ in loader) == len(items)
        return len(items) / (time.perf_counter() - t)

    def encode() -> float:  # the encoder + lookup alone, on ready float batches
        t = time.perf_counter()
        for x in inputs:
            search(x)
        return len(items) / (time.perf_counter() - t)

    def stage_loop(tag: str) -> float:
        p = TokenizeParams(batch_size=batch, num_workers="auto")
        n_done, seconds = encode_pending(model, search, splits, keys, items, root / f"part-{tag}.lmdb", p, cpu,
                                         show=False)
        (root / f"part-{tag}.lmdb").unlink()
        assert n_done == len(items)
        return len(items) / seconds

    encode(), read_decode()  # warm-up
    rows = []
    for r in range(rounds):  # each round measures all three back to back: drifting load hits them alike
        d, e, st = read_decode(), encode(), stage_loop(f"{int(tiny)}-{r}")
        rows.append((d, e, st, st / min(d, e)))
    d, e, st, ratio = (float(np.median(c)) for c in zip(*rows))
    print(f"    bare read + decode ({workers} worker{'s' * (workers != 1)})   {d:9.1f} images/s")
    print(f"    bare encode + lookup               {e:9.1f} images/s")
    print(f"    stage encode loop                  {st:9.1f} images/s")
    print(f"    ratio stage / min(read+decode, encode): median {ratio:.3f} (rounds: "
          f"{', '.join(f'{x[3]:.2f}' for x in rows)}; target >= 0.85); bound: "
          f"{'read + decode' if d < e else 'encode'}")
    if tiny:
        return
    metrics = root / "metrics.json"
    t = time.perf_counter()
    run(TokenizeConfig("bench", prepared, vqgan_dir, root / "tokens" / "bench", metrics, root / "usage.png",
                       TokenizeParams(batch_size=batch)))
    whole = time.perf_counter() - t
    m = json.loads((root / "tokens" / "bench" / "metrics.json").read_text())
    facts = read_run_facts(metrics)
    print(f"    whole stage (run: + setup, merge, shards, round trip of {m['roundtrip']['images']}, metrics) "
          f"{len(items) / whole:8.1f} images/s; seconds by phase: {facts['seconds']} of {whole:.1f} s: the fixed "
          f"costs shrink with the dataset")


def build_store(root: Path, n: int, grid: int, n_codes: int) -> Path:
    """A store of n random 8x8 grids written through the stage's own part -> assemble path."""
    work = root / "readstore"
    keys = [f"train_{i:06d}".encode() for i in range(n)]
    rng = np.random.default_rng(0)
    (work / "parts").mkdir(parents=True)
    with LMDBWriter(work / "parts" / "part-00000.lmdb") as w:
        for s in range(0, n, 4096):
            g = rng.integers(0, n_codes, (min(4096, n - s), grid, grid))
            w.put_batch(list(zip(keys[s:s + 4096], encode_records(g, rng.integers(0, 10, len(g)), [0] * len(g),
                                                                  [0] * len(g), 1))))
    meta = {"format": FORMAT, "fingerprint": "0" * 64, "grid": [grid, grid], "dtype_code": 1, "dtype": "uint16",
            "hflip": False, "count": n, "n_codes": n_codes, "splits": ["train"], "counts": {"train": n}}
    assemble(work, meta, {"train": keys}, 10000)
    return work / "out"


def bench_readers(root: Path, n: int) -> None:
    store = build_store(root, n, 8, 512)
    print(f"(c) readers, {n} records of an 8x8 uint16 grid (target >= 50000 samples/s)")
    perm = np.random.default_rng(1).permutation(n).tolist()

    def rate(fn) -> float:
        t = time.perf_counter()
        count = fn()
        return count / (time.perf_counter() - t)

    ds = TokenLMDBDataset(store)
    rows = [
        ("LMDB ds[i], random order", rate(lambda: sum(1 for i in perm if ds[i] is not None))),
        ("LMDB get_batch(256 random)", rate(lambda: sum(len(ds.get_batch(perm[i:i + 256])[0])
                                                         for i in range(0, n, 256)))),
        ("LMDB DataLoader shuffle b256 w0", rate(lambda: sum(len(b[0]) for b in torch.utils.data.DataLoader(
            ds, batch_size=256, shuffle=True, num_workers=0)))),
        ("LMDB DataLoader shuffle b256 w2", rate(lambda: sum(len(b[0]) for b in torch.utils.data.DataLoader(
            ds, batch_size=256, shuffle=True, num_workers=2)))),
        ("WebDataset samples, shuffle 1000", rate(lambda: sum(1 for _ in token_webdataset(store, "train")))),
        ("WebDataset batches b256, shuffle 1000", rate(lambda: sum(len(b[0]) for b in token_webdataset(
            store, "train", batch_size=256)))),
        ("WebDataset b256 DataLoader w2", rate(lambda: sum(len(b[0]) for b in torch.utils.data.DataLoader(
            token_webdataset(store, "train", batch_size=256), batch_size=None, num_workers=2)))),
    ]
    for name, r in rows:
        print(f"    {name:<40} {r:10.0f} samples/s   ratio to target {r / 50000:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096, help="images per throughput pass")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (read+decode, encode, stage loop) passes")
    ap.add_argument("--records", type=int, default=70000, help="records in the reader benchmark store")
    args = ap.parse_args()
    import logging
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_search([(512, 8), (1024, 16), (4096, 8)], n_vectors=args.batch_size * 64)
        prepared = make_prepared(root, args.images)
        for tiny in (False, True):
            bench_throughput(root, prepared, args.batch_size, args.rounds, tiny)
        bench_readers(root, args.records)


if __name__ == "__main__":
    main()
