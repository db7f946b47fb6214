"""pipeline.tokens without a VQGAN: a hand-made store (known grids, labels and keys) checks the record bytes, the
LMDB reader and writer, the k-way merge of rank parts and the shard reader, each against values computed here."""
from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from pipeline import tokens as T
from pipeline.errors import UserError
from pipeline.tokens import (FLAG_HFLIP, FORMAT, KEYS_PREFIX, META_KEY, LMDBWriter, TokenData, TokenLMDBDataset,
                             collate_grids, decode_batch, decode_grid, decode_record, encode_records, iter_merged,
                             iter_token_shard, read_keys, read_meta, read_store_json, token_webdataset,
                             write_token_shards)

FP = "f" * 64
H, W = 2, 3


def grid_of(i: int, flipped: bool = False) -> np.ndarray:
    """Sample i's grid: distinct values per sample and position, over 255 so a byte-level slip shows."""
    g = (np.arange(H * W).reshape(H, W) * 7 + 300 * i + 1).astype(np.int64)
    return g[:, ::-1] if flipped else g


SPLITS = {"train": [b"t0", b"t1", b"t2", b"t3", b"t4"], "val": [b"v0", b"v1"]}
LABELS = {b"t0": 3, b"t1": -1, b"t2": 0, b"t3": 9, b"t4": 2, b"v0": 7, b"v1": 5}
INDEX = {k: i for i, k in enumerate(SPLITS["train"] + SPLITS["val"])}


def make_store(root: Path, hflip: bool = True, shard_size: int = 3) -> Path:
    """A finished store as tokenize writes one: records, split keys, meta record, shards, meta.json."""
    root.mkdir(parents=True)
    meta = {"format": FORMAT, "fingerprint": FP, "n_codes": 4096, "grid": [H, W], "dtype": "uint16",
            "dtype_code": 1, "splits": list(SPLITS), "counts": {s: len(k) for s, k in SPLITS.items()},
            "hflip": hflip, "count": len(INDEX) * (2 if hflip else 1)}
    items = []
    for s_code, (split, keys) in enumerate(SPLITS.items()):
        for k in keys:
            for flip in (False, True) if hflip else (False,):
                value = encode_records(grid_of(INDEX[k], flip)[None], [LABELS[k]], [s_code],
                                       [FLAG_HFLIP if flip else 0], 1)[0]
                items.append((k + (b"_hflip" if flip else b""), value))
    items += [(KEYS_PREFIX + s.encode(), b"\n".join(k)) for s, k in SPLITS.items()]
    items.append((META_KEY, json.dumps(meta).encode()))
    with LMDBWriter(root / "tokens.lmdb") as w:
        w.put_batch(sorted(items), append=True)
    write_token_shards(root / "tokens.lmdb", root / "shards", SPLITS, shard_size, hflip)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def store(tmp_path) -> Path:
    # per test (30 ms), not per module: mutmut credits a function to the tests that call it, and a module fixture
    # calls write_token_shards during the first test only
    return make_store(tmp_path / "a")


# ---------------------------------------------------------------- record bytes

def test_record_bytes_follow_the_documented_layout():
    grid = np.array([[1, 258], [65535, 4]])
    value = encode_records(grid[None], [-2], [3], [FLAG_HFLIP], 1)[0]
    assert value == (b"TMTK" + bytes([1, 1, 1, 3]) + struct.pack("<iHH", -2, 2, 2)
                     + struct.pack("<4H", 1, 258, 65535, 4))
    big = encode_records(np.array([[[70000, 0]]]), [5], [0], [0], 2)[0]
    assert big == b"TMTK" + bytes([1, 2, 0, 0]) + struct.pack("<iHH", 5, 1, 2) + struct.pack("<2i", 70000, 0)
    rec = decode_record(value)
    assert rec.grid.tolist() == grid.tolist() and (rec.label, rec.split, rec.flags) == (-2, 3, FLAG_HFLIP)
    assert rec.grid.dtype == np.dtype("<u2") and decode_record(big).grid.tolist() == [[70000, 0]]
    assert [decode_record(v).grid.tolist() for v in encode_records(np.array([[[0]], [[65535]]]), [0, 0], [0, 0],
                                                                   [0, 0], 1)] == [[[0]], [[65535]]]


@pytest.mark.parametrize("grid, code", [([[-1]], 1), ([[65536]], 1), ([[-1]], 2)])
def test_indices_a_record_cannot_hold_are_refused(grid, code):
    name = {1: "uint16", 2: "int32"}[code]
    with pytest.raises(ValueError, match=f"^token indices out of range for {name}$"):
        encode_records(np.array([grid]), [0], [0], [0], code)


def test_decode_record_refuses_what_is_not_a_record():
    good = encode_records(np.arange(6).reshape(1, 2, 3), [1], [0], [0], 1)[0]
    cases = {
        good[:15]: "token record too short (15 bytes)",
        b"TMTX" + good[4:]: "not a token record (magic b'TMTX', version 1, dtype code 1)",
        good[:4] + b"\x02" + good[5:]: "not a token record (magic b'TMTK', version 2, dtype code 1)",
        good[:5] + b"\x03" + good[6:]: "not a token record (magic b'TMTK', version 1, dtype code 3)",
        good + b"\0\0": "token record has 30 bytes, header says 2x3 uint16",
        good[:-2]: "token record has 26 bytes, header says 2x3 uint16",
    }
    for value, msg in cases.items():
        with pytest.raises(ValueError) as err:
            decode_record(value)
        assert str(err.value) == msg
    assert decode_record(good[:16] + good[16:]).grid.shape == (2, 3)  # exactly 16 + 12 bytes is fine


