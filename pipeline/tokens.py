"""The token store: code-index grids in LMDB (random access) and WebDataset shards (streaming).

Layout of `data/tokens/<dataset>/`:
  tokens.lmdb      one LMDB file (no sub-folder, no lock file). One record per sample, key = sample key
                   (augmented records: key + "_hflip"), value = RECORD below; plus reserved keys
                   `__meta__` (JSON: format, codebook fingerprint, n_codes, grid [h, w], dtype, splits, counts
                   per split, count of records, hflip, dataset name + fingerprint, VQGAN path) and
                   `__keys__/<split>` (the split's original sample keys in dataset order, newline-separated), so
                   readers index a split without a scan.
  shards/<split>-%06d.tar   the same grids for streaming, in dataset order (each original followed by its
                   flipped copy): `{key}.cls` = label as decimal text, then `{key}.tok` = the grid alone
                   (h*w little-endian uint16 or int32, row-major; h, w, dtype in meta.json), as `sample` writes
  shards/sizes.json         {shard file name: samples}
  meta.json        the `__meta__` record as a file (for readers that only stream, and for people)

RECORD (little-endian, 16-byte header + grid; no pickle, no per-record JSON):
  offset size field
  0      4    magic b"TMTK"
  4      1    record version (1)
  5      1    dtype code: 1 = uint16 (codebooks with <= 65536 codes), 2 = int32
  6      1    flags: bit 0 = horizontally flipped copy (augmentation at tokenization time)
  7      1    split code: index into meta["splits"]
  8      4    label, int32
  12     2    grid height h, uint16
  14     2    grid width w, uint16
  16     h*w*itemsize   the index grid, row-major

LMDB rules followed here: writers use batched transactions and grow the map on MDB_MAP_FULL; readers open
read-only and lock-free, lazily in the process that reads, because an Environment must never cross a fork
(and one per file per process: py-lmdb refuses a second open of the same file).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import struct
from operator import itemgetter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import UserError
from pipeline.vqgan_io import check_fingerprint

FORMAT = "tokenmill.tokens/1"
MAGIC = b"TMTK"
RECORD_VERSION = 1
HEADER = struct.Struct("<4sBBBBiHH")
HEADER_SIZE = HEADER.size  # 16
# the same header as a numpy record, to build and parse many records at once
HEADER_DTYPE = np.dtype([("magic", "S4"), ("version", "u1"), ("dtype", "u1"), ("flags", "u1"), ("split", "u1"),
                         ("label", "<i4"), ("h", "<u2"), ("w", "<u2")])
assert HEADER_DTYPE.itemsize == HEADER_SIZE
DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
DTYPE_NAMES = {1: "uint16", 2: "int32"}
FLAG_HFLIP = 1
HFLIP_SUFFIX = "_hflip"
META_KEY = b"__meta__"
KEYS_PREFIX = b"__keys__/"
LMDB_NAME = "tokens.lmdb"
SHARDS_DIR = "shards"


class Record(NamedTuple):
    grid: np.ndarray  # [h, w], uint16 or int32
    label: int
    split: int
    flags: int


def dtype_code(n_codes: int) -> int:
    """uint16 holds indices 0..65535, so codebooks up to 65536 codes take 2 bytes per token."""
    return 1 if n_codes <= 65536 else 2


def encode_records(grids: np.ndarray, labels: Sequence[int], splits: Sequence[int], flags: Sequence[int],
                   code: int) -> list[bytes]:
    """Grids [B, h, w] (+ per-row label, split code, flags) -> B record values."""
    grids = np.asarray(grids)
    B, h, w = grids.shape
    dt = DTYPE_CODES[code]
    if grids.size and (grids.min() < 0 or (code == 1 and grids.max() > 65535)):
        raise ValueError(f"token indices out of range for {DTYPE_NAMES[code]}")
    header = np.zeros(B, HEADER_DTYPE)
    header["magic"], header["version"], header["dtype"] = MAGIC, RECORD_VERSION, code
    header["flags"], header["split"], header["label"] = flags, splits, labels
    header["h"], header["w"] = h, w
    rows = np.empty((B, HEADER_SIZE + h * w * dt.itemsize), np.uint8)
    rows[:, :HEADER_SIZE] = header.view(np.uint8).reshape(B, HEADER_SIZE)
    rows[:, HEADER_SIZE:] = grids.astype(dt).reshape(B, -1).view(np.uint8)
    return [r.tobytes() for r in rows]


def decode_record(value: bytes) -> Record:
    """One record value -> Record; refuses anything that is not a version-1 token record."""
    if len(value) < HEADER_SIZE:
        raise ValueError(f"token record too short ({len(value)} bytes)")
    magic, version, code, flags, split, label, h, w = HEADER.unpack_from(value)
    if magic != MAGIC or version != RECORD_VERSION or code not in DTYPE_CODES:
        raise ValueError(f"not a token record (magic {magic!r}, version {version}, dtype code {code})")
    dt = DTYPE_CODES[code]
    if len(value) != HEADER_SIZE + h * w * dt.itemsize:
        raise ValueError(f"token record has {len(value)} bytes, header says {h}x{w} {DTYPE_NAMES[code]}")
    return Record(np.frombuffer(value, dt, h * w, HEADER_SIZE).reshape(h, w), label, split, flags)


def decode_batch(values: Sequence[bytes], h: int, w: int, code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many records of one store (all the same length) -> (grids [n, h, w], labels [n], header rows [n]) at once."""
    dt = DTYPE_CODES[code]
    rec_len = HEADER_SIZE + h * w * dt.itemsize
    rows = np.frombuffer(b"".join(values), np.uint8)
    if rows.size != rec_len * len(values):
        raise ValueError(f"token records of unexpected length (expected {rec_len} bytes each)")
    rows = rows.reshape(len(values), rec_len)
    header = rows[:, :HEADER_SIZE].copy().view(HEADER_DTYPE).ravel()
    if len(values) and not ((header["magic"] == MAGIC).all() and (header["version"] == RECORD_VERSION).all()
                            and (header["dtype"] == code).all()):
        raise ValueError("not token records of this store (bad magic, version or dtype)")
    grids = rows[:, HEADER_SIZE:].copy().view(dt).reshape(len(values), h, w)
    return grids, header["label"].astype(np.int64), header


