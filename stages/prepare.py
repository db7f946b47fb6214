"""Stage `prepare`: images from a source -> WebDataset shards at one resolution + manifest + skip report.

Sources: Fashion-MNIST style IDX files, an image folder (class sub-folders become labels), or an existing
WebDataset of images (label: `.cls`/`.label` text or `.json` "label", a non-negative integer class index; anything
else is refused; one image per sample, the others skipped with a reason). Output `<out_dir>/<dataset>/`:
  <split>-%06d.tar   samples {key}.png (uint8 HxWxC), {key}.cls (label as text), {key}.json (origin)
  manifest.json      counts per split and class, resolution, channels, class names, source, fingerprint
  report.json        every skipped input with its reason, counts of conversions, and (channels: 1) the colour
                     images made grey (`colour_made_grey`: count and the first few origins), so a caller can refuse
The folder appears under its final name only when complete; re-running gives byte-identical output.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import check_replaceable, new_partial_dir, replace_dir, write_json
from pipeline.config import SEED_MAX, asdict, check_dataset_name, from_dict, load_params, param, section
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from pipeline.images import SkipImage, conform, decode_image, encode_png, is_colour
from pipeline.shards import ShardWriter, iter_tar_samples

log = logging.getLogger("tokenmill.prepare")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val")
FORMAT = "tokenmill.prepared/1"


@dataclass
class DatasetSpec:
    """One entry of params.yaml `datasets:`."""
    source: Literal["idx", "folder", "webdataset"]
    path: str
    resolution: int = param(32, min=4, max=4096)
    channels: int = param(1, choices=(1, 3))
    resize: Literal["pad", "resize", "center_crop"] = "pad"
    background: int = param(0, min=0, max=255)  # alpha compositing and padding colour
    split: Literal["keep", "random"] = "keep"  # keep the source's train/val(test) split, or draw one
    val_fraction: float = param(0.1, min=0.0, max=0.9)  # for split: random
    class_names: list[str] | None = None
    max_per_split: int | None = param(None, min=1)  # cap for smoke runs; None = everything
    convert_channels: bool = False  # read by tokenize@<name> only: grey <-> RGB to match the VQGAN's channels


@dataclass
class PrepareParams:
    """params.yaml `prepare:` (shared by every dataset)."""
    out_dir: str = param("data/prepared", kind="out_path")
    shard_size: int = param(10000, min=1)
    min_side: int = param(8, min=1)  # smaller inputs are skipped (a 1x1 image carries nothing)
    max_pixels: int = param(50_000_000, min=1)  # decompression-bomb guard
    seed: int = param(0, min=0, max=SEED_MAX)  # for split: random


@dataclass
class PrepareConfig:
    name: str
    dataset: DatasetSpec
    prepare: PrepareParams = field(default_factory=PrepareParams)

    @property
    def out(self) -> Path:
        return Path(self.prepare.out_dir) / self.name


@dataclass
class RawSample:
    key: str
    origin: str  # file path or shard/member, for the report
    split: str | None  # from the source when it has one
    label: int
    data: bytes | np.ndarray
    unlabelled: bool = False  # a webdataset sample without a label member: class 0


# ---------------------------------------------------------------- sources

def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip'd): magic 0x0000 <dtype 0x08=uint8> <ndim>, big-endian dims, data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not a uint8 IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise UserError(f"{path}: IDX body has {len(body)} bytes, header says {n} (truncated or corrupt)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: missing IDX file {stem}(.gz)")


def iter_idx(root: Path) -> Iterator[RawSample]:
    for split, stem in (("train", "train"), ("val", "t10k")):
        images = read_idx(_idx_file(root, f"{stem}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(root, f"{stem}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{root}: {stem} images {images.shape} and labels {labels.shape} do not match")
        for i in range(len(images)):
            yield RawSample(f"{stem}_{i:06d}", f"{stem}[{i}]", split, int(labels[i]), images[i])


def _hash_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def folder_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_layout(root: Path, spec: DatasetSpec) -> tuple[dict[str, Path], list[str]]:
    """The split folders ({"": root} for split: random) and the class names, in label order.

    Class folders are the union over the splits, so a class folder only val/ has would be a class the model
    never trains on (most often a typo'd or misplaced folder): refused in one line unless class_names lists it.
    """
    split_dirs: dict[str, Path] = {"": root}
    if spec.split == "keep":  # folder names in any case (Train/, VAL/), as shard names are read
        subdirs: dict[str, list[Path]] = {}
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            subdirs.setdefault(d.name.lower(), []).append(d)
        for same in subdirs.values():
            if len(same) > 1:
                raise UserError(f"{root}: split folders {same[0].name}/ and {same[1].name}/ differ only in case; "
                                f"keep one")
        train = subdirs.get("train", [None])[0]
        val = next((subdirs[n][0] for n in ("val", "valid", "validation", "test") if n in subdirs), None)
        if train is None or val is None:
            raise UserError(f"{root}: split 'keep' needs train/ and val/ (or test/) sub-folders; "
                            f"use split: random")
        split_dirs = {"train": train, "val": val}
    if spec.class_names:
        return split_dirs, list(spec.class_names)
    found = {split: folder_classes(d) for split, d in split_dirs.items()}
    if spec.split == "keep":
        val_only = sorted(set(found["val"]) - set(found["train"]))
        if val_only:
            val, name = split_dirs["val"], val_only[0]
            more = f" (and {len(val_only) - 1} more: {', '.join(val_only[1:6])})" if len(val_only) > 1 else ""
            raise UserError(f"{val / name}: class folder {name!r} is in {val.name}/ but not in train/{more}; "
                            f"a class needs training images: move or rename the folder, or list every class "
                            f"in class_names")
    return split_dirs, sorted({c for classes in found.values() for c in classes})


def iter_folder(root: Path, spec: DatasetSpec, skipped: list[dict]) -> Iterator[RawSample]:
    split_dirs, classes = folder_layout(root, spec)
    # Class folders anywhere mean every image needs one: a val/ of loose files beside train/<class>/ must not
    # become class 0. Without any class folder (and no class_names) the dataset is one class.
    by_class = any(folder_classes(d) for d in split_dirs.values())
    for split, base in split_dirs.items():
        files = sorted(p for p in base.rglob("*") if p.is_file() or p.is_symlink())
        for p in files:
            rel = p.relative_to(base)
            if p.is_symlink() and not p.resolve().is_relative_to(root.resolve()):
                skipped.append({"origin": str(p), "reason": "symlink pointing outside the dataset folder"})
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                skipped.append({"origin": str(p), "reason": f"not an image extension ({p.suffix or 'none'})"})
                continue
            if by_class:
                if len(rel.parts) < 2:
                    skipped.append({"origin": str(p), "reason": "outside a class folder"})
                    continue
                if rel.parts[0] not in classes:
                    skipped.append({"origin": str(p), "reason": f"class folder {rel.parts[0]!r} not in class_names"})
                    continue
                label = classes.index(rel.parts[0])
            else:
                label = 0
            try:
                data = p.read_bytes()
            except OSError as exc:
                skipped.append({"origin": str(p), "reason": f"unreadable ({exc.strerror})"})
                continue
            yield RawSample(_hash_key(f"{split}/{rel.as_posix()}"), str(p), split or None, label, data)


def _shard_split(name: str) -> str | None:
    lower = name.lower()
    if lower.startswith("train"):
        return "train"
    if lower.startswith(("val", "test")):  # "valid..." starts with "val"
        return "val"
    return None


def iter_webdataset(path: Path, spec: DatasetSpec, skipped: list[dict]) -> Iterator[RawSample]:
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not shards:
        raise UserError(f"{path}: no .tar shards found")
    for shard in shards:
        split = None
        if spec.split == "keep":
            split = _shard_split(shard.name)
            if split is None:
                raise UserError(f"{shard}: split 'keep' needs shard names starting with train/val/test; "
                                f"use split: random")
        seen: set[str] = set()
        try:
            for key, files, problems in iter_tar_samples(shard):
                if key in seen:  # a sample's members apart: its label or image would be lost without a word
                    raise UserError(f"{shard}: the members of sample {key!r} are not next to each other (WebDataset "
                                    f"reads a sample from consecutive members); make the tar with `tar --sort=name`")
                seen.add(key)
                for p in problems:  # "<member>: <reason>"; a member name may hold ':' itself
                    member, reason = p.rsplit(": ", 1)
                    skipped.append({"origin": f"{shard.name}:{member}", "reason": reason})
                if not files:
                    continue
                origin = f"{shard.name}:{key}"
                images = [e for e in files if "." + e.split(".")[-1] in IMAGE_EXTS]
                if not images:
                    skipped.append({"origin": origin, "reason": "sample has no image member"})
                    continue
                ext = images[0]
                for other in images[1:]:
                    skipped.append({"origin": f"{shard.name}:{key}.{other}",
                                    "reason": f"second image of a sample (sample {key!r} already has {key}.{ext}; "
                                              f"WebDataset keys end at the first dot of the name)"})
                label = _label_of(files, f"{shard}:{key}")  # None: unlabelled data is one class, 0
                yield RawSample(_hash_key(f"{shard.name}/{key}"), origin, split, label or 0, files[ext], label is None)
        except UserError:
            raise
        except Exception as exc:  # tarfile.ReadError, truncated archive, ...
            skipped.append({"origin": str(shard), "reason": f"unreadable tar after some samples ({exc})"})


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a label of 10**9 is a mistake that would size every per-class list
LABEL_RULE = f"a label must be a non-negative integer class index below {MAX_CLASSES}"


def _label_of(files: dict[str, bytes], where: str) -> int | None:
    """The sample's class index from `.cls`/`.label` text or a `.json` "label", None when it has none.

    `where` is "<tar>:<key>"; a label that is not a non-negative integer (a class name, -1, 2.0) is refused in
    one line naming the member and the value: taking it as class 0 would mislabel the image silently.
    """
    for ext in ("cls", "label"):
        if ext in files:
            text = files[ext].decode("utf-8", "replace").strip()
            if not text.isascii() or not text.isdigit() or int(text) >= MAX_CLASSES:
                raise UserError(f"{where}.{ext}: label {text[:40]!r} refused: {LABEL_RULE}")
            return int(text)
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as exc:
            raise UserError(f"{where}.json: not valid JSON ({exc}); the label is read from its \"label\"") from None
        value = meta.get("label") if isinstance(meta, dict) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CLASSES:
            raise UserError(f"{where}.json: label {json.dumps(value)[:40]} refused: {LABEL_RULE} "
                            f"(class names go in the dataset's class_names)")
        return value
    return None


# ---------------------------------------------------------------- the stage

def assign_split(sample: RawSample, spec: DatasetSpec, seed: int) -> str:
    if spec.split == "keep":
        return sample.split or "train"
    # Hash of (seed, key): stable when files are added or removed, independent of order.
    h = int(hashlib.sha256(f"{seed}:{sample.key}".encode()).hexdigest()[:8], 16)
    return "val" if h / 2**32 < spec.val_fraction else "train"


def run(cfg: PrepareConfig) -> None:
    check_replaceable(cfg.out, "prepare")
    spec, pp = cfg.dataset, cfg.prepare
    src = Path(spec.path)
    if not src.exists():
        raise UserError(f"datasets.{cfg.name}.path: {src} does not exist")
    skipped: list[dict] = []
    if spec.source == "idx":
        samples = iter_idx(src)
        class_names = spec.class_names
    elif spec.source == "folder":
        if not src.is_dir():
            raise UserError(f"datasets.{cfg.name}.path: {src} is not a folder")
        samples = iter_folder(src, spec, skipped)
        class_names = folder_layout(src, spec)[1] or ["all"]
    else:
        samples = iter_webdataset(src, spec, skipped)
        class_names = spec.class_names

    final = cfg.out
    tmp = new_partial_dir(final)
    writers = {s: ShardWriter(tmp, s, pp.shard_size) for s in SPLITS}
    counts = {s: Counter() for s in SPLITS}
    conversions: Counter = Counter()
    made_grey: list[str] = []  # origins of colour images that channels: 1 made grey (lossy, unlike grey -> RGB)
    unlabelled: list[str] = []  # origins of webdataset samples without a label (class 0 beside labelled ones?)
    digest = hashlib.sha256()
    seen_keys: set[str] = set()
    try:
        for sample in tqdm(samples, desc=f"prepare {cfg.name}", unit="img", mininterval=2.0):
            split = assign_split(sample, spec, pp.seed)
            if spec.max_per_split is not None and sum(counts[split].values()) >= spec.max_per_split:
                continue
            if sample.key in seen_keys:
                skipped.append({"origin": sample.origin, "reason": f"duplicate sample key {sample.key}"})
                continue
            try:
                if isinstance(sample.data, np.ndarray):
                    im = Image.fromarray(sample.data, "L" if sample.data.ndim == 2 else "RGB")
                else:
                    im = decode_image(sample.data, max_pixels=pp.max_pixels)
                arr, note = conform(im, resolution=spec.resolution, channels=spec.channels, resize=spec.resize,
                                    background=spec.background, min_side=pp.min_side)
            except SkipImage as exc:
                skipped.append({"origin": sample.origin, "reason": str(exc)})
                continue
            if note:
                conversions[note.split(" (")[0]] += 1
            if spec.channels == 1 and not isinstance(sample.data, np.ndarray) and is_colour(im):
                made_grey.append(sample.origin)
            seen_keys.add(sample.key)
            if sample.unlabelled:
                unlabelled.append(sample.origin)
            counts[split][sample.label] += 1
            digest.update(f"{split}/{sample.key}/{sample.label}/".encode())
            digest.update(arr.tobytes())
            files = {"png": encode_png(arr), "cls": str(sample.label).encode()}
            if spec.source != "idx":  # IDX keys already say where a sample came from
                files["json"] = json.dumps({"origin": sample.origin}, sort_keys=True).encode()
            writers[split].write(sample.key, files)
        for w in writers.values():
            w.close()
        n_total = sum(sum(c.values()) for c in counts.values())
        if n_total == 0:
            reasons = Counter(s["reason"].split(" (")[0] for s in skipped).most_common(3)
            raise UserError(f"datasets.{cfg.name}: no usable images in {src}"
                            + (f" (skipped: {', '.join(f'{r} x{n}' for r, n in reasons)})" if reasons else ""))
        n_classes = max(max(c, default=-1) for c in counts.values()) + 1
        if class_names is None:
            class_names = [str(i) for i in range(n_classes)] or ["all"]
        if n_classes > len(class_names):
            raise UserError(f"datasets.{cfg.name}.class_names has {len(class_names)} names "
                            f"but labels go up to {n_classes - 1}")
        manifest = {
            "format": FORMAT,
            "dataset": cfg.name,
            "source": {"kind": spec.source, "path": str(src)},
            "resolution": spec.resolution,
            "channels": spec.channels,
            "resize": spec.resize,
            "class_names": list(class_names),
            "splits": {
                s: {"count": sum(counts[s].values()),
                    "per_class": [counts[s][i] for i in range(len(class_names))],
                    "shards": writers[s].shards, "shard_sizes": writers[s].sizes}
                for s in SPLITS
            },
            "skipped": len(skipped),
            "params": {"dataset": {k: v for k, v in asdict(spec).items() if k != "convert_channels"},
                       "prepare": {k: v for k, v in asdict(pp).items() if k != "out_dir"}},
            "fingerprint": digest.hexdigest(),
        }
        report = {"skipped": skipped, "converted": dict(conversions),
                  "skipped_by_reason": dict(Counter(s["reason"].split(" (")[0] for s in skipped))}
        if mixed := mixed_scales(conversions):
            report["mixed_scales"] = mixed
        if made_grey:  # only then: the reports of datasets without any stay as they were
            report["colour_made_grey"] = {"count": len(made_grey), "first": made_grey[:5]}
        if unlabelled and len(unlabelled) < n_total:  # some samples labelled, some not: likely a missing .cls
            report["unlabelled_as_class_0"] = {"count": len(unlabelled), "first": unlabelled[:5]}
            log.warning("%s: %d of %d samples have no label and were made class 0 beside labelled ones (first: %s); "
                        "see report.json", cfg.name, len(unlabelled), n_total, unlabelled[0])
        write_json(tmp / "report.json", report)
        write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, final, "prepare")
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if conversions:  # a dark or rescaled reading should be seen without opening report.json
        log.info("%s: %s", cfg.name, "; ".join(f"{n} x {kind}" for kind, n in sorted(conversions.items())))
    for mode, readings in mixed_scales(conversions).items():
        log.warning("%s: the %s images were read at %d scales (%s; pipeline/images.py decides per image): if they "
                    "hold one kind of data, convert them to 8-bit yourself", cfg.name, mode, len(readings),
                    "; ".join(f"{n} x {r}" for r, n in readings.items()))
    log.info("prepared %s: %s, %d skipped -> %s", cfg.name,
             ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in SPLITS), len(skipped), final)


def mixed_scales(conversions: Counter) -> dict[str, dict[str, int]]:
    """Image kinds (32-bit integer, float) whose images were given more than one reading of their values (8-bit or
    16-bit; 0..1, -1..1 or 0..255): decided per image, so one dataset may mix them."""
    readings: dict[str, Counter] = {"32-bit integer": Counter(), "float": Counter()}
    for note, n in conversions.items():
        if note.startswith("converted I with"):
            readings["32-bit integer"]["as 8-bit"] += n
        elif note.startswith("converted I to"):
            readings["32-bit integer"]["as 16-bit"] += n
        elif note.startswith("converted float image"):
            scale = note.removeprefix("converted float image").strip() or "in 0..255"
            readings["float"][scale] += n
    return {kind: dict(sorted(c.items())) for kind, c in readings.items() if len(c) > 1}


SECTIONS = ("datasets", "prepare")


def check(params: dict, source: str) -> None:
    """Validate this stage's sections (every dataset entry and `prepare`)."""
    datasets = params.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise UserError(f"{source}: section 'datasets' must map names to dataset entries")
    for name, raw in datasets.items():
        check_dataset_name(name, source)
        from_dict(DatasetSpec, raw, f"datasets.{name}", source)
    section(params, "prepare", PrepareParams, source)


def load_config(params_path: str, name: str) -> PrepareConfig:
    check_dataset_name(name, "--dataset")
    params = load_params(params_path)
    datasets = params.get("datasets") or {}
    if name not in datasets:
        raise UserError(f"{params_path}: no dataset '{name}' under datasets (have: {', '.join(datasets) or 'none'})")
    spec = from_dict(DatasetSpec, datasets[name], f"datasets.{name}", params_path)
    pp = section(params, "prepare", PrepareParams, params_path)
    return PrepareConfig(name, spec, pp)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, load_config=load_config)
