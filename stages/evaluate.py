"""Stage `evaluate`: gFID, KID, precision/recall, per-class FID and code usage of generated samples.

Input (written by the `sample` stage; data/README.md states the contract): `<samples_dir>/`
  samples-%06d.tar   WebDataset shards; sample key s%07d with
                     .png  decoded image, 8-bit, the dataset's resolution and channels
                     .cls  class label as text, -1 when unconditional
                     .tok  token grid h*w, raw little-endian uint16 (int32 when the codebook has > 65536 codes)
  manifest.json      {"count", "grid": [h, w], "token_dtype", "codebook_fingerprint", "resolution", "channels",
                      "class_names", "conditional", "n_codes", "seed", "sampler": {...}, "kind",
                      and "model_fingerprint" where the sample stage records it}
Every sample is checked (shape, bit depth, label range, token length and range) and a bad one stops the
stage with one line naming it: a metric over silently skipped samples would not be the number it claims.
Size and mode are read from the PNG header before any pixel is decoded, so a decompression bomb among the
samples is refused unread.

Compared with the `fid_ref` reference (checked: dataset fingerprint, resize mode, network hash, resolution,
channels). Outputs: the metrics JSON, a few flat columns for `dvc metrics show` (fid, kid, precision, recall,
perplexity, usage_pct, and `protocol`: the id of the measurement protocol, equal ids = comparable numbers),
and `<report_dir>/` with metrics.json (every number with its full protocol: counts, reference split and
subset seed, dataset fingerprint, resize mode, network hash, and the sampler: kind, model and codebook
fingerprints, sampler params, seed, sha256 of the evaluated samples; keys gfid, gkid_mean, gkid_std,
gprecision, grecall, code_usage_pct, code_perplexity, per_class_gfid.<class>), report.md, grid.png (a row
per class when conditional), code_frequency.png and per_class_fid.png.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import check_replaceable, new_partial_dir, replace_dir, write_json
from pipeline.config import SEED_MAX, check_dataset_ref, param, section
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from pipeline.fid import Protocol, compute_metrics, frechet_distance_features, protocol_id, with_protocol
from pipeline.prepared import read_manifest
from pipeline.report import (code_usage, markdown_table, metric_rows, new_figure, protocol_lines, save_figure,
                             save_rows_grid, write_text)
from pipeline.runlog import headline, write_metrics
from pipeline.shards import iter_tar_samples
from pipeline.fid_reference import NetworkParams, Reference, ResizeMode, check_reference, features_of, load_network, \
    load_reference

log = logging.getLogger("tokenmill.evaluate")
SECTIONS = ("evaluate",)
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}
MANIFEST_FIELDS = {"count": int, "grid": list, "token_dtype": str, "codebook_fingerprint": str, "resolution": int,
                   "channels": int, "class_names": list, "conditional": bool, "n_codes": int, "seed": int,
                   "sampler": dict}
READ_BATCH = 64
HEADLINE = {"fid": "gfid", "kid": "gkid_mean", "precision": "gprecision", "recall": "grecall",
            "perplexity": "code_perplexity", "usage_pct": "code_usage_pct"}


@dataclass
class EvaluateParams:
    samples_dir: str = "data/samples/default"  # a sample stage output folder
    # the dataset the generator learned (its prepared manifest has the fingerprint)
    dataset: str = param("fashion_mnist", kind="name")
    prepared_dir: str = "data/prepared"
    reference: str = "data/fid_ref/fashion_mnist-val-tf_bilinear"  # a fid_ref output folder
    resize: ResizeMode = "tf_bilinear"  # must be the reference's
    n_samples: int | None = param(None, min=4)  # cap on the samples evaluated; null = all
    seed: int = param(0, min=0, max=SEED_MAX)  # KID subsets
    kid_subsets: int = param(100, min=1)
    kid_subset_size: int = param(1000, min=2)
    pr_k: int = param(3, min=1)
    per_class_min: int = param(100, min=2)  # per-class FID from fewer samples (either side) is flagged
    grid_per_class: int = param(10, min=1)  # grid columns (rows: classes, or 4 rows when unconditional)
    metrics: str = param("data/metrics/evaluate.json", kind="out_path")
    report_dir: str = param("data/reports/evaluate", kind="out_path")
    network: NetworkParams = field(default_factory=NetworkParams)


def check(params: dict, source: str) -> EvaluateParams:
    cfg = section(params, "evaluate", EvaluateParams, source)
    check_dataset_ref(params, "evaluate.dataset", cfg.dataset, source)
    return cfg


# ----------------------------------------------------------------------------- reading samples

def read_samples_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; generate samples first (the sample stage writes {folder})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    for key, kind in MANIFEST_FIELDS.items():
        if key not in manifest:
            raise UserError(f"{path}: missing field {key!r}")
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: {key} = {value!r} has the wrong type (expected {kind.__name__})")
    if manifest["token_dtype"] not in TOKEN_DTYPES:
        raise UserError(f"{path}: token_dtype {manifest['token_dtype']!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if manifest["token_dtype"] == "uint16" and manifest["n_codes"] > 65536:
        raise UserError(f"{path}: {manifest['n_codes']} codes do not fit token_dtype uint16 (use int32)")
    if len(manifest["grid"]) != 2 or not all(isinstance(g, int) and g > 0 for g in manifest["grid"]):
        raise UserError(f"{path}: grid = {manifest['grid']!r} must be [h, w] with positive integers")
    if manifest["channels"] not in (1, 3):
        raise UserError(f"{path}: channels = {manifest['channels']} (expected 1 or 3)")
    return manifest


@dataclass
class SampleStream:
    """Decode and validate generated samples shard by shard; yield uint8 image batches [B, H, W, C] for the
    feature network, and collect labels, the token histogram and the images shown in the grid on the way."""
    folder: Path
    manifest: dict[str, Any]
    limit: int
    grid_per_class: int
    labels: list[int] = field(default_factory=list)
    grid: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token_counts = np.zeros(self.manifest["n_codes"], dtype=np.int64)
        # What was evaluated, byte for byte: the evaluated samples' keys and files, in order.
        self.content = hashlib.sha256()

    def batches(self) -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        for shard in sorted(self.folder.glob("samples-*.tar")):
            for key, files, problems in iter_tar_samples(shard):
                if problems:
                    raise UserError(f"{shard}: {problems[0]}")
                batch.append(self._sample(f"{shard.name}:{key}", files))
                if len(batch) == READ_BATCH or len(self.labels) == self.limit:
                    yield np.stack(batch)
                    batch = []
                if len(self.labels) == self.limit:
                    return
        if batch:
            yield np.stack(batch)

    def _sample(self, where: str, files: dict[str, bytes]) -> np.ndarray:
        m = self.manifest
        missing = [ext for ext in ("png", "cls", "tok") if ext not in files]
        if missing:
            raise UserError(f"sample {where}: missing .{', .'.join(missing)} (has {', '.join(sorted(files))})")
        image = self._image(where, files["png"])
        try:
            label = int(files["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise UserError(f"sample {where}: .cls {files['cls'][:20]!r} is not an integer label") from None
        n_classes = len(m["class_names"])
        if m["conditional"] and not 0 <= label < n_classes:
            raise UserError(f"sample {where}: label {label} is outside the {n_classes} classes")
        if not m["conditional"] and label != -1:
            raise UserError(f"sample {where}: label {label}, but the samples are unconditional (expected -1)")
        dtype = TOKEN_DTYPES[m["token_dtype"]]
        h, w = m["grid"]
        if len(files["tok"]) != h * w * dtype.itemsize:
            raise UserError(f"sample {where}: .tok has {len(files['tok'])} bytes, a {h}x{w} grid of "
                            f"{m['token_dtype']} needs {h * w * dtype.itemsize}")
        tokens = np.frombuffer(files["tok"], dtype=dtype)
        if tokens.min() < 0 or tokens.max() >= m["n_codes"]:
            raise UserError(f"sample {where}: token ids {tokens.min()}..{tokens.max()} outside the codebook "
                            f"(0..{m['n_codes'] - 1})")
        self.token_counts += np.bincount(tokens.astype(np.int64), minlength=m["n_codes"])
        self.labels.append(label)
        for part in (where.encode(), files["png"], files["cls"], files["tok"]):
            self.content.update(len(part).to_bytes(8, "little") + part)
        row = self.grid.setdefault(label, [])
        limit = self.grid_per_class * (1 if m["conditional"] else 4)
        if len(row) < limit:
            row.append(torch.from_numpy(image.transpose(2, 0, 1).copy()))
        return image

    def _image(self, where: str, data: bytes) -> np.ndarray:
        m = self.manifest
        want_mode = "L" if m["channels"] == 1 else "RGB"
        try:
            with warnings.catch_warnings():
                # PIL only warns between 1x and 2x its pixel limit (and raises above): refuse both.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                # Size and mode come from the header: check them before a single pixel is decoded, so a
                # decompression bomb among the samples costs nothing.
                if im.size != (m["resolution"], m["resolution"]):
                    raise UserError(f"sample {where}: image is {im.size[0]}x{im.size[1]}, expected "
                                    f"{m['resolution']}x{m['resolution']} (the manifest's resolution)")
                if im.mode != want_mode:
                    raise UserError(f"sample {where}: PNG mode {im.mode!r}, expected 8-bit {want_mode!r} "
                                    f"({m['channels']} channel(s), uint8)")
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UserError(f"sample {where}: .png refused as a decompression bomb ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UserError(f"sample {where}: .png is not a readable image ({exc})") from None
        arr = np.asarray(im)
        return arr[:, :, None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------- metrics

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "class"


def per_class_fid(ref: Reference, fake: np.ndarray, labels: np.ndarray, class_names: list[str],
                  protocol: Protocol, min_count: int) -> tuple[dict[str, Any], list[str]]:
    """FID of each class's samples against the reference images of that class.

    Classes hold few samples against 2048 dimensions, so the distance goes through the small cross-Gram matrix
    of the two sets (`frechet_distance_features`), not two 2048 x 2048 covariances. Each entry carries its own
    counts in the protocol and `unreliable: true` when either side has fewer than
    `min_count` samples (FID is biased upward at small n, and differently for different n). Classes with
    fewer than 2 samples on a side have no covariance: they are listed as skipped instead.
    """
    out, skipped = {}, []
    for c, name in enumerate(class_names):
        gen, real = fake[labels == c], ref.features[ref.labels == c].astype(np.float64)  # float32 -> exact
        if len(gen) < 2 or len(real) < 2:
            skipped.append(f"{name} ({len(gen)} generated, {len(real)} reference)")
            continue
        p = dataclasses.replace(protocol, n_gen=len(gen), n_ref=len(real))
        entry = with_protocol({"fid": frechet_distance_features(real, gen)}, p)["fid"]
        entry.update({"class": name, "unreliable": bool(min(len(gen), len(real)) < min_count)})
        out[f"{c}_{_slug(name)}"] = entry
    return out, skipped


def sampler_identity(sm: dict[str, Any], stream: SampleStream) -> dict[str, Any]:
    """What made the evaluated images, as the sample stage's manifest records it, plus the sha256 of the
    evaluated samples themselves (which pins them even where the manifest is silent). `model_fingerprint` is
    the stage-2 model's when the manifest carries one, else None."""
    return {"kind": sm.get("kind"), "model_fingerprint": sm.get("model_fingerprint"),
            "codebook_fingerprint": sm["codebook_fingerprint"], "params": sm["sampler"], "seed": sm["seed"],
            "samples_sha256": stream.content.hexdigest()}