def test_decode_batch_reads_many_records_and_checks_them():
    grids = np.stack([grid_of(i) for i in range(3)])
    values = encode_records(grids, [4, -5, 6], [0, 1, 0], [0, 1, 0], 1)
    g, labels, header = decode_batch(values, H, W, 1)
    assert np.array_equal(g, grids) and labels.tolist() == [4, -5, 6] and labels.dtype == np.int64
    assert header["split"].tolist() == [0, 1, 0] and header["flags"].tolist() == [0, 1, 0]
    g.fill(0)  # the grids are the caller's to change (the input bytes are not)
    assert decode_record(values[0]).grid.tolist() == grid_of(0).tolist()
    empty = decode_batch([], H, W, 1)
    assert empty[0].shape == (0, H, W) and empty[1].shape == (0,)
    with pytest.raises(ValueError, match=r"^token records of unexpected length \(expected 28 bytes each\)$"):
        decode_batch(values[:2] + [values[2] + b"\0"], H, W, 1)
    for bad in (b"XMTK" + values[1][4:], values[1][:4] + b"\x07" + values[1][5:],
                values[1][:5] + b"\x02" + values[1][6:]):
        with pytest.raises(ValueError, match=r"^not token records of this store \(bad magic, version or dtype\)$"):
            decode_batch([values[0], bad, values[2]], H, W, 1)
    wide = encode_records(np.array([[[70000, 1]]]), [3], [0], [0], 2)
    assert decode_batch(wide, 1, 2, 2)[0].tolist() == [[[70000, 1]]]


@pytest.mark.parametrize("n_codes, code", [(1, 1), (65535, 1), (65536, 1), (65537, 2), (10**6, 2)])
def test_dtype_code(n_codes, code):
    assert T.dtype_code(n_codes) == code


# ---------------------------------------------------------------- the LMDB store

def test_reader_serves_grids_labels_splits_and_flips(store):
    ds = TokenLMDBDataset(store)
    order = SPLITS["train"] + SPLITS["val"]
    assert ds.keys == order + [k + b"_hflip" for k in order] and len(ds) == 14
    grids, labels = ds.get_batch(range(14))
    assert grids.dtype == torch.long and labels.dtype == torch.long
    expected = [grid_of(INDEX[k]) for k in order] + [grid_of(INDEX[k], True) for k in order]
    assert grids.tolist() == [g.tolist() for g in expected]
    assert labels.tolist() == [LABELS[k] for k in order] * 2
    g, label = ds[8]  # t1's flipped copy
    assert g.tolist() == grid_of(1, True).tolist() and label == -1 and g.dtype == torch.long
    items = ds.__getitems__([6, 1])
    assert [(g.tolist(), lab) for g, lab in items] == [(grid_of(6).tolist(), 5), (grid_of(1).tolist(), -1)]
    val = TokenLMDBDataset(store, "val", hflip=False)
    assert val.keys == [b"v0", b"v1"] and val[1][0].tolist() == grid_of(6).tolist() and val[1][1] == 5
    assert (val.h, val.w, val.code, val.dtype) == (H, W, 1, np.dtype("<u2"))
    assert TokenLMDBDataset(store / "tokens.lmdb", "train").keys == SPLITS["train"] + [
        k + b"_hflip" for k in SPLITS["train"]]  # the folder or its file
    data = TokenData.load(store, "train", False, FP, "here")
    assert data.tokens.tolist() == [grid_of(i).flatten().tolist() for i in range(5)]
    assert data.labels.tolist() == [3, -1, 0, 9, 2] and data.meta["fingerprint"] == FP


def test_reader_without_flips_in_the_store(tmp_path):
    plain = make_store(tmp_path / "p", hflip=False)
    ds = TokenLMDBDataset(plain, hflip=True)  # asked for flips, the store has none
    assert len(ds) == 7 and ds.get_batch([6])[0].tolist() == [grid_of(6).tolist()]


def test_reader_checks_the_codebook_and_the_split(store):
    with pytest.raises(UserError) as err:
        TokenLMDBDataset(store, "train", vqgan_fingerprint="0" * 64, vqgan_where="vq/x")
    assert str(err.value) == (f"codebook mismatch: tokens in {store / 'tokens.lmdb'} have fingerprint {FP[:16]}, "
                              f"the VQGAN in vq/x has {'0' * 16}; re-tokenize with this VQGAN")
    with pytest.raises(UserError, match="the VQGAN in use has"):
        TokenLMDBDataset(store, "train", vqgan_fingerprint="0" * 64)
    assert len(TokenLMDBDataset(store, "train", vqgan_fingerprint=FP)) == 10
    with pytest.raises(UserError) as err:
        TokenLMDBDataset(store, "test")
    assert str(err.value) == "token store has no split 'test' (have ['train', 'val'])"


