"""Stage `tokenize`: prepared image shards -> code-index grids with the trained VQGAN (the token store).

One DVC stage per dataset (`tokenize@<name>`, a foreach over `datasets:`), so adding a dataset tokenizes only
that dataset with the existing VQGAN. Output `<out_dir>/<name>/` (format: pipeline/tokens.py): tokens.lmdb,
shards/<split>-%06d.tar + sizes.json, meta.json, metrics.json (bytes per image, round-trip check, code usage).
Metrics `<metrics_dir>/tokenize_<name>.json` (the columns images, perplexity, usage_pct) and
`<plots_dir>/tokenize_<name>_code_usage.png`.

Resume. Work happens in `<out_dir>/.<name>.partial/`, which is not a DVC out, so DVC leaves it alone:
  run.json               what the parts are made from (VQGAN and dataset fingerprints, hflip, channels)
  parts/part-%05d.lmdb   each rank's records, one LMDB transaction per batch: a kill keeps whole batches only
  out/                   the final folder, assembled by rank 0 from the parts, renamed to <name>/ when complete
A re-run whose run.json matches skips every sample already in a part (so each input gets exactly one record);
one that does not match starts over. The final folder only ever appears complete.

Scale-out: `torchrun --nproc_per_node N -m stages.tokenize --dataset <name>` (add --nnodes/--node_rank/
--rdzv_endpoint for several machines sharing the data folder). Rank r encodes the r-th contiguous block of the
samples into its own part; rank 0 merges the parts into one LMDB in key order and writes the shards in dataset
order, so the store has the same bytes whatever the number of ranks.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lmdb
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.quantizer import nearest_codes
from models.vqgan import VQGAN
from pipeline.atomic import atomic_path, read_json, check_replaceable, replace_dir, write_json
from pipeline.config import check_dataset_name, from_dict, load_params, param
from pipeline.errors import UserError
from pipeline.images import decode_png
from pipeline.stage_cli import run_stage_cli
from pipeline.runlog import headline, run_log_path, write_metrics
from pipeline.codegraph import code_fingerprint
from pipeline.locks import exclusive
from pipeline.prepared import PreparedImages, read_manifest
from pipeline.tokens import (DTYPE_CODES, DTYPE_NAMES, FLAG_HFLIP, FORMAT, HEADER_SIZE, HFLIP_SUFFIX, KEYS_PREFIX,
                             LMDB_NAME, META_KEY, RECORD_VERSION, SHARDS_DIR, LMDBWriter, TokenLMDBDataset,
                             decode_batch, dtype_code, encode_records, iter_merged, read_keys, write_token_shards)
from pipeline.device import init_distributed, pick_device
from pipeline.vqgan_io import load_vqgan, to_model_range

log = logging.getLogger("tokenmill.tokenize")
SECTIONS = ("tokenize",)
HEADLINE = {"images": "images", "perplexity": "code_usage.perplexity"}  # + usage_pct, the share of codes in use
# faiss and torch may round a distance differently in the last bit; where the two best codes are closer than
# this, the torch lookup decides, so faiss tokens equal model.encode's exactly (ties -> lowest index, as argmin)
TIE_TOL = 1e-5
DISK_FULL_BYTES = 16 << 20  # a write that failed with less free space than this failed for want of space


@dataclass
class TokenizeParams:
    """params.yaml `tokenize:` (shared by every dataset)."""
    prepared_dir: str = "data/prepared"  # input: <prepared_dir>/<dataset>
    vqgan_dir: str = "data/vqgan"  # model.safetensors + config.json from train_vqgan
    out_dir: str = param("data/tokens", kind="out_path")  # output: <out_dir>/<dataset>
    metrics_dir: str = param("data/metrics", kind="out_path")  # tokenize_<dataset>.json
    plots_dir: str = param("data/plots", kind="out_path")  # tokenize_<dataset>_code_usage.png
    batch_size: int = param(256, min=1)
    shard_size: int = param(10000, min=1)  # samples per token shard
    hflip: bool = False  # also store a horizontally flipped copy of every image (key suffix _hflip)
    search: Literal["auto", "faiss", "torch"] = "auto"  # nearest-code lookup; auto: the faster on this device
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int | Literal["auto"] = "auto"  # image-decoding loader processes; auto: sized to the device
    map_size_mb: int = param(64, min=1)  # initial LMDB map; it grows on demand
    max_map_mb: float | None = param(None, min=0.01)  # ceiling for the map (a quota, a shared disk); null: none
    roundtrip_images: int = param(256, min=0)  # images whose decoded tokens must equal the VQGAN's reconstructions


@dataclass
class TokenizeConfig:
    name: str  # dataset name: the output folder's name
    prepared: Path  # prepared dataset folder (manifest.json + shards)
    vqgan: Path
    out: Path
    metrics: Path | None = None
    plot: Path | None = None
    params: TokenizeParams = field(default_factory=TokenizeParams)
    convert_channels: bool = False  # grey <-> RGB when the dataset's channels differ (datasets.<name>.convert_channels)


def max_map(p: TokenizeParams) -> int | None:
    return None if p.max_map_mb is None else int(p.max_map_mb * 2**20)


def check(params: dict, source: str) -> TokenizeParams:
    if "convert_channels" in (params.get("tokenize") or {}):  # moved: one dataset's choice re-runs only its stage
        raise UserError(f"{source}: tokenize.convert_channels is now per dataset: set datasets.<name>.convert_channels "
                        f"on the dataset that needs it and remove it from tokenize")
    if "tokenize" not in params:
        raise UserError(f"{source}: missing section 'tokenize'")
    return params_from(params["tokenize"], source)


def params_from(raw: dict, source: str) -> TokenizeParams:
    """The `tokenize` section (or the same keys from `pipeline tokenize`'s options), validated."""
    p = from_dict(TokenizeParams, raw, "tokenize", source)
    if p.num_workers != "auto" and p.num_workers < 0:
        raise UserError(f"{source}: tokenize.num_workers = {p.num_workers} is out of range (allowed: 'auto' or >= 0)")
    return p


def load_config(params_path: str, name: str) -> TokenizeConfig:
    check_dataset_name(name, "--dataset")
    params = load_params(params_path)
    p = check(params, params_path)
    datasets = params.get("datasets") or {}
    if name not in datasets:
        raise UserError(f"{params_path}: no dataset '{name}' under datasets (have: {', '.join(datasets) or 'none'})")
    convert = (datasets[name] or {}).get("convert_channels", False)
    if not isinstance(convert, bool):
        raise UserError(f"{params_path}: datasets.{name}.convert_channels = {convert!r} must be true or false")
    return TokenizeConfig(name, Path(p.prepared_dir) / name, Path(p.vqgan_dir), Path(p.out_dir) / name,
                          Path(p.metrics_dir) / f"tokenize_{name}.json",
                          Path(p.plots_dir) / f"tokenize_{name}_code_usage.png", p, convert)


# ---------------------------------------------------------------- encoding

def to_model_input(images: torch.Tensor, channels: int, device: torch.device) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1] as the VQGAN was trained on, with `channels` channels."""
    x = images.to(device, non_blocking=True)
    if x.shape[1] != channels:
        if channels == 3:  # grey -> RGB: the same value in every channel
            x = x.expand(-1, 3, -1, -1)
        else:  # RGB -> grey with PIL's integer luma, i.e. what `prepare` makes with channels: 1
            r, g, b = x.to(torch.int32).unbind(1)
            x = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
    return to_model_range(x)


def resolve_search(method: str, device: torch.device) -> str:
    """auto -> faiss on CPU: bench/bench_tokenize.py measured faiss IndexFlatIP (k=2) ~7x faster than the torch
    matmul-argmin on this project's 2-core CPU (17 vs 123 ms for 16k vectors x 512 codes; the lookup is ~10% of
    the encode). On CUDA the torch lookup stays on the GPU with no copy and faiss-gpu is not measured (no GPU
    here), so auto -> torch there."""
    if method != "auto":
        return method
    return "faiss" if device.type == "cpu" else "torch"


class CodeSearch:
    """Images -> code-index grids [B, h, w], equal to `model.encode(x)[1]`.

    'torch' runs the quantizer's own forward. 'faiss' runs the encoder, then a flat index over the lookup
    codebook (inner product for l2-normalised codes: on unit vectors the largest dot product is the smallest
    L2 distance), asking for the best two codes so near-ties can be re-decided by the torch lookup.
    """

    def __init__(self, model: VQGAN, method: str, device: torch.device):
        self.model, self.method = model, method
        if method == "faiss":
            self._build_index(device)

    def _build_index(self, device: torch.device) -> None:
        import faiss

        q = self.model.quantizer
        self.codes = q.codes().detach().float()
        self.ip = q.l2_norm
        index = (faiss.IndexFlatIP if self.ip else faiss.IndexFlatL2)(self.codes.shape[1])
        index.add(np.ascontiguousarray(self.codes.cpu().numpy()))
        self.gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self.gpu:  # faiss-gpu build: search GPU tensors in place
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)
            self._res = faiss.StandardGpuResources()
            gpu_id = device.index if device.index is not None else torch.cuda.current_device()
            index = faiss.index_cpu_to_gpu(self._res, gpu_id, index)
        elif device.type == "cuda":
            log.warning("faiss has no GPU support here (faiss-cpu): code search runs on the CPU")
        self.index = index

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "torch":
            return self.model.encode(x)[1]
        q = self.model.quantizer
        z = q.in_proj(self.model.encode_latent(x))
        B, D, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # the same ops as VectorQuantizer.forward: same bits
        if q.l2_norm:
            z_flat = F.normalize(z_flat, dim=1)
        k = min(2, q.n_codes)
        if self.gpu:
            scores, idx = self.index.search(z_flat.float().contiguous(), k)
        else:
            s_np, i_np = self.index.search(np.ascontiguousarray(z_flat.float().cpu().numpy()), k)
            scores, idx = torch.from_numpy(s_np).to(z.device), torch.from_numpy(i_np).to(z.device)
        best = idx[:, 0].long()
        if k == 2:
            gap = scores[:, 0] - scores[:, 1] if self.ip else scores[:, 1] - scores[:, 0]
            tie = gap <= TIE_TOL * (1 + scores[:, 0].abs())
            if bool(tie.any()):
                best[tie] = nearest_codes(z_flat[tie], self.codes.to(z.device))
        return best.view(B, h, w)


class ImageBatches(Dataset):
    """Batch b of `items` (consecutive (split, index) pairs), read and decoded in a loader worker into one uint8
    tensor [B, C, H, W]: one transfer per batch instead of one per image plus a collate in the main process."""

    def __init__(self, splits: list[PreparedImages], items: list[tuple[int, int]], batch_size: int):
        self.splits, self.items, self.batch_size = splits, items, batch_size
        m = splits[0].manifest
        self.shape = (m["channels"], m["resolution"], m["resolution"])

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, int]:
        chunk = self.items[b * self.batch_size:(b + 1) * self.batch_size]
        out = np.empty((len(chunk), *self.shape), np.uint8)
        for k, (s, i) in enumerate(chunk):
            out[k] = decode_png(self.splits[s].read_png(i)).transpose(2, 0, 1)  # (H, W, C); a wrong size fails
        # plain NCHW strides, as torch.stack of single images gives: with C = 1, a batch built by permuting an
        # NHWC array is also "contiguous" but carries channels-last strides, and the convolutions then take
        # another kernel whose rounding moves a few near-tie tokens (15 of 70k on Fashion-MNIST)
        return torch.from_numpy(out), b * self.batch_size


def loader_workers(setting: int | str, device: torch.device) -> int:
    """auto: on CUDA the encoder waits on decoding, so every core but one decodes (at most 8); on the CPU the
    encoder takes the cores and PNG decoding costs ~10% of its time (bench/bench_tokenize.py), so one worker keeps
    decoding off the encoder's thread without taking a core from it."""
    if setting != "auto":
        return int(setting)
    if device.type == "cuda":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 1


