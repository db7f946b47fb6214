import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_bad_corpus, make_good_folder, png_bytes
from pipeline.errors import UserError
from pipeline.images import decode_png
from pipeline.shards import ShardWriter, iter_tar_samples
from stages.prepare import DatasetSpec, PrepareConfig, PrepareParams, read_idx, run


def cfg(tmp_path: Path, name: str, **spec) -> PrepareConfig:
    return PrepareConfig(name, DatasetSpec(**spec), PrepareParams(out_dir=str(tmp_path / "out"), shard_size=16))


def load_split(out: Path, split: str) -> list[tuple[str, np.ndarray, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        for key, files, problems in iter_tar_samples(out / shard):
            assert not problems
            samples.append((key, decode_png(files["png"]), int(files["cls"])))
    return samples


def test_idx_round_trip_and_manifest(tmp_path, idx_dir):
    c = cfg(tmp_path, "fm", source="idx", path=str(idx_dir), resolution=32, channels=1, resize="pad")
    run(c)
    manifest = json.loads((c.out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 40 and manifest["splits"]["val"]["count"] == 10
    assert manifest["resolution"] == 32 and manifest["channels"] == 1
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert manifest["splits"]["train"]["shard_sizes"] == [16, 16, 8]
    images = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    samples = load_split(c.out, "train")
    assert [k for k, _, _ in samples] == [f"train_{i:06d}" for i in range(40)]
    for i, (key, arr, label) in enumerate(samples):
        assert arr.shape == (32, 32, 1) and label == labels[i]
        # pad 28 -> 32 centres the original pixels exactly, background 0 around them
        assert np.array_equal(arr[2:30, 2:30, 0], images[i])
        assert arr[:2].sum() == 0 and arr[:, :2].sum() == 0
    assert sum(manifest["splits"]["train"]["per_class"]) == 40


def test_rerun_is_byte_identical(tmp_path, idx_dir):
    c = cfg(tmp_path, "fm", source="idx", path=str(idx_dir))
    run(c)
    first = {p.name: p.read_bytes() for p in c.out.iterdir()}
    run(c)
    second = {p.name: p.read_bytes() for p in c.out.iterdir()}
    assert first == second
    assert not [p for p in c.out.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_bad_inputs_are_converted_or_skipped_with_reasons(tmp_path):
    expected = make_bad_corpus(tmp_path / "src")
    c = cfg(tmp_path, "bad", source="folder", path=str(tmp_path / "src"), split="random", val_fraction=0.0,
            resolution=16, channels=3, background=255)
    run(c)
    report = json.loads((c.out / "report.json").read_text())
    skipped = {Path(s["origin"]).name: s["reason"] for s in report["skipped"]}
    for name, outcome in expected.items():
        assert (name in skipped) == (outcome == "skipped"), (name, skipped.get(name))
    assert skipped["zero.png"].startswith("empty file")
    assert skipped["truncated.png"].startswith("corrupt or truncated")
    assert skipped["text.jpg"].startswith("not a readable image")
    assert skipped["tiny.png"].startswith("too small (1x1")
    assert "decompression bomb" in skipped["bomb.png"] or "too many pixels" in skipped["bomb.png"]
    assert skipped["notes.txt"].startswith("not an image extension")
    kept = load_split(c.out, "train")
    assert len(kept) == sum(o == "kept" for o in expected.values())
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for _, a, _ in kept)
    assert set(report["converted"]) >= {"converted I;16 to 8-bit", "converted palette image",
                                        "composited RGBA alpha on background 255", "converted CMYK"}


def test_alpha_is_composited_on_background(tmp_path):
    d = tmp_path / "src" / "a"
    d.mkdir(parents=True)
    Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(d / "clear.png")
    c = cfg(tmp_path, "alpha", source="folder", path=str(tmp_path / "src"), split="random", val_fraction=0.0,
            resolution=16, channels=3, background=255)
    run(c)
    (_, arr, _), = load_split(c.out, "train")
    assert (arr == 255).all()


def test_folder_classes_and_deterministic_random_split(tmp_path):
    src = make_good_folder(tmp_path / "src", classes=("cat", "dog"), per_class=20)
    c = cfg(tmp_path, "pets", source="folder", path=str(src), split="random", val_fraction=0.25,
            resolution=16, channels=1, resize="resize")
    run(c)
    m = json.loads((c.out / "manifest.json").read_text())
    assert m["class_names"] == ["cat", "dog"]
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 40
    assert 0 < m["splits"]["val"]["count"] < 20
    # adding a file keeps every existing sample in its split (hash split, not order based)
    keys_before = {s: {k for k, _, _ in load_split(c.out, s)} for s in ("train", "val")}
    Image.new("RGB", (20, 20)).save(src / "cat" / "new.png")
    run(c)
    keys_after = {s: {k for k, _, _ in load_split(c.out, s)} for s in ("train", "val")}
    assert all(keys_before[s] <= keys_after[s] for s in keys_before)


def test_webdataset_source_refuses_unsafe_members(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    good = png_bytes(Image.new("L", (20, 20), 7))
    with tarfile.open(src / "train-000000.tar", "w") as tar:
        for name, data in (("a.png", good), ("a.cls", b"1"), ("../evil.png", good), ("/abs.png", good)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(src / "val-000000.tar", "w") as tar:
        for name, data in (("c.png", good), ("c.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    c = cfg(tmp_path, "w", source="webdataset", path=str(src), resolution=16, split="keep")
    run(c)
    m = json.loads((c.out / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] == 1 and m["splits"]["val"]["count"] == 1
    reasons = [s["reason"] for s in json.loads((c.out / "report.json").read_text())["skipped"]]
    assert sum("refused tar member" in r for r in reasons) == 3
    assert not (tmp_path / "evil.png").exists() and not Path("/abs.png").exists()


def test_nothing_usable_fails_with_one_line(tmp_path):
    d = tmp_path / "src" / "x"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(b"")
    c = cfg(tmp_path, "empty", source="folder", path=str(tmp_path / "src"), split="random")
    with pytest.raises(UserError, match=r"datasets.empty: no usable images .* \(skipped: empty file x1\)"):
        run(c)
    assert not c.out.exists()


def test_missing_source_fails_with_one_line(tmp_path):
    c = cfg(tmp_path, "gone", source="folder", path=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="datasets.gone.path: .*nope does not exist"):
        run(c)


def test_corrupt_idx_is_a_clear_error(tmp_path, idx_dir):
    p = idx_dir / "train-images-idx3-ubyte.gz"
    import gzip
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: IDX body has"):
        run(cfg(tmp_path, "fm", source="idx", path=str(idx_dir)))


def test_interrupted_shard_never_has_final_name(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, "train", maxcount=3) as w:
            for i in range(5):
                w.write(f"k{i}", {"cls": b"0"})
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # the complete one only
    assert [k for k, _, _ in iter_tar_samples(out / "train-000000.tar")] == ["k0", "k1", "k2"]


def test_report_counts_float_scaling_and_first_frames_apart(tmp_path):
    d = tmp_path / "src" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 0.6, np.float32), "F").save(d / "unit.tif")
    Image.fromarray(np.full((16, 16), 100.0, np.float32), "F").save(d / "bytes.tif")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    c = cfg(tmp_path, "conv", source="folder", path=str(tmp_path / "src"), split="random", val_fraction=0.0,
            resolution=16, channels=1)
    run(c)
    report = json.loads((c.out / "report.json").read_text())
    assert report["skipped"] == []
    assert report["converted"] == {"converted float image in 0..1": 1, "converted float image": 1,
                                   "first frame of a multi-frame image": 1}
    values = sorted(int(a[0, 0, 0]) for _, a, _ in load_split(c.out, "train"))
    assert values == [76, 100, 153]  # red's luma; 100 as it was; 0.6 * 255