def test_empty_split_and_missing_or_foreign_records(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    meta = {"format": FORMAT, "fingerprint": FP, "grid": [1, 1], "dtype_code": 1, "splits": ["train", "val"],
            "hflip": False}
    rec = encode_records(np.array([[[5]]]), [1], [0], [0], 1)[0]
    with LMDBWriter(root / "tokens.lmdb") as w:
        w.put_batch([(KEYS_PREFIX + b"train", b"a\nb\nc"), (KEYS_PREFIX + b"val", b""),
                     (META_KEY, json.dumps(meta).encode()), (b"a", rec), (b"c", b"JUNK" + rec[4:])])
    assert TokenLMDBDataset(root, "val").keys == []  # an empty split has no keys, not one empty key
    ds = TokenLMDBDataset(root, "train")
    assert ds[0] == (torch.tensor([[5]]), 1)
    with pytest.raises(KeyError) as err:
        ds[1]
    assert err.value.args[0] == f"{root / 'tokens.lmdb'}: record b'b' is missing"
    with pytest.raises(ValueError) as err:
        ds[2]
    assert str(err.value) == f"{root / 'tokens.lmdb'}: record b'c' is not a token record"


def test_meta_record_and_format_are_checked(tmp_path):
    path = tmp_path / "m.lmdb"
    with LMDBWriter(path) as w:
        w.put_batch([(b"x", b"1")])
    with pytest.raises(UserError) as err:
        read_meta(path)
    assert str(err.value) == f"{path}: no __meta__ record; not a finished token store"
    with LMDBWriter(path) as w:
        w.put_batch([(META_KEY, json.dumps({"format": "tokenmill.tokens/0"}).encode())])
    with pytest.raises(UserError) as err:
        read_meta(path)
    assert str(err.value) == (f"{path}: token store format 'tokenmill.tokens/0' is not 'tokenmill.tokens/1'; "
                              f"re-tokenize")
    with LMDBWriter(path) as w:
        w.put_batch([(META_KEY, b"{}")])
    with pytest.raises(UserError, match="token store format None is not"):
        read_meta(path)


def test_missing_store_files(tmp_path):
    for call in (lambda p: T.open_readonly(p), lambda p: T.shared_reader(p)):
        with pytest.raises(UserError) as err:
            call(tmp_path / "none.lmdb")
        assert str(err.value) == f"{tmp_path / 'none.lmdb'}: token store not found (run the tokenize stage first)"
    with pytest.raises(UserError) as err:
        read_store_json(tmp_path)
    assert str(err.value) == f"{tmp_path / 'meta.json'}: not found; not a finished token store (run the tokenize stage)"
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match=r"token store format 'other' is not 'tokenmill.tokens/1'; re-tokenize$"):
        read_store_json(tmp_path)


def test_shared_reader_is_one_environment_per_file(store, tmp_path):
    path = store / "tokens.lmdb"
    env = T.shared_reader(path)
    assert T.shared_reader(str(path)) is env
    with T.read_txn(path) as txn:  # reuses it, and leaves it open
        assert txn.get(KEYS_PREFIX + b"val") == b"v0\nv1"
    assert T.shared_reader(path) is env and env.stat()["entries"] > 0
    other = make_store(tmp_path / "b")
    assert T.shared_reader(other / "tokens.lmdb") is not env
    with T.read_txn(other / "tokens.lmdb") as txn:
        assert read_keys(other / "tokens.lmdb") == {k for k, _ in txn.cursor()}


def test_read_txn_closes_a_temporary_environment(tmp_path):
    path = make_store(tmp_path / "c") / "tokens.lmdb"
    for _ in range(2):  # a second open of the file would fail if the first Environment were still open
        with T.read_txn(path) as txn:
            assert json.loads(txn.get(META_KEY))["fingerprint"] == FP
    env = T.open_readonly(path)  # nothing of ours holds the file
    env.close()


def test_writer_refuses_out_of_order_keys_and_stops_at_its_ceiling(tmp_path):
    path = tmp_path / "w" / "x.lmdb"
    with LMDBWriter(path) as w:  # the parent folder is created
        w.put_batch([(b"b", b"1")], append=True)
        with pytest.raises(ValueError) as err:
            w.put_batch([(b"c", b"2"), (b"a", b"3")], append=True)
        assert str(err.value) == f"{path}: key b'a' is out of order or duplicate"
        w.put_batch([(b"a", b"3")])  # without append any order is fine
    assert read_keys(path) == {b"a", b"b"}  # the refused batch left nothing (one transaction)
    value = b"v" * 2000
    with LMDBWriter(tmp_path / "cap.lmdb", map_size=1 << 30, max_map_size=64 << 10) as w:
        assert w.env.info()["map_size"] == 64 << 10  # the ceiling caps the first map too
        with pytest.raises(UserError) as err:
            w.put_batch([(b"k%05d" % i, value) for i in range(200)])
        assert w.grows == 0
    assert str(err.value) == (f"{tmp_path / 'cap.lmdb'}: the LMDB map is full at 0.06 MB, the ceiling set by "
                              f"max_map_mb; raise it (the store needs more)")
    with LMDBWriter(tmp_path / "grow.lmdb", map_size=64 << 10, max_map_size=200 << 10) as w:
        w.put_batch([(b"k%05d" % i, value) for i in range(20)])  # more than 64 KB: doubled, within the ceiling
        assert w.grows >= 1 and w.env.info()["map_size"] == (64 << 10) * 2 ** w.grows
        with pytest.raises(UserError, match="map is full at 0.20 MB"):  # grows to the ceiling, not past it
            w.put_batch([(b"m%05d" % i, value) for i in range(100)])
        assert w.env.info()["map_size"] == 200 << 10