# ---------------------------------------------------------------- LMDB files

def open_readonly(path: str | Path) -> lmdb.Environment:
    """Read-only, lock-free (the store is immutable once written), no readahead (random access)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: token store not found (run the tokenize stage first)")
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
    except lmdb.Error as exc:
        raise UserError(f"{path}: not a readable token store ({exc}); re-run the tokenize stage") from None
    # A truncated file opens fine (its meta pages are intact) but reading a page past its end is SIGBUS through
    # the memory map: compare the size with the last page the meta page says is in use.
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = path.stat().st_size
    if size < need:
        env.close()
        raise UserError(f"{path}: token store is truncated ({size} of {need} bytes); re-run the tokenize stage")
    return env


# LMDB allows one Environment per file per process, so every reader in a process shares one, keyed by the
# file's identity (a store re-created at the same path is a new file) and the pid (a forked child opens its own).
_READERS: dict[tuple[int, int, int], lmdb.Environment] = {}


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _reader_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return os.getpid(), st.st_dev, st.st_ino


def _drop_inherited() -> None:
    """In a forked child: release the copies of the parent's Environments. They must not be used here, and py-lmdb
    refuses to open a file again while it counts as open; closing the child's copy leaves the parent's intact."""
    pid = os.getpid()
    for key in [k for k in _READERS if k[0] != pid]:
        _READERS.pop(key).close()


def shared_reader(path: str | Path) -> lmdb.Environment:
    """This process's read-only Environment for an LMDB file, opened on first use."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: token store not found (run the tokenize stage first)")
    _drop_inherited()
    key = _reader_key(path)
    if key not in _READERS:
        _READERS[key] = open_readonly(path)
    return _READERS[key]


