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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.inception import NETWORK_NAME
from pipeline.atomic import check_replaceable, new_partial_dir, replace_dir, write_json
from pipeline.config import SEED_MAX, check_dataset_ref, param, section
from pipeline.errors import UserError
from pipeline.fid import stats
from pipeline.fid_reference import (FORMAT, NetworkParams, ResizeMode, features_of, image_batches, load_network,
                                    reference_name)
from pipeline.prepared import PreparedImages
from pipeline.stage_cli import run_stage_cli

log = logging.getLogger("tokenmill.fid_ref")
SECTIONS = ("fid_ref",)


@dataclass
class FidRefParams:
    dataset: str = param("fashion_mnist", kind="name")
    prepared_dir: str = "data/prepared"  # input: <prepared_dir>/<dataset>
    out_dir: str = param("data/fid_ref", kind="out_path")  # output: <out_dir>/<dataset>-<split>-<resize>/
    split: str = param("val", kind="name")
    n_ref: int | None = param(2000, min=2)  # cap on the images used; null = the whole split
    resize: ResizeMode = "tf_bilinear"  # tf_bilinear (torch-fidelity / TF FID) | clean_bicubic (clean-fid)
    seed: int = param(0, min=0, max=SEED_MAX)  # which subset when n_ref < the split size
    network: NetworkParams = field(default_factory=NetworkParams)

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / reference_name(self.dataset, self.split, self.resize)


def check(params: dict, source: str) -> FidRefParams:
    cfg = section(params, "fid_ref", FidRefParams, source)
    check_dataset_ref(params, "fid_ref.dataset", cfg.dataset, source)
    return cfg


# ----------------------------------------------------------------------------- the stage

def run(cfg: FidRefParams) -> None:
    check_replaceable(cfg.folder, "fid_ref")
    data = PreparedImages(Path(cfg.prepared_dir) / cfg.dataset, cfg.split)
    manifest = data.manifest
    if len(data) < 2:
        raise UserError(f"{data.root}: split {cfg.split!r} has {len(data)} image(s); FID statistics need >= 2")
    # A seeded permutation: the first n_ref of it are a random subset, in random order.
    order = np.random.default_rng(cfg.seed).permutation(len(data))[:cfg.n_ref]
    net, device = load_network(cfg.network)
    log.info("fid_ref %s/%s: %d of %d images, resize %s, network %s", cfg.dataset, cfg.split, len(order),
             len(data), cfg.resize, net.feature_network_hash[:12])
    if cfg.n_ref is not None and cfg.n_ref > len(data):  # the protocol records n_ref = what was used
        log.warning("fid_ref.n_ref = %d but %s/%s holds %d images: the statistics use all %d", cfg.n_ref,
                    cfg.dataset, cfg.split, len(data), len(data))
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
    tmp = new_partial_dir(final)
    for name, arr in (("mu", mu), ("sigma", sigma), ("features", feats.astype(np.float32)), ("labels", labels)):
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
    (tmp / "keys.txt").write_text("".join(k + "\n" for k in keys))
    write_json(tmp / "meta.json", meta)
    replace_dir(tmp, final, "fid_ref")
    log.info("wrote %s: %d images in %.1f s (%.1f images/s, %s)", final, len(order), seconds,
             len(order) / max(seconds, 1e-9), device)


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