def test_merge_of_rank_parts_is_in_key_order_and_refuses_a_shared_key(tmp_path):
    parts = []
    for r, keys in enumerate([[b"a", b"d", b"e"], [b"b", b"c", b"f", b"g"]]):
        parts.append(tmp_path / f"part-{r}.lmdb")
        with LMDBWriter(parts[-1]) as w:
            w.put_batch([(k, k * 2) for k in keys])
    batches = list(iter_merged(parts, batch=3))
    assert batches == [[(b"a", b"aa"), (b"b", b"bb"), (b"c", b"cc")], [(b"d", b"dd"), (b"e", b"ee"), (b"f", b"ff")],
                       [(b"g", b"gg")]]
    assert list(iter_merged(parts[:1], batch=3)) == [[(b"a", b"aa"), (b"d", b"dd"), (b"e", b"ee")]]
    assert [len(b) for b in iter_merged(parts)] == [7]  # the default batch holds them all
    dup = tmp_path / "dup.lmdb"
    with LMDBWriter(dup) as w:
        w.put_batch([(b"c", b"x")])
    with pytest.raises(RuntimeError) as err:
        list(iter_merged(parts + [dup], batch=100))
    assert str(err.value) == "key b'c' written by two ranks; delete the .partial folder and re-run"
    for p in parts + [dup]:  # every part was closed again (a second open in this process would fail)
        T.open_readonly(p).close()


# ---------------------------------------------------------------- shards