class BackgroundWriter:
    """Packs records and writes them to an LMDB part on one thread while the next batch encodes (LMDB and the
    fsync release the GIL). Each batch stays one transaction, in order; at most `depth` batches wait. An error on
    the thread is raised in the caller at the next put or at the end, and nothing after it is written."""

    def __init__(self, writer: LMDBWriter, depth: int = 2):
        self.writer, self.depth = writer, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")
        self.pending: deque[Future] = deque()
        self.failed = False

    def put(self, make_records, *args) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, make_records, args))

    def _write(self, make_records, args) -> None:
        if self.failed:  # batches queued behind a failed one are not written: the store ends at the failure
            return
        try:
            self.writer.put_batch(make_records(*args))
        except BaseException:
            self.failed = True
            raise

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the queued batches; raise_errors=False when the caller is already failing (its error wins)."""
        try:
            while self.pending:
                future = self.pending.popleft()
                if raise_errors:
                    future.result()
                else:
                    future.exception()
        finally:
            self.pool.shutdown(wait=True)


def compat_problem(res: int, ch: int, want: int | None, f: int, in_ch: int, convert_channels: bool) -> str | None:
    """Why images of `res` px and `ch` channels cannot become tokens of a VQGAN trained at `want` px (None: not
    recorded) with downsampling `f` and `in_ch` input channels; None when they can. Read by this stage and, from
    params before anything runs, by `pipeline run` and the flow (pipeline/runs.py)."""
    if want is not None and res != want:
        return (f"resolution {res} differs from the VQGAN's training resolution {want}; prepare this dataset at "
                f"resolution {want} or train a VQGAN for it")
    if res % f:
        return f"resolution {res} is not divisible by the VQGAN's downsampling {f}"
    if ch != in_ch and not convert_channels:
        return (f"images have {ch} channel(s), the VQGAN takes {in_ch}; set convert_channels: true in its datasets "
                f"entry (grey <-> RGB; `pipeline tokenize --convert-channels`) or prepare the dataset with "
                f"channels: {in_ch}")
    return None


def check_compat(manifest: dict, model: VQGAN, vqgan_meta: dict, convert_channels: bool, prepared: Path,
                 vqgan_dir: Path) -> None:
    """Refuse datasets the VQGAN cannot tokenize into the grid it was trained for."""
    why = compat_problem(manifest["resolution"], manifest["channels"], vqgan_meta.get("resolution"),
                         model.cfg.downsample, model.cfg.in_channels, convert_channels)
    if why:
        raise UserError(f"{prepared}: {why} (the VQGAN in {vqgan_dir})")


def encode_pending(model: VQGAN, search: CodeSearch, splits: list[PreparedImages], keys: list[list[bytes]],
                   items: list[tuple[int, int]], part: Path, p: TokenizeParams, device: torch.device,
                   show: bool) -> tuple[int, float]:
    """Encode `items` into the LMDB file `part`, one transaction per batch. Returns (images, seconds).

    Three things overlap: loader workers read and decode the next batches, this thread encodes, and a writer
    thread packs and stores the previous batch."""
    if not items:
        return 0, 0.0
    in_ch, code = model.cfg.in_channels, dtype_code(model.cfg.n_codes)
    labels = [[e.label for e in d.entries] for d in splits]
    workers = loader_workers(p.num_workers, device)
    loader = DataLoader(ImageBatches(splits, items, p.batch_size), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    batches = iter(loader)  # workers fork here, before this process opens its LMDB writer

    def records(grids: np.ndarray, batch: list[tuple[int, int]]) -> list[tuple[bytes, bytes]]:
        n = len(batch)
        split_codes = [s for s, _ in batch]
        batch_labels = [labels[s][i] for s, i in batch]
        batch_keys = [keys[s][i] for s, i in batch]
        out = list(zip(batch_keys, encode_records(grids[:n], batch_labels, split_codes, [0] * n, code)))
        if p.hflip:
            flipped = encode_records(grids[n:], batch_labels, split_codes, [FLAG_HFLIP] * n, code)
            out += zip((k + HFLIP_SUFFIX.encode() for k in batch_keys), flipped)
        return out

    bar = tqdm(total=len(items), desc="tokenize", unit="img", disable=not show, mininterval=2.0, file=sys.stderr)
    t0 = time.monotonic()
    with LMDBWriter(part, p.map_size_mb << 20, max_map_size=max_map(p)) as lmdb_writer:
        writer = BackgroundWriter(lmdb_writer)
        try:
            for images, start in batches:
                x = to_model_input(images, in_ch, device)
                if p.hflip:
                    x = torch.cat([x, x.flip(-1)])
                batch = items[start:start + len(images)]
                writer.put(records, search(x).cpu().numpy(), batch)
                bar.update(len(batch))
        except BaseException:
            writer.finish(raise_errors=False)
            raise
        writer.finish()
    bar.close()
    return len(items), time.monotonic() - t0


# ---------------------------------------------------------------- assembling the store (rank 0)

def start_work(work: Path, identity: dict) -> None:
    """Keep the parts of an interrupted run made from the same inputs; otherwise start an empty work folder."""
    run_file = work / "run.json"
    if work.exists():
        try:
            same = read_json(run_file) == identity
        except (OSError, ValueError):
            same = False
        if same:
            log.info("resuming from %s", work)
            shutil.rmtree(work / "out", ignore_errors=True)  # rebuilt from the parts at the end
            return
        log.info("discarding %s: made from other inputs", work)
        shutil.rmtree(work)
    (work / "parts").mkdir(parents=True)
    write_json(run_file, identity)


def assemble(work: Path, meta: dict, order: dict[str, list[bytes]], shard_size: int,
             max_map_size: int | None = None) -> np.ndarray:
    """Merge the parts into out/tokens.lmdb (key order), add the key lists and meta, write the shards.
    Returns per-code counts over the original (unflipped) records."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    h, w = meta["grid"]
    code, hflip = meta["dtype_code"], meta["hflip"]
    expected = meta["count"]
    record_len = HEADER_SIZE + h * w * DTYPE_CODES[code].itemsize
    counts = np.zeros(meta["n_codes"], np.int64)
    n = 0
    parts = sorted((work / "parts").glob("part-*.lmdb"))
    # a map large enough for the usual case; LMDBWriter grows it if not. No fsync until the end.
    with LMDBWriter(out / LMDB_NAME, map_size=(2 * expected * (record_len + 48)) + (1 << 20), sync=False,
                    max_map_size=max_map_size) as writer:
        for batch in iter_merged(parts):
            writer.put_batch(batch, append=True)
            grids, _, header = decode_batch([v for _, v in batch], h, w, code)
            originals = grids[(header["flags"] & FLAG_HFLIP) == 0]
            counts += np.bincount(originals.ravel(), minlength=meta["n_codes"])
            n += len(batch)
        if n != expected:
            raise RuntimeError(f"{work}: the parts hold {n} records, expected {expected}; delete the folder and re-run")
        writer.put_batch([(KEYS_PREFIX + s.encode(), b"\n".join(k)) for s, k in order.items()]
                     + [(META_KEY, json.dumps(meta, sort_keys=True).encode())])
    # every expected key is read back here, so count + keys prove exactly one record per input
    write_token_shards(out / LMDB_NAME, out / SHARDS_DIR, order, shard_size, hflip)
    write_json(out / "meta.json", meta)
    return counts