def run(cfg: EvaluateParams) -> None:
    check_replaceable(cfg.report_dir, "evaluate")
    t_start = time.monotonic()
    folder = Path(cfg.samples_dir)
    sm = read_samples_manifest(folder)
    if sm["count"] == 0 or not any(folder.glob("samples-*.tar")):
        raise UserError(f"{folder}: empty sample set (manifest count {sm['count']}, "
                        f"{len(list(folder.glob('samples-*.tar')))} shards); nothing to evaluate")
    dataset = read_manifest(Path(cfg.prepared_dir) / cfg.dataset)
    ref = load_reference(cfg.reference)
    check_reference(ref, dataset_fingerprint=dataset["fingerprint"], resize_mode=cfg.resize,
                    resolution=sm["resolution"], channels=sm["channels"])
    if sm["conditional"] and sm["class_names"] != ref.meta["class_names"]:
        raise UserError(f"{folder}: class names {sm['class_names']} differ from the reference's "
                        f"{ref.meta['class_names']}; per-class FID would compare different classes")
    net, device = load_network(cfg.network)
    check_reference(ref, feature_network_hash=net.feature_network_hash)

    limit = min(sm["count"], cfg.n_samples or sm["count"])
    stream = SampleStream(folder, sm, limit, cfg.grid_per_class)
    t0 = time.monotonic()
    fake = features_of(stream.batches(), net, cfg.network, cfg.resize, device, total=limit)
    feature_seconds = time.monotonic() - t0
    if len(fake) != limit:
        raise UserError(f"{folder}: manifest count {sm['count']} but the shards hold {len(fake)} samples")
    labels = np.array(stream.labels)

    protocol = Protocol(n_gen=len(fake), n_ref=len(ref.features), ref_split=ref.meta["split"],
                        resize_mode=cfg.resize, feature_network_hash=net.feature_network_hash, seed=cfg.seed,
                        kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets, pr_k=cfg.pr_k,
                        ref_seed=ref.meta["seed"], dataset_fingerprint=dataset["fingerprint"],
                        sampler=sampler_identity(sm, stream))
    try:
        metrics = compute_metrics(ref.features, fake, protocol, real_stats=(ref.mu, ref.sigma), prefix="g")
    except ValueError as exc:
        raise UserError(f"gFID: {exc}") from None
    used = Protocol(**metrics["gfid"]["protocol"])  # as used: the KID subset size clipped to the sample counts
    metrics.update(with_protocol(code_usage(stream.token_counts), used))
    skipped: list[str] = []
    if sm["conditional"]:
        metrics["per_class_gfid"], skipped = per_class_fid(ref, fake, labels, sm["class_names"], used,
                                                           cfg.per_class_min)
    write_report(cfg, sm, ref, metrics, stream, labels, skipped)
    write_metrics(cfg.metrics, {**headline(metrics, HEADLINE), "protocol": protocol_id(used.as_dict())},
                  {"images": len(fake), "feature_seconds": round(feature_seconds, 2),  # run facts: not in the outs
                   "seconds": round(time.monotonic() - t_start, 2), "device": device.type})
    log.info("gFID %.3f  KID %.5f  precision %.3f  recall %.3f  code usage %.1f%%  (%d samples vs %d reference)",
             metrics["gfid"]["value"], metrics["gkid_mean"]["value"], metrics["gprecision"]["value"],
             metrics["grecall"]["value"], metrics["code_usage_pct"]["value"], len(fake), len(ref.features))