def test_shards_are_the_records_in_dataset_order(store):
    sizes = json.loads((store / "shards" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 3, "train-000003.tar": 1,
                     "val-000000.tar": 3, "val-000001.tar": 1}
    streamed = [s for name in sorted(sizes) for s in iter_token_shard(store / "shards" / name)]
    order = [(k, f) for k in SPLITS["train"] + SPLITS["val"] for f in (False, True)]
    assert [label for _, label in streamed] == [LABELS[k] for k, _ in order]
    assert [np.frombuffer(g, "<u2").tolist() for g, _ in streamed] == [
        grid_of(INDEX[k], f).flatten().tolist() for k, f in order]
    no_flip = list(iter_token_shard(store / "shards" / "train-000000.tar", hflip=False))
    assert [label for _, label in no_flip] == [3, -1]  # t0, (t0 flipped), t1
    g, label = decode_grid(streamed[3], H, W, 1)
    assert g.tolist() == grid_of(1, True).tolist() and g.dtype == torch.long and label == -1
    grids, labels = collate_grids(streamed[:3], H, W, 1)
    assert grids.tolist() == [grid_of(0).tolist(), grid_of(0, True).tolist(), grid_of(1).tolist()]
    assert labels.tolist() == [3, 3, -1] and grids.dtype == torch.long
    wide = (struct.pack("<2i", 70000, -3), 4)
    assert decode_grid(wide, 1, 2, 2)[0].tolist() == [[70000, -3]]
    assert collate_grids([wide], 1, 2, 2)[0].tolist() == [[[70000, -3]]]


def test_write_token_shards_refuses_a_missing_record(store, tmp_path):
    with pytest.raises(RuntimeError) as err:
        write_token_shards(store / "tokens.lmdb", tmp_path / "out", {"train": [b"t0", b"zz"]}, 5, True)
    assert str(err.value) == f"{store / 'tokens.lmdb'}: record b'zz' missing while writing shards"


def tar_of(members: list[tuple[str, bytes | None]]) -> bytes:
    """A ustar archive; None as data makes a symlink member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_shard_reader_parses_the_members_it_needs(tmp_path):
    p = tmp_path / "s.tar"
    big = bytes(range(256)) * 4  # 1024 bytes: a member that fills whole blocks
    p.write_bytes(tar_of([("a.cls", b"12"), ("a.json", b"{}"), ("a.tok", b"xyz"), ("link.tok", None),
                          ("b_hflip.cls", b"-4"), ("b_hflip.tok", big), ("c.cls", b"7"), ("c.tok", b"")]))
    assert list(iter_token_shard(p)) == [(b"xyz", 12), (big, -4), (b"", 7)]
    assert list(iter_token_shard(p, hflip=False)) == [(b"xyz", 12), (b"", 7)]
    # the reader stops at the end-of-archive blocks: bytes after them are never parsed
    p.write_bytes(tar_of([("a.cls", b"1"), ("a.tok", b"t")]) + b"garbage" * 100)
    assert list(iter_token_shard(p)) == [(b"t", 1)]


def test_shard_reader_refuses_damaged_archives(tmp_path):
    p = tmp_path / "s.tar"
    raw = tar_of([("a.cls", b"1"), ("a.tok", b"t" * 600)])
    p.write_bytes(raw[:512 * 3 + 100])  # a.tok's header says 600 bytes; 100 are there
    with pytest.raises(ValueError) as err:
        list(iter_token_shard(p))
    assert str(err.value) == f"{p}: truncated tar (member at byte 1024 runs past the end)"
    bad = bytearray(raw)
    bad[1024 + 124:1024 + 136] = b"notoctal\0\0\0\0"
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError) as err:
        list(iter_token_shard(p))
    assert str(err.value) == f"{p}: corrupt tar header at byte 1024"
    p.write_bytes(tar_of([("a.cls", b"1"), ("b.tok", b"t")]))
    with pytest.raises(ValueError) as err:
        list(iter_token_shard(p))
    assert str(err.value) == f"{p}: sample b has no .cls before its .tok"
    p.write_bytes(tar_of([("a.tok", b"t")]))
    with pytest.raises(ValueError, match="sample a has no .cls before its .tok"):
        list(iter_token_shard(p))


def test_webdataset_streams_a_split(store):
    items = list(token_webdataset(store, "train", shuffle=0))
    assert [g.tolist() for g, _ in items] == [grid_of(i, f).tolist() for i in range(5) for f in (False, True)]
    assert [label for _, label in items] == [LABELS[k] for k in SPLITS["train"] for _ in range(2)]
    batches = list(token_webdataset(store, "val", shuffle=0, hflip=False, batch_size=2))
    assert len(batches) == 1 and batches[0][0].tolist() == [grid_of(5).tolist(), grid_of(6).tolist()]
    assert batches[0][1].tolist() == [7, 5]
    shuffled = [label for _, label in token_webdataset(store, "train", shuffle=5, seed=1)]
    assert sorted(shuffled) == sorted(label for _, label in items) and shuffled != [label for _, label in items]
    again = [label for _, label in token_webdataset(store, "train", shuffle=5, seed=1)]
    assert again == shuffled  # seeded: reproducible
    endless = token_webdataset(store, "val", resampled=True, epoch_length=9, shuffle=0)
    assert len(list(endless)) == 9  # resampled shards never run out; the epoch length stops it
    with pytest.raises(UserError) as err:
        token_webdataset(store, "test")
    assert str(err.value) == f"{store / 'shards' / 'sizes.json'}: no shards for split 'test' (have ['train', 'val'])"
    with pytest.raises(UserError, match="codebook mismatch"):
        token_webdataset(store, "train", vqgan_fingerprint="0" * 64)


def test_webdataset_needs_the_sizes_file(store, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    (copy / "shards" / "sizes.json").unlink()
    with pytest.raises(UserError) as err:
        token_webdataset(copy, "train")
    assert str(err.value) == f"{copy / 'shards' / 'sizes.json'}: not found; not a finished token store"


def test_store_path_accepts_the_folder_or_the_file(store):
    assert T.store_lmdb(store) == store / "tokens.lmdb"
    assert T.store_lmdb(store / "tokens.lmdb") == store / "tokens.lmdb"
    assert T.store_lmdb(str(store / "x")) == store / "x"
    assert read_meta(store)["fingerprint"] == FP and read_meta(store / "tokens.lmdb")["grid"] == [H, W]


def test_check_store_without_a_fingerprint_is_a_no_op():
    T.check_store({}, "x", None)  # no "fingerprint" key needed when nothing is compared
    with pytest.raises(UserError, match="tokens in x have fingerprint aaaaaaaaaaaaaaaa, the VQGAN in y has b"):
        T.check_store({"fingerprint": "a" * 20}, "x", "b", "y")


def test_truncated_store_is_refused(tmp_path):
    path = make_store(tmp_path / "t") / "tokens.lmdb"
    raw = path.read_bytes()
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    env.close()
    path.write_bytes(raw[:need - 1])
    with pytest.raises(UserError) as err:
        T.open_readonly(path)
    assert str(err.value) == (f"{path}: token store is truncated ({need - 1} of {need} bytes); re-run the tokenize "
                              f"stage")
    path.write_bytes(raw[:need])  # exactly the pages in use: readable
    T.open_readonly(path).close()


# ---------------------------------------------------------------- processes: fork, pickle

class Probe(torch.utils.data.Dataset):
    """Item i: (the grid's values, this process's pid, the pid the reader says opened its Environment)."""

    def __init__(self, ds: TokenLMDBDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[list, int, int]:
        import os
        g, _ = self.ds[i]
        return g.flatten().tolist(), os.getpid(), self.ds._pid


def test_forked_workers_open_their_own_environment(tmp_path):
    import os
    store = make_store(tmp_path / "f")
    ds = TokenLMDBDataset(store)
    assert ds._env is None and ds._pid is None  # construction leaves nothing open
    first = ds[0]
    parent_env = ds._env
    assert ds._pid == os.getpid() and parent_env is T.shared_reader(store / "tokens.lmdb")
    loader = torch.utils.data.DataLoader(Probe(ds), batch_size=None, num_workers=2, multiprocessing_context="fork")
    seen = list(loader)
    assert [g for g, _, _ in seen] == [ds[i][0].flatten().tolist() for i in range(len(ds))]
    pids = {pid for _, pid, _ in seen}
    assert len(pids) == 2 and os.getpid() not in pids and all(pid == opened for _, pid, opened in seen)
    assert ds[0][0].tolist() == first[0].tolist() and ds._env is parent_env  # the parent's is untouched


def test_a_reader_pickles_without_its_environment(tmp_path):
    import pickle
    store = make_store(tmp_path / "p")
    ds = TokenLMDBDataset(store, "val")
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert (copy._env, copy._txn, copy._pid) == (None, None, None)
    assert ds._env is not None and ds._txn is not None  # the original keeps its own
    assert copy.keys == ds.keys and copy[1][0].tolist() == grid_of(6).tolist()


def test_environments_of_another_process_are_dropped(tmp_path, monkeypatch):
    """What a forked child finds: the parent's Environment in the table under the parent's pid. The child's first
    read closes its copy and opens its own (py-lmdb refuses a second open of a file still counted as open)."""
    import os
    path = make_store(tmp_path / "d") / "tokens.lmdb"
    parent_env = T.shared_reader(path)
    parent_key = (os.getpid(), *T._file_id(path))
    assert T._READERS[parent_key] is parent_env
    monkeypatch.setattr(os, "getpid", lambda: -7)  # from here on, "the child"
    with T.read_txn(path) as txn:  # a temporary Environment of its own (the parent's copy is gone first)
        assert txn.get(KEYS_PREFIX + b"val") == b"v0\nv1"
    assert parent_key not in T._READERS
    child_env = T.shared_reader(path)
    assert child_env is not parent_env and T._READERS[(-7, *T._file_id(path))] is child_env
    assert T._file_id(tmp_path / "none") is None


# ---------------------------------------------------------------- what the first mutation run left alive

def test_a_record_of_an_empty_grid_is_the_header_alone():
    value = encode_records(np.zeros((1, 0, 0), np.int64), [4], [0], [0], 1)[0]
    assert len(value) == 16
    rec = decode_record(value)
    assert rec.grid.shape == (0, 0) and rec.label == 4


def test_environments_are_opened_as_the_module_says(store, tmp_path):
    """Readers: read-only, no lock file, no readahead. The writer: no lock file, no readahead, synced writes."""
    env = T.open_readonly(store / "tokens.lmdb")
    flags = env.flags()
    assert (flags["readonly"], flags["lock"], flags["readahead"]) == (True, False, False)
    with pytest.raises(lmdb.ReadonlyError):
        env.begin(write=True)
    env.close()
    w = LMDBWriter(tmp_path / "w.lmdb")
    flags = w.env.flags()
    assert (flags["lock"], flags["readahead"], flags["sync"], flags["metasync"], flags["subdir"]) == \
        (False, False, True, True, False)
    w.close()
    w = LMDBWriter(tmp_path / "n.lmdb", sync=False)
    assert (w.env.flags()["sync"], w.env.flags()["metasync"]) == (False, False)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "n.lmdb", "w.lmdb"]  # no -lock files beside them
    assert sorted(p.name for p in store.iterdir()) == ["meta.json", "shards", "tokens.lmdb"]


def test_a_file_that_is_not_lmdb_is_one_line(tmp_path):
    path = tmp_path / "tokens.lmdb"
    path.write_bytes(b"not an lmdb file\n" * 512)
    with pytest.raises(UserError) as err:
        T.open_readonly(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a readable token store (") and msg.endswith("); re-run the tokenize stage")


def test_writer_creates_missing_folders_and_doubles_its_map(tmp_path):
    path = tmp_path / "a" / "b" / "c.lmdb"
    with LMDBWriter(path, map_size=32 << 10) as w:
        w.put_batch([(b"k%05d" % i, b"v" * 1500) for i in range(60)])
        assert w.grows >= 2 and w.env.info()["map_size"] == (32 << 10) * 2 ** w.grows
    assert len(read_keys(path)) == 60


class RefusingEnv:
    """Stands in for an Environment whose writes the file system refuses with `exc`."""

    def __init__(self, exc: Exception):
        self.exc = exc

    def begin(self, write: bool = False):
        raise self.exc


@pytest.mark.parametrize("exc, refused", [
    (lmdb.DiskError("mdb_txn_commit: Input/output error"), True),
    (lmdb.Error("mdb_put: No space left on device"), True),
    (lmdb.Error("mdb_put: Disk quota exceeded (quota)"), True),
    (lmdb.Error("mdb_put: something else"), False),
])
def test_a_full_disk_is_a_user_error_and_other_lmdb_errors_are_not(tmp_path, exc, refused):
    w = LMDBWriter(tmp_path / "x.lmdb")
    real, w.env = w.env, RefusingEnv(exc)
    try:
        if refused:
            with pytest.raises(UserError) as err:
                w.put_batch([(b"a", b"1")])
            assert str(err.value) == f"{tmp_path / 'x.lmdb'}: the disk refused the LMDB write ({exc}); free some space"
        else:
            with pytest.raises(lmdb.Error) as err:
                w.put_batch([(b"a", b"1")])
            assert err.value is exc and not isinstance(err.value, UserError)
    finally:
        w.env = real
        w.close()


def test_default_places_in_messages(store):
    with pytest.raises(UserError) as err:
        T.check_store({"fingerprint": "a" * 20}, "x", "b" * 20)
    assert str(err.value).endswith("the VQGAN in use has bbbbbbbbbbbbbbbb; re-tokenize with this VQGAN")
    with pytest.raises(UserError) as err:
        token_webdataset(store, "train", vqgan_fingerprint="0" * 64)
    assert str(err.value) == (f"codebook mismatch: tokens in {store} have fingerprint {FP[:16]}, the VQGAN in use "
                              f"has {'0' * 16}; re-tokenize with this VQGAN")
    with pytest.raises(UserError) as err:
        token_webdataset(store, "train", vqgan_fingerprint="0" * 64, vqgan_where="vq")
    assert str(err.value).endswith(f"the VQGAN in vq has {'0' * 16}; re-tokenize with this VQGAN")
    with pytest.raises(UserError) as err:
        TokenData.load(store, "train", True, "0" * 64, "vq/y")
    assert str(err.value).startswith(f"codebook mismatch: tokens in {store / 'tokens.lmdb'} have") and \
        "the VQGAN in vq/y has" in str(err.value)
    data = TokenData.load(store, "val", True, FP, "vq")
    assert data.labels.tolist() == [7, 5, 7, 5]  # with the flipped copies
    assert data.tokens.tolist()[2:] == [grid_of(5, True).flatten().tolist(), grid_of(6, True).flatten().tolist()]
    (store / "meta.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(UserError) as err:
        read_store_json(store)
    assert str(err.value) == f"{store}: token store format 'x' is not 'tokenmill.tokens/1'; re-tokenize"


def test_keys_are_any_bytes_but_newline(tmp_path):
    root = tmp_path / "k"
    root.mkdir()
    meta = {"format": FORMAT, "fingerprint": FP, "grid": [1, 1], "dtype_code": 1, "splits": ["train"], "hflip": False}
    keys = [b"a b", b"c\td"]  # a space and a tab inside keys
    recs = encode_records(np.array([[[1]], [[2]]]), [0, 1], [0, 0], [0, 0], 1)
    with LMDBWriter(root / "tokens.lmdb") as w:
        w.put_batch([(KEYS_PREFIX + b"train", b"\n".join(keys)), (META_KEY, json.dumps(meta).encode()),
                     *zip(keys, recs)])
    ds = TokenLMDBDataset(root, "train")
    assert ds.keys == keys and ds.get_batch([0, 1])[0].tolist() == [[[1]], [[2]]]


def test_a_store_without_meta_names_its_file(tmp_path):
    path = tmp_path / "tokens.lmdb"
    with LMDBWriter(path) as w:
        w.put_batch([(b"x", b"1")])
    with pytest.raises(UserError) as err:
        TokenLMDBDataset(tmp_path)
    assert str(err.value) == f"{path}: no __meta__ record; not a finished token store"


def test_a_store_replaced_after_the_check_is_refused_by_name(store, tmp_path):
    import shutil
    ds = TokenLMDBDataset(store, "train")
    moved = tmp_path / "b"
    shutil.copytree(store, moved)
    shutil.rmtree(store)
    moved.rename(store)
    with pytest.raises(UserError) as err:
        ds[0]
    assert str(err.value) == (f"{store}: the token store was replaced after this reader checked it (codebook "
                              f"fingerprint {FP[:16]}); open it again")


def test_a_reader_ends_its_transaction_when_dropped_in_its_own_process_only(store):
    import gc
    ds = TokenLMDBDataset(store, "val")
    ds[0]
    txn = ds._txn
    del ds
    gc.collect()
    with pytest.raises(lmdb.Error):  # aborted: the reader no longer pins the pages it read
        txn.get(b"v0")
    inherited = TokenLMDBDataset(store, "val")
    inherited[0]
    txn = inherited._txn
    inherited._pid = -1  # as a forked child sees its parent's reader: the transaction is not this process's
    del inherited
    gc.collect()
    assert txn.get(b"v0") is not None  # left alone
    txn.abort()
    never_read = TokenLMDBDataset(store, "val")
    never_read._pid = T.os.getpid()
    del never_read  # no transaction to end: nothing fails
    gc.collect()


def raw_tar(members: list[tuple[str, bytes]], end: bool = True, typeflag: bytes = b"0", linkname: str = "") -> bytes:
    """A ustar archive written by hand: each member's header then its data padded to 512; end blocks if `end`."""
    out = b""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        if typeflag != b"0":
            block[156:157] = typeflag
            block[157:257] = linkname.encode().ljust(100, b"\0")
        out += bytes(block) + data + b"\0" * (-len(data) % 512)
    return out + (b"\0" * 1024 if end else b"")


def test_shard_reader_edge_cases(tmp_path):
    p = tmp_path / "s.tar"
    # no end-of-archive blocks; the last member's data ends exactly at the end of the file
    p.write_bytes(raw_tar([("a.cls", b"1"), ("a.tok", b"t" * 512)], end=False))
    assert list(iter_token_shard(p)) == [(b"t" * 512, 1)]
    # ... or the last member is a header alone (an empty grid) at the very end
    p.write_bytes(raw_tar([("a.cls", b"1"), ("a.tok", b"")], end=False))
    assert list(iter_token_shard(p)) == [(b"", 1)]
    # a one-letter member first: its name's second byte is NUL, which is not the end of the archive
    p.write_bytes(raw_tar([("j", b"junk"), ("a.cls", b"2"), ("a.tok", b"u")]))
    assert list(iter_token_shard(p)) == [(b"u", 2)]
    # a size field of NULs only is size 0
    raw = bytearray(raw_tar([("a.cls", b"3"), ("a.tok", b"")]))
    raw[1024 + 124:1024 + 136] = b"\0" * 12
    p.write_bytes(bytes(raw))
    assert list(iter_token_shard(p)) == [(b"", 3)]
    # an old-style regular member (type flag NUL) is a file; a link is skipped whatever its target
    p.write_bytes(raw_tar([("a.cls", b"4")], end=False, typeflag=b"\0") + raw_tar([("a.tok", b"v")], typeflag=b"\0"))
    assert list(iter_token_shard(p)) == [(b"v", 4)]
    p.write_bytes(raw_tar([("z.cls", b"")], end=False, typeflag=b"2") + raw_tar([("a.cls", b"5"), ("a.tok", b"w")]))
    assert list(iter_token_shard(p)) == [(b"w", 5)]
    # a name that fills the 100-byte field (no NUL after it) ends at the field's end
    key = "k" * 96
    p.write_bytes(raw_tar([(key + ".cls", b"6"), (key + ".tok", b"x")]))
    assert list(iter_token_shard(p)) == [(b"x", 6)]


def test_webdataset_shuffles_whole_shards_then_samples_in_a_bounded_buffer(tmp_path, store):
    shards = [[3, 3, -1], [-1, 0, 0], [9, 9, 2], [2]]  # train's labels, shard by shard (originals and flips)

    def labels(s, **kw):
        return [label for _, label in token_webdataset(s, "train", **kw)]

    def as_shards(seq):  # the shard order, if seq is whole shards one after another, else None
        order, pos = [], 0
        while pos < len(seq):
            hit = [i for i, sh in enumerate(shards) if i not in order and seq[pos:pos + len(sh)] == sh]
            if not hit:
                return None
            order.append(hit[0])
            pos += len(shards[hit[0]])
        return order

    # shuffle=1: a one-sample buffer keeps each shard's samples together; the shard order follows the seed
    orders = {seed: as_shards(labels(store, shuffle=1, seed=seed)) for seed in range(4)}
    assert all(o is not None and sorted(o) == [0, 1, 2, 3] for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # the seed changes the shard order
    assert as_shards(labels(store, shuffle=1, seed=1)) == orders[1]  # reproducible
    assert labels(store, shuffle=0, seed=1) == sum(shards, [])  # shuffle=0: file order, shards included
    # a bigger buffer mixes samples across shards
    assert any(as_shards(labels(store, shuffle=4, seed=s)) is None for s in range(4))
    # one shard: only the sample buffer reorders; with `shuffle` samples buffered, output i is one of the first
    # i + shuffle + 1 samples of the shard (a buffer of 1000 could hand out any of them first)
    one = make_store(tmp_path / "one", shard_size=100)
    file_order = [LABELS[k] * 100 + f for k in SPLITS["train"] for f in (0, 1)]  # unique per sample
    for seed in range(6):
        out = [label * 100 + int(g[0, 0] != grid_of(INDEX[_key_of(label)])[0, 0])
               for g, label in token_webdataset(one, "train", shuffle=2, seed=seed)]
        assert sorted(out) == sorted(file_order)
        assert all(file_order.index(x) <= i + 3 for i, x in enumerate(out)), (seed, out)


def _key_of(label: int) -> bytes:
    return next(k for k, v in LABELS.items() if v == label)


def test_resampled_streams_follow_their_seed(store):
    def draw(seed):
        return [label for _, label in token_webdataset(store, "train", resampled=True, epoch_length=60, shuffle=0,
                                                       seed=seed)]
    # ResampledShards without deterministic=True mixes the pid, the time and os.urandom into its seed
    assert draw(3) == draw(3)  # ~25 shard draws out of 4: equal by chance with probability ~4**-24
    assert draw(3) != draw(4)


def test_a_reader_that_failed_to_open_leaves_nothing_to_clean_up(tmp_path, monkeypatch):
    """__init__ stopped before any attribute was set: __del__ must not raise (Python would print "Exception
    ignored in ... __del__" on stderr)."""
    import gc
    import sys
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(UserError):
        TokenLMDBDataset(tmp_path / "none")
    gc.collect()
    assert unraisable == []


def test_a_size_field_with_a_stray_letter_is_corrupt(tmp_path):
    p = tmp_path / "s.tar"
    raw = bytearray(raw_tar([("a.cls", b"1"), ("a.tok", b"t")]))
    raw[1024 + 124:1024 + 136] = b"0000000001X\0"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt tar header at byte 1024"):
        list(iter_token_shard(p))


def test_webdataset_seed_batches_and_default_seed(tmp_path, store):
    one = make_store(tmp_path / "one", shard_size=100)  # one shard: only the sample buffer reorders

    def labels(s, **kw):
        return [label for _, label in token_webdataset(s, "train", **kw)]
    assert len({tuple(labels(one, shuffle=4, seed=s)) for s in range(4)}) > 1  # the sample buffer's seed counts
    assert labels(store, shuffle=4) == labels(store, shuffle=4, seed=0)  # the default seed is 0
    assert labels(store, shuffle=4, seed=0) != labels(store, shuffle=4, seed=1)
    sizes = [len(labels_) for _, labels_ in token_webdataset(store, "train", shuffle=0, batch_size=4)]
    assert sizes == [4, 4, 2]  # batches of batch_size, the last one partial
