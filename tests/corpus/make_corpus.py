"""Writes the checked-in bad-input corpus (tests/corpus/) and the parts too big or too machine-specific to check in.

    python tests/corpus/make_corpus.py      # rewrite the checked-in files (deterministic bytes)

Checked in: images/ (one class folder of broken, odd and mislabelled images), webdataset/ (a WebDataset source whose
train tar has `../`, absolute, symlink and hard-link members), expected.json (what each input must give, and the
params edits: wrong types, out-of-range values, unknown keys, a missing section, with the error each must give).
Generated where needed (`generated_inputs`): a decompression bomb (140 KB of PNG), an empty dataset folder (git keeps
no empty folders). scripts/bad_inputs.py generates the rest (token stores, checkpoints) from a small run.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, expected outcome)}; outcome "kept" (maybe converted) or "skipped"."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    good = png_bytes(Image.fromarray(rgb, "RGB"))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)], axis=2)
    palette_t = Image.fromarray(rgb, "RGB").convert("P")
    grey16 = Image.fromarray(rng.integers(0, 65535, (16, 16)).astype(np.uint16))
    return {
        "good.png": (good, "kept"),
        "zero.png": (b"", "skipped"),
        "truncated.png": (good[: len(good) // 2], "skipped"),
        "text.jpg": (b"this is not an image at all\n" * 10, "skipped"),
        "png_named.jpg": (good, "kept"),  # mislabelled: decoded by content, not by extension
        "jpeg_named.png": (jpeg_bytes(Image.fromarray(rgb, "RGB")), "kept"),
        "rgba.png": (png_bytes(Image.fromarray(rgba, "RGBA")), "kept"),
        "palette.png": (png_bytes(Image.fromarray(rgb, "RGB").convert("P")), "kept"),
        "palette_transparent.png": (png_bytes(palette_t, transparency=0), "kept"),
        "grey16.png": (png_bytes(grey16), "kept"),
        "cmyk.jpg": (jpeg_bytes(Image.fromarray(rgb, "RGB").convert("CMYK")), "kept"),
        "tiny.png": (png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))), "skipped"),
        "notes.txt": (b"hello", "skipped"),
    }


def tar_members() -> list[tuple[str, bytes | None, str]]:
    """Members of webdataset/train-000000.tar: (name, data or None for a link, expected outcome)."""
    good = png_bytes(Image.new("L", (20, 20), 7))
    return [("a.png", good, "kept"), ("a.cls", b"1", "kept"), ("../evil.png", good, "refused"),
            ("/abs.png", good, "refused"), ("b.png", None, "refused"),  # symlink to /etc/passwd
            ("c.png", None, "refused")]  # hard link to /etc/passwd


def write_tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, _ in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if data is None:
                info.type = tarfile.SYMTYPE if name == "b.png" else tarfile.LNKTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# params: each edit (applied to the repo's params.yaml) breaks one key; the one-line error must contain the text
PARAMS = {
    "wrong type": ("prepare.shard_size=lots", "prepare.shard_size = 'lots' has the wrong type"),
    "out of range": ("prepare.shard_size=-1", "prepare.shard_size = -1 is out of range"),
    "unknown key": ("train_vqgan.stepz=10", "unknown key 'train_vqgan.stepz'"),
    "not a choice": ("tokenize.search=gpu", "tokenize.search = 'gpu' is not allowed"),
    "wrong list item": ("train_vqgan.model.ch_mult=[1, two]",
                        "train_vqgan.model.ch_mult[1] = 'two' has the wrong type"),
    "missing section": ("-evaluate", "evaluate"),
}


def write_checked_in() -> None:
    images = HERE / "images" / "things"
    images.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in image_files().items():
        (images / name).write_bytes(data)
    wds = HERE / "webdataset"
    wds.mkdir(exist_ok=True)
    write_tar(wds / "train-000000.tar", tar_members())
    val_png = png_bytes(Image.new("L", (20, 20), 3))
    write_tar(wds / "val-000000.tar", [("v.png", val_png, "kept"), ("v.cls", b"0", "kept")])
    expected = {"images": {n: o for n, (_, o) in image_files().items()} | {"bomb.png": "skipped"},
                "webdataset": {n: o for n, _, o in tar_members()},
                "params": {n: {"edit": e, "error": m} for n, (e, m) in PARAMS.items()}}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


def generated_inputs(root: Path) -> dict[str, Path]:
    """The inputs not checked in, written under `root`: a decompression bomb and an empty dataset folder."""
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(bomb, format="PNG", optimize=True)  # 144 Mpixel header, 140 KB
    (root / "bomb").mkdir(parents=True, exist_ok=True)
    (root / "bomb" / "bomb.png").write_bytes(bomb.getvalue())
    (root / "empty" / "nothing").mkdir(parents=True, exist_ok=True)
    return {"bomb": root / "bomb" / "bomb.png", "empty": root / "empty"}


if __name__ == "__main__":
    write_checked_in()
    print(f"wrote {HERE}")