@torch.no_grad()
def roundtrip_check(model: VQGAN, lmdb_path: Path, splits: list[PreparedImages], items: list[tuple[int, int]],
                    n: int, batch: int, device: torch.device, hflip: bool) -> dict:
    """Decode stored tokens of n images spread over the dataset and compare with the VQGAN's reconstructions
    (and the stored tokens with model.encode's): both must be exact."""
    if n == 0 or not items:
        return {"images": 0, "exact": None}
    store = TokenLMDBDataset(lmdb_path, hflip=hflip)  # split=None: index j is items[j], flips at j + len(items)
    pick = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(np.int64))
    mismatches, max_diff, exact = 0, 0.0, True
    for chunk in np.array_split(pick, math.ceil(len(pick) / batch)):
        images = torch.stack([splits[s][i][0] for s, i in (items[j] for j in chunk)])
        x = to_model_input(images, model.cfg.in_channels, device)
        variants = [(x, chunk)] + ([(x.flip(-1), chunk + len(items))] if hflip else [])
        for xv, positions in variants:
            recon, aux = model(xv)
            stored = store.get_batch(positions.tolist())[0].to(device)
            mismatches += int((stored != aux["indices"]).sum())
            decoded = model.decode_indices(stored)
            exact = exact and torch.equal(decoded, recon)
            max_diff = max(max_diff, float((decoded - recon).abs().max()))
    return {"images": len(pick), "hflip_checked": hflip, "token_mismatches": mismatches,
            "max_abs_diff": max_diff, "exact": exact and mismatches == 0}