# ----------------------------------------------------------------------------- report

def write_report(cfg: EvaluateParams, sm: dict, ref: Reference, metrics: dict, stream: SampleStream,
                 labels: np.ndarray, skipped: list[str]) -> None:
    out = new_partial_dir(cfg.report_dir)
    names = sm["class_names"]
    if sm["conditional"]:
        rows = [torch.stack(stream.grid[c]) for c in sorted(stream.grid)]
        grid_note = "one row per class: " + ", ".join(names[c] for c in sorted(stream.grid))
    else:
        first = torch.stack(stream.grid[-1])
        rows = list(first.split(cfg.grid_per_class))
        grid_note = f"the first {len(first)} samples"
    save_rows_grid(out / "grid.png", rows)

    counts = np.sort(stream.token_counts)[::-1]
    fig, ax = new_figure(figsize=(6, 3.2))
    # A filled step curve, not bars: codebooks can have 100k+ codes.
    ax.fill_between(np.arange(len(counts)), np.maximum(counts, 0.5), 0.5, step="post", color="tab:blue")
    ax.set_yscale("log"), ax.set_xlabel("code rank"), ax.set_ylabel("uses (log)")
    ax.set_title(f"generated tokens: {metrics['code_usage_pct']['value']:.1f}% of {sm['n_codes']} codes used, "
                 f"perplexity {metrics['code_perplexity']['value']:.1f}", fontsize=9)
    save_figure(fig, out / "code_frequency.png")

    per_class = metrics.get("per_class_gfid", {})
    class_section = ""
    if sm["conditional"]:
        if per_class:
            entries = list(per_class.values())
            fig, ax = new_figure(figsize=(max(5, 0.6 * len(entries) + 2), 3.5))
            bars = ax.bar(range(len(entries)), [e["value"] for e in entries],
                          color=["tab:gray" if e["unreliable"] else "tab:blue" for e in entries])
            for bar, e in zip(bars, entries):
                ax.annotate(f"{e['protocol']['n_gen']}/{e['protocol']['n_ref']}", (bar.get_x() + 0.4,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(entries)), [e["class"] for e in entries], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("FID")
            ax.set_title("per-class FID\n(labels: generated/reference samples; grey: few samples)", fontsize=9)
            save_figure(fig, out / "per_class_fid.png")
        n_gen = np.bincount(labels[labels >= 0], minlength=len(names)) if len(labels) else np.zeros(len(names), int)
        n_ref = np.bincount(ref.labels, minlength=len(names))
        table = [{"class": n, "generated": int(n_gen[c]), "reference": int(n_ref[c]),
                  "FID": next((f"{e['value']:.4g}" + (" (few samples)" if e["unreliable"] else "")
                               for e in per_class.values() if e["class"] == n), "not computed")}
                 for c, n in enumerate(names)]
        class_section = (
            f"## Per class\n\nEach class's samples against the reference images of that class. Per-class counts "
            f"are small, so these FIDs are biased upward and comparable only at equal counts (recorded in each "
            f"entry's protocol); entries with fewer than {cfg.per_class_min} samples on a side are marked "
            f"`unreliable`.\n\n{markdown_table(table)}\n"
            + (f"Not computed (need >= 2 samples on each side): {', '.join(skipped)}.\n\n" if skipped else "")
            + ("![per-class FID](per_class_fid.png)\n\n" if per_class else ""))

    protocol = metrics["gfid"]["protocol"]
    overall = {k: v for k, v in metrics.items() if k != "per_class_gfid"}
    text = (
        f"# evaluate: generated samples\n\n"
        f"Samples `{cfg.samples_dir}` ({protocol['n_gen']} of {sm['count']}; "
        f"{'class-conditional' if sm['conditional'] else 'unconditional'}; codebook "
        f"`{sm['codebook_fingerprint'][:16]}`, {sm['n_codes']} codes, token grid {sm['grid'][0]}x{sm['grid'][1]}; "
        f"sampler `{json.dumps(sm['sampler'], sort_keys=True)}`, seed {sm['seed']}) against the reference "
        f"`{ref.folder}` ({protocol['n_ref']} images of `{ref.meta['dataset']}` split `{protocol['ref_split']}`)."
        f"\n\n## Metrics\n\n{markdown_table(metric_rows(overall))}\n"
        f"FID and KID from fewer than 50k samples are biased (FID upward): compare numbers only when their "
        f"protocols agree.\n\n## Protocol\n\n{protocol_lines(protocol)}\n"
        f"## Samples\n\n{grid_note}:\n\n![samples](grid.png)\n\n"
        f"## Code usage\n\n![code frequency](code_frequency.png)\n\n{class_section}")
    write_text(out / "report.md", text)
    write_json(out / "metrics.json", metrics)
    replace_dir(out, Path(cfg.report_dir), "evaluate")


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