@contextlib.contextmanager
def read_txn(path: str | Path) -> Iterator[lmdb.Transaction]:
    """A read transaction without keeping the file open: reuses this process's Environment when one exists,
    else opens and closes a temporary one (so a parent process holds nothing open when it forks workers)."""
    path = Path(path)
    _drop_inherited()
    env = _READERS.get(_reader_key(path)) if path.is_file() else None
    temporary = env is None
    if temporary:
        env = open_readonly(path)
    try:
        with env.begin() as txn:
            yield txn
    finally:
        if temporary:
            env.close()


class LMDBWriter:
    """Single-writer LMDB file. Each `put_batch` is one transaction (atomic: a kill keeps whole batches only);
    MDB_MAP_FULL aborts the transaction, doubles the map and retries it, so no size has to be guessed."""

    def __init__(self, path: str | Path, map_size: int = 64 << 20, sync: bool = True, max_map_size: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_map_size = max_map_size  # a ceiling (quota, shared disk): growing past it is a clear error
        if max_map_size is not None:
            map_size = min(map_size, max_map_size)
        # lock=False: exactly one process writes each file and nobody reads it meanwhile, so no lock file.
        self.env = lmdb.open(str(self.path), subdir=False, map_size=map_size, lock=False, readahead=False,
                             sync=sync, metasync=sync)
        self.grows = 0

    def put_batch(self, items: Sequence[tuple[bytes, bytes]], append: bool = False) -> None:
        """Write (key, value) pairs in one transaction. append=True: keys arrive sorted (fast, compact pages)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        if not txn.put(key, value, append=append):
                            raise ValueError(f"{self.path}: key {key!r} is out of order or duplicate")
                return
            except lmdb.MapFullError:
                # the failed transaction is aborted by the context manager; no transaction is open now
                size = self.env.info()["map_size"]
                if self.max_map_size is not None and size >= self.max_map_size:
                    raise UserError(f"{self.path}: the LMDB map is full at {size / 2**20:.2f} MB, the ceiling set "
                                    f"by max_map_mb; raise it (the store needs more)") from None
                self.env.set_mapsize(size * 2 if self.max_map_size is None else min(size * 2, self.max_map_size))
                self.grows += 1
            except lmdb.Error as exc:  # a full disk or quota surfaces here, as an OS message
                if isinstance(exc, lmdb.DiskError) or "No space left" in str(exc) or "quota" in str(exc):
                    raise UserError(f"{self.path}: the disk refused the LMDB write ({exc}); free some space") from None
                raise

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def __enter__(self) -> "LMDBWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_keys(path: str | Path) -> set[bytes]:
    """Every key of an LMDB file (for resuming: what is already written)."""
    with read_txn(path) as txn:
        return set(txn.cursor().iternext(keys=True, values=False))


def iter_merged(parts: Sequence[str | Path], batch: int = 4096) -> Iterator[list[tuple[bytes, bytes]]]:
    """(key, value) batches of several LMDB files in global key order, streaming (LMDB iterates sorted keys, so
    a k-way merge needs O(parts) memory). A key in two parts is an error: ranks must write disjoint subsets."""
    envs = [open_readonly(p) for p in parts]
    try:
        txns = [env.begin() for env in envs]
        streams = [txn.cursor().iternext(keys=True, values=True) for txn in txns]
        out: list[tuple[bytes, bytes]] = []
        prev = None
        for key, value in heapq.merge(*streams, key=itemgetter(0)):
            if key == prev:
                raise RuntimeError(f"key {key!r} written by two ranks; delete the .partial folder and re-run")
            prev = key
            out.append((key, value))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out
        for txn in txns:
            txn.abort()
    finally:
        for env in envs:
            env.close()


# ---------------------------------------------------------------- store metadata and fingerprint checks

def store_lmdb(path: str | Path) -> Path:
    """Accept the store folder or its tokens.lmdb file."""
    path = Path(path)
    return path / LMDB_NAME if path.is_dir() else path


def _meta_from(txn: lmdb.Transaction, path: Path) -> dict[str, Any]:
    raw = txn.get(META_KEY)
    if raw is None:
        raise UserError(f"{path}: no {META_KEY.decode()} record; not a finished token store")
    return _checked_format(json.loads(raw), path)


def _checked_format(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: token store format {meta.get('format')!r} is not {FORMAT!r}; re-tokenize")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `__meta__` record of a store (opens and closes its own Environment)."""
    lmdb_path = store_lmdb(path)
    with read_txn(lmdb_path) as txn:
        return _meta_from(txn, lmdb_path)


def check_store(meta: dict[str, Any], where: str | Path, vqgan_fingerprint: str | None,
                vqgan_where: str | None = None) -> None:
    """Stop when the store's codebook is not the VQGAN's (no-op when no fingerprint is given)."""
    if vqgan_fingerprint is not None:
        check_fingerprint(meta["fingerprint"], vqgan_fingerprint, str(where), vqgan_where)


def split_keys(txn: lmdb.Transaction, meta: dict[str, Any], split: str) -> list[bytes]:
    raw = txn.get(KEYS_PREFIX + split.encode())
    if raw is None:
        raise UserError(f"token store has no split {split!r} (have {meta['splits']})")
    return raw.split(b"\n") if raw else []


# ---------------------------------------------------------------- readers for stage 2

class TokenLMDBDataset(Dataset):
    """Random access to a token store: item i -> (LongTensor [h, w] grid, label).

    split=None takes every split in meta["splits"] order; hflip=True adds the augmented copies (indices
    n..2n-1) when the store has them. The Environment is opened lazily in the process that reads (each
    DataLoader worker opens its own) and dropped when pickled, so no Environment ever crosses a fork.
    """

    def __init__(self, path: str | Path, split: str | None = None, *, hflip: bool = True,
                 vqgan_fingerprint: str | None = None, vqgan_where: str | None = None):
        self.path = store_lmdb(path)
        # The file this reader checked: `tokenize` swaps in a new store as a new file, and a reader must never
        # serve another codebook's tokens under the fingerprint it checked (see _reader).
        self._file_id = _file_id(self.path)
        with read_txn(self.path) as txn:  # nothing stays open: workers fork without an Environment
            self.meta = _meta_from(txn, self.path)
            check_store(self.meta, self.path, vqgan_fingerprint, vqgan_where)
            splits = self.meta["splits"] if split is None else [split]
            keys = [k for s in splits for k in split_keys(txn, self.meta, s)]
        if hflip and self.meta["hflip"]:
            keys += [k + HFLIP_SUFFIX.encode() for k in keys]
        self.keys = keys
        self.h, self.w = self.meta["grid"]
        self.code = self.meta["dtype_code"]
        self.dtype = DTYPE_CODES[self.code]
        self._env: lmdb.Environment | None = None
        self._txn: lmdb.Transaction | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def _reader(self) -> lmdb.Transaction:
        if self._pid != os.getpid():  # first use in this process (main or a worker): open our own
            if _file_id(self.path) != self._file_id:
                raise UserError(f"{self.path.parent}: the token store was replaced after this reader checked it "
                                f"(codebook fingerprint {self.meta['fingerprint'][:16]}); open it again")
            self._env = shared_reader(self.path)
            self._txn = self._env.begin()  # one long read transaction: the store never changes
            self._pid = os.getpid()
        return self._txn

    def _get(self, txn: lmdb.Transaction, i: int) -> bytes:
        value = txn.get(self.keys[i])
        if value is None:
            raise KeyError(f"{self.path}: record {self.keys[i]!r} is missing")
        return value

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        value = self._get(self._reader(), i)
        if value[:4] != MAGIC:
            raise ValueError(f"{self.path}: record {self.keys[i]!r} is not a token record")
        grid = np.frombuffer(value, self.dtype, self.h * self.w, HEADER_SIZE).astype(np.int64)
        return torch.from_numpy(grid).view(self.h, self.w), struct.unpack_from("<i", value, 8)[0]

    def get_batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Several items at once: (LongTensor [B, h, w], LongTensor [B]); much faster than B single reads."""
        txn = self._reader()
        grids, labels, _ = decode_batch([self._get(txn, i) for i in indices], self.h, self.w, self.code)
        return torch.from_numpy(grids.astype(np.int64)), torch.from_numpy(labels)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # DataLoader calls this for a whole batch when it exists: one vectorised decode instead of B
        grids, labels = self.get_batch(indices)
        return list(zip(grids.unbind(0), labels.tolist()))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_env"] = state["_txn"] = state["_pid"] = None  # spawn-started workers open their own
        return state

    def __del__(self) -> None:
        if getattr(self, "_txn", None) is not None and self._pid == os.getpid():
            self._txn.abort()


def read_store_json(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: not found; not a finished token store (run the tokenize stage)")
    return _checked_format(json.loads(meta_path.read_text()), Path(path))


def iter_token_shard(path: str | Path, hflip: bool = True) -> Iterator[tuple[bytes, int]]:
    """(grid bytes, label) of each sample of one token shard, in order (flipped copies skipped if not hflip).

    Parses the 512-byte ustar headers directly: the tarfile module costs ~10 us per member, which alone caps
    streaming near 15k samples/s on one core. Only regular members are read and nothing is extracted. Relies
    on the writer's member order: each sample's `.cls` comes right before its `.tok`.
    """
    data = Path(path).read_bytes()
    flip = HFLIP_SUFFIX.encode()
    pos, end = 0, len(data)
    key, label = None, 0
    while pos + 512 <= end:
        header = data[pos:pos + 512]
        if header[0] == 0:  # end-of-archive marker (zero blocks)
            break
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ValueError(f"{path}: corrupt tar header at byte {pos}") from None
        start = pos + 512
        pos = start + ((size + 511) & ~511)
        if start + size > end:
            raise ValueError(f"{path}: truncated tar (member at byte {start - 512} runs past the end)")
        if header[156] not in (0x30, 0):  # '0' or NUL: a regular file; links and the rest are ignored
            continue
        stem, _, ext = header[:100].split(b"\0", 1)[0].rpartition(b".")
        if not hflip and stem.endswith(flip):
            continue
        if ext == b"cls":
            key, label = stem, int(data[start:start + size])
        elif ext == b"tok":
            if stem != key:
                raise ValueError(f"{path}: sample {stem.decode()} has no .cls before its .tok")
            yield data[start:start + size], label


def _samples_of_shards(shards: Iterable[dict[str, str]], hflip: bool) -> Iterator[tuple[bytes, int]]:
    for shard in shards:  # {"url": path} items, as webdataset's shard lists yield them
        yield from iter_token_shard(shard["url"], hflip)


def decode_grid(sample: tuple[bytes, int], h: int, w: int, code: int) -> tuple[torch.Tensor, int]:
    """(grid bytes, label) -> (LongTensor [h, w], label)."""
    grid = np.frombuffer(sample[0], DTYPE_CODES[code], h * w).astype(np.int64)
    return torch.from_numpy(grid).view(h, w), sample[1]


def collate_grids(samples: list[tuple[bytes, int]], h: int, w: int, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid bytes, label) samples -> (LongTensor [B, h, w], LongTensor [B]) in one decode."""
    grids = np.frombuffer(b"".join(g for g, _ in samples), DTYPE_CODES[code]).reshape(len(samples), h, w)
    return torch.from_numpy(grids.astype(np.int64)), torch.tensor([label for _, label in samples])


def token_webdataset(path: str | Path, split: str, *, batch_size: int | None = None, shuffle: int = 1000,
                     resampled: bool = False, epoch_length: int | None = None, hflip: bool = True,
                     seed: int = 0, vqgan_fingerprint: str | None = None,
                     vqgan_where: str | None = None):
    """Stream one split of a token store's shards (a webdataset DataPipeline, usable in a DataLoader): items
    (LongTensor [h, w], label), or batches (LongTensor [B, h, w], LongTensor [B]) when batch_size is set.

    Shards are divided between ranks (`split_by_node`) and DataLoader workers (`split_by_worker`); `shuffle`
    is the sample buffer (0 = file order; shard order is shuffled too). For multi-GPU training use
    resampled=True with epoch_length: every rank draws shards at random forever and each worker stops after
    epoch_length items (samples, or batches with batch_size), so all ranks run the same number of steps (plain
    splitting hangs DDP when the shards do not divide evenly). epoch_length ~ split size // (ranks * workers
    [* batch_size]).
    """
    import webdataset as wds

    root = Path(path)
    meta = read_store_json(root)
    check_store(meta, root, vqgan_fingerprint, vqgan_where)
    sizes_path = root / SHARDS_DIR / "sizes.json"
    if not sizes_path.is_file():
        raise UserError(f"{sizes_path}: not found; not a finished token store")
    sizes = json.loads(sizes_path.read_text())
    urls = [str(root / SHARDS_DIR / name) for name in sorted(sizes) if name.startswith(f"{split}-")]
    if not urls:
        raise UserError(f"{sizes_path}: no shards for split {split!r} (have {meta['splits']})")
    # deterministic: without it ResampledShards mixes the pid, the time and os.urandom into the seed
    shards = wds.ResampledShards(urls, seed=seed, deterministic=True) if resampled else wds.SimpleShardList(urls)
    stages: list[Any] = [shards, wds.split_by_node, wds.split_by_worker]
    if shuffle and not resampled:
        stages.append(wds.detshuffle(len(urls), seed=seed))  # shard order; seed + epoch: reproducible
    stages.append(wds.pipelinefilter(_samples_of_shards)(hflip))
    if shuffle:
        stages.append(wds.detshuffle(shuffle, initial=min(shuffle, 100), seed=seed))
    h, w = meta["grid"]
    if batch_size:  # partial (not lambdas) so the pipeline pickles into spawn-started workers
        stages.append(wds.batched(batch_size, collation_fn=functools.partial(collate_grids, h=h, w=w,
                                                                             code=meta["dtype_code"])))
    else:
        stages.append(wds.map(functools.partial(decode_grid, h=h, w=w, code=meta["dtype_code"])))
    ds = wds.DataPipeline(*stages)
    if epoch_length is not None:
        ds = ds.with_epoch(epoch_length)
    return ds


# ---------------------------------------------------------------- writing the streaming shards

def write_token_shards(lmdb_path: Path, out_dir: Path, order: dict[str, list[bytes]], shard_size: int,
                       hflip: bool) -> dict[str, int]:
    """Write `<split>-%06d.tar` from a finished LMDB in dataset order (each original followed by its flipped
    copy), so the shards are the same bytes whatever the number of ranks that tokenized. Returns sizes."""
    from pipeline.atomic import write_json
    from pipeline.shards import ShardWriter

    sizes: dict[str, int] = {}
    with read_txn(lmdb_path) as txn:
        for split, keys in order.items():
            with ShardWriter(out_dir, split, shard_size) as writer:
                for key in keys:
                    for k in (key, key + HFLIP_SUFFIX.encode()) if hflip else (key,):
                        value = txn.get(k)
                        if value is None:
                            raise RuntimeError(f"{lmdb_path}: record {k!r} missing while writing shards")
                        label = struct.unpack_from("<i", value, 8)[0]
                        writer.write(k.decode(), {"cls": str(label).encode(), "tok": value[HEADER_SIZE:]})
            sizes.update(zip(writer.shards, writer.sizes))
    write_json(out_dir / "sizes.json", sizes)
    return sizes


@dataclass
class TokenData:
    """A split of the token store in memory: uint16 grids are small (60k x 8x8 = 7.7 MB)."""
    tokens: torch.Tensor  # [N, h*w] int64
    labels: torch.Tensor  # [N]
    meta: dict

    @classmethod
    def load(cls, store: Path, split: str, hflip: bool, fingerprint: str, where: str) -> "TokenData":
        ds = TokenLMDBDataset(store, split, hflip=hflip, vqgan_fingerprint=fingerprint, vqgan_where=where)
        grids, labels = ds.get_batch(range(len(ds)))
        return cls(grids.flatten(1), labels, ds.meta)