def usage_summary(counts: np.ndarray) -> dict:
    total = counts.sum()
    probs = counts[counts > 0] / max(1, total)
    used = int((counts > 0).sum())
    return {"used_codes": used, "usage_fraction": used / len(counts), "dead_codes": len(counts) - used,
            "perplexity": float(np.exp(-(probs * np.log(probs)).sum())) if total else 0.0}


def plot_usage(path: Path, counts: np.ndarray, title: str, stamp: Path | None = None) -> None:
    """Tokens per code, by code index and sorted (rank-frequency): dead and dominant codes stand out. `stamp`: the
    run log written just before, whose times the plot takes (see `atomic_path`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.bar(np.arange(len(counts)), counts, width=1.0, color="#3b6ea5")
    a.set_xlabel("code index"), a.set_ylabel("tokens"), a.set_title(f"{title}: tokens per code")
    b.plot(np.sort(counts)[::-1] + 1, color="#3b6ea5")  # +1: dead codes stay visible on the log axis
    b.set_yscale("log"), b.set_xlabel("codes, most used first"), b.set_ylabel("tokens + 1")
    b.set_title(f"{usage_summary(counts)['dead_codes']} dead of {len(counts)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, stamp=stamp) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _sum_over_ranks(values: list[float], world: int, op: str = "sum") -> list[float]:
    if world == 1:
        return values
    import torch.distributed as tdist
    t = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------- the stage

def run(cfg: TokenizeConfig) -> None:
    check_replaceable(cfg.out, "tokenize")
    # One writer per store: a second run into the same folder stops with one line (rank 0 holds the lock).
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with exclusive(cfg.out.parent / f".{cfg.out.name}.lock", f"token store {cfg.out}") if main_rank \
            else contextlib.nullcontext():
        try:
            _run(cfg)
        except (lmdb.Error, OSError) as exc:
            # LMDB reports a full disk as "Input/output error" and some writes name no file: say where, and why
            free = shutil.disk_usage(cfg.out.parent).free
            if free < DISK_FULL_BYTES or getattr(exc, "errno", None) == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device while writing the token store "
                              f"({free / 2**20:.1f} MB free; the finished batches are kept and a re-run resumes)",
                              str(cfg.out.parent / f".{cfg.out.name}.partial")) from None
            raise


def _run(cfg: TokenizeConfig) -> None:
    p = cfg.params
    t_start = time.monotonic()
    device = pick_device(p.device)
    dist = init_distributed(device)
    model, vmeta = load_vqgan(cfg.vqgan, device)
    manifest = read_manifest(cfg.prepared)
    check_compat(manifest, model, vmeta, cfg.convert_channels, cfg.prepared, cfg.vqgan)
    split_names = sorted(manifest["splits"])
    splits = [PreparedImages(cfg.prepared, s) for s in split_names]
    keys = [[e.key.encode() for e in d.entries] for d in splits]
    items = [(s, i) for s, d in enumerate(splits) for i in range(len(d))]
    all_keys = [k for ks in keys for k in ks]
    bad = next((k for k in all_keys if k.startswith(b"__") or k.endswith(HFLIP_SUFFIX.encode())), None)
    if bad is not None or len(set(all_keys)) != len(all_keys):
        raise UserError(f"{cfg.prepared}: sample key {bad!r} is reserved or keys repeat across splits")

    fp = vmeta["fingerprint"]
    f = model.cfg.downsample
    grid = [manifest["resolution"] // f, manifest["resolution"] // f]
    code = dtype_code(model.cfg.n_codes)
    identity = {"format": FORMAT, "fingerprint": fp, "dataset_fingerprint": manifest["fingerprint"],
                "hflip": p.hflip, "channels": [manifest["channels"], model.cfg.in_channels],
                "code": code_fingerprint("stages.tokenize")[:16]}  # parts from other code are not reused
    work = cfg.out.parent / f".{cfg.out.name}.partial"
    if dist.main:
        start_work(work, identity)
    dist.barrier()
    done: set[bytes] = set()
    for part in sorted((work / "parts").glob("part-*.lmdb")):
        done |= read_keys(part)
    dist.barrier()  # every rank has read the parts before any rank writes to its own
    lo, hi = len(items) * dist.rank // dist.world, len(items) * (dist.rank + 1) // dist.world
    pending = [items[j] for j in range(lo, hi) if keys[items[j][0]][items[j][1]] not in done]
    method = resolve_search(p.search, device)
    if dist.main:
        log.info("%s: %d images, %d to encode (%s search on %s, %d rank(s))", cfg.name, len(items),
                 len(pending), method, device.type, dist.world)
    encoded, seconds = encode_pending(model, CodeSearch(model, method, device), splits, keys, pending,
                                      work / "parts" / f"part-{dist.rank:05d}.lmdb", p, device, dist.main)
    encoded, = _sum_over_ranks([encoded], dist.world)
    seconds, = _sum_over_ranks([seconds], dist.world, op="max")
    dist.barrier()
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.destroy_process_group()
    if not dist.main:
        return

    meta = {"format": FORMAT, "record_version": RECORD_VERSION, "fingerprint": fp, "dataset": cfg.name,
            "dataset_fingerprint": manifest["fingerprint"], "vqgan": str(cfg.vqgan),
            "vqgan_dataset": vmeta.get("dataset"), "n_codes": model.cfg.n_codes, "grid": grid,
            "dtype": DTYPE_NAMES[code], "dtype_code": code, "resolution": manifest["resolution"],
            "channels": model.cfg.in_channels, "source_channels": manifest["channels"], "splits": split_names,
            "counts": {s: len(d) for s, d in zip(split_names, splits)}, "hflip": p.hflip,
            "hflip_suffix": HFLIP_SUFFIX, "count": len(items) * (2 if p.hflip else 1), "shard_size": p.shard_size}
    order = dict(zip(split_names, keys))
    t_merge = time.monotonic()
    counts = assemble(work, meta, order, p.shard_size, max_map(p))
    t_check = time.monotonic()
    out = work / "out"
    roundtrip = roundtrip_check(model, out / LMDB_NAME, splits, items, p.roundtrip_images, p.batch_size, device,
                                p.hflip)
    if roundtrip["exact"] is False:
        raise RuntimeError(f"round-trip check failed for {cfg.name}: {roundtrip}; the store was not published")
    records = meta["count"]
    shard_bytes = sum(t.stat().st_size for t in (out / SHARDS_DIR).glob("*.tar"))
    metrics = {
        "dataset": cfg.name, "images": len(items), "records": records, "per_split": meta["counts"],
        "grid": grid, "dtype": meta["dtype"], "n_codes": model.cfg.n_codes, "hflip": p.hflip,
        "fingerprint": fp,
        "bytes_per_image": {"lmdb": round((out / LMDB_NAME).stat().st_size / records, 1),
                            "shards": round(shard_bytes / records, 1),
                            "grid": grid[0] * grid[1] * DTYPE_CODES[code].itemsize},
        "roundtrip": roundtrip, "code_usage": usage_summary(counts),
    }
    run_facts = {
        "search": method, "device": device.type, "ranks": dist.world,
        "encoded_this_run": int(encoded), "resumed_records": len(items) - int(encoded),
        "images_per_s": round(encoded / seconds, 1) if encoded and seconds > 0 else None,
        # where this run's time went: setup (model, shard index), encode loop, merge + shards, round-trip check
        "seconds": {"setup": round(t_merge - t_start - seconds, 2), "encode": round(seconds, 2),
                    "merge_and_shards": round(t_check - t_merge, 2),
                    "roundtrip_check": round(time.monotonic() - t_check, 2)},
    }
    write_json(out / "metrics.json", metrics)
    replace_dir(out, cfg.out, "tokenize")
    if cfg.metrics is not None:
        write_metrics(cfg.metrics, {**headline(metrics, HEADLINE),
                                    "usage_pct": 100 * metrics["code_usage"]["usage_fraction"]}, run_facts)
    if cfg.plot is not None:
        plot_usage(cfg.plot, counts, cfg.name, run_log_path(cfg.metrics) if cfg.metrics is not None else None)
    shutil.rmtree(work)
    log.info("tokenized %s: %d records, grid %dx%d %s, %s images/s, code usage %.1f%%, round-trip %s -> %s",
             cfg.name, records, grid[0], grid[1], meta["dtype"], run_facts["images_per_s"],
             100 * metrics["code_usage"]["usage_fraction"], "exact" if roundtrip["exact"] else "skipped", cfg.out)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, load_config=load_config)
