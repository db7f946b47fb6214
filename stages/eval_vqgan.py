"""Stage `eval_vqgan`: rFID of the VQGAN — how far its reconstructions are from the real images, as the FID
network sees them — plus KID and precision/recall, against the `fid_ref` reference.

The reconstructed images are exactly the reference's images (its first `n_images`, a random subset in the
reference's order; all of them by default), so rFID compares each image set with its own reconstruction and
per-image feature distances are paired: the report shows the reconstructions that moved furthest.

Outputs: the metrics JSON (headline columns fid, kid, precision, recall and the protocol's id) and
`<report_dir>/`: metrics.json (every number with its full protocol: rfid, rkid_mean, rkid_std, rprecision,
rrecall), report.md, grid.png (one original per class above its reconstruction), worst.png (the
reconstructions furthest from their original in feature space), feature_distance.png (their histogram).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.atomic import check_replaceable, new_partial_dir, replace_dir, sha256_file, write_json
from pipeline.config import SEED_MAX, check_dataset_ref, param, section
from pipeline.errors import UserError
from pipeline.stage_cli import run_stage_cli
from pipeline.fid import Protocol, compute_metrics, protocol_id
from pipeline.prepared import PreparedImages, read_manifest
from pipeline.runlog import headline, write_metrics
from pipeline.report import (markdown_table, metric_rows, new_figure, protocol_lines, save_figure, save_rows_grid,
                             write_text)
from pipeline.vqgan_io import load_vqgan, to_model_range, to_uint8
from pipeline.fid_reference import (NetworkParams, Reference, ResizeMode, check_reference, features_of, image_batches,
                                    load_network, load_reference)

log = logging.getLogger("tokenmill.eval_vqgan")
SECTIONS = ("eval_vqgan",)
N_WORST = 8
HEADLINE = {"fid": "rfid", "kid": "rkid_mean", "precision": "rprecision", "recall": "rrecall"}


@dataclass
class EvalVQGANParams:
    dataset: str = param("fashion_mnist", kind="name")
    prepared_dir: str = "data/prepared"
    vqgan_dir: str = "data/vqgan"
    reference: str = "data/fid_ref/fashion_mnist-val-tf_bilinear"  # a fid_ref output folder
    resize: ResizeMode = "tf_bilinear"  # must be the reference's
    n_images: int | None = param(None, min=4)  # first n reference images; null = all of them
    vqgan_batch_size: int = param(256, min=1)
    seed: int = param(0, min=0, max=SEED_MAX)  # KID subsets
    kid_subsets: int = param(100, min=1)
    kid_subset_size: int = param(1000, min=2)
    pr_k: int = param(3, min=1)
    metrics: str = param("data/metrics/eval_vqgan.json", kind="out_path")
    report_dir: str = param("data/reports/eval_vqgan", kind="out_path")
    network: NetworkParams = field(default_factory=NetworkParams)


def check(params: dict, source: str) -> EvalVQGANParams:
    cfg = section(params, "eval_vqgan", EvalVQGANParams, source)
    check_dataset_ref(params, "eval_vqgan.dataset", cfg.dataset, source)
    return cfg


@torch.no_grad()
def reconstruct(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, C, H, W] -> the VQGAN's reconstruction, uint8 on the CPU."""
    recon, _ = model(to_model_range(images).to(device))
    return to_uint8(recon).cpu()


def run(cfg: EvalVQGANParams) -> None:
    check_replaceable(cfg.report_dir, "eval_vqgan")
    t_start = time.monotonic()
    prepared = Path(cfg.prepared_dir) / cfg.dataset
    manifest = read_manifest(prepared)
    # Cheap checks first: the reference must describe this dataset's current content with our resize mode.
    ref = load_reference(cfg.reference)
    check_reference(ref, dataset_fingerprint=manifest["fingerprint"], resize_mode=cfg.resize)
    n_ref = len(ref.keys)
    n = cfg.n_images if cfg.n_images is not None else n_ref
    if n > n_ref:
        raise UserError(f"eval_vqgan.n_images = {n} but the reference {ref.folder} holds {n_ref} images; "
                        f"rFID reconstructs reference images (raise fid_ref.n_ref or lower n_images)")
    net, device = load_network(cfg.network)
    check_reference(ref, feature_network_hash=net.feature_network_hash)
    model, vqgan_meta = load_vqgan(cfg.vqgan_dir, device)
    if model.cfg.in_channels != manifest["channels"] or manifest["resolution"] % model.cfg.downsample:
        raise UserError(f"the VQGAN in {cfg.vqgan_dir} takes {model.cfg.in_channels}-channel images with sizes "
                        f"divisible by {model.cfg.downsample}; {cfg.dataset} is {manifest['channels']}-channel "
                        f"{manifest['resolution']}x{manifest['resolution']}")
    data = PreparedImages(prepared, ref.meta["split"])
    index = {k: i for i, k in enumerate(data.keys())}
    order = [index[k] for k in ref.keys[:n]]  # every key exists: the dataset fingerprint matched

    def reconstructions() -> Iterator[torch.Tensor]:
        for images in image_batches(data, order, cfg.vqgan_batch_size):
            yield reconstruct(model, images, device)

    t0 = time.monotonic()
    fake = features_of(reconstructions(), net, cfg.network, cfg.resize, device, total=n)
    feature_seconds = time.monotonic() - t0
    # The "sampler" of rFID is the VQGAN reconstructing the reference's first n images: its weights' sha256
    # (the codebook fingerprint does not cover the encoder and decoder) and codebook fingerprint.
    sampler = {"kind": "vqgan_reconstruction",
               "model_fingerprint": sha256_file(Path(cfg.vqgan_dir) / "model.safetensors"),
               "codebook_fingerprint": vqgan_meta["fingerprint"], "params": {"images": "reference[:n_gen]"},
               "seed": None}
    protocol = Protocol(n_gen=n, n_ref=n_ref, ref_split=ref.meta["split"], resize_mode=cfg.resize,
                        feature_network_hash=net.feature_network_hash, seed=cfg.seed,
                        kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets, pr_k=cfg.pr_k,
                        ref_seed=ref.meta["seed"], dataset_fingerprint=manifest["fingerprint"], sampler=sampler)
    try:
        metrics = compute_metrics(ref.features, fake, protocol, real_stats=(ref.mu, ref.sigma), prefix="r")
    except ValueError as exc:
        raise UserError(f"rFID: {exc}") from None
    # Paired: reconstruction i against original i, in the same feature space.
    distance = np.linalg.norm(fake - ref.features[:n].astype(np.float64), axis=1)
    seconds = time.monotonic() - t_start
    write_report(cfg, ref, vqgan_meta, metrics, model, data, order, distance, device)
    write_metrics(cfg.metrics, {**headline(metrics, HEADLINE), "protocol": protocol_id(metrics["rfid"]["protocol"])},
                  {"images": n, "feature_seconds": round(feature_seconds, 2), "seconds": round(seconds, 2),
                   "device": device.type})  # run facts: timing in the report would change its hash every run
    log.info("rFID %.3f  KID %.5f  precision %.3f  recall %.3f  (%d reconstructions vs %d reference images, "
             "%.0f s)", metrics["rfid"]["value"], metrics["rkid_mean"]["value"], metrics["rprecision"]["value"],
             metrics["rrecall"]["value"], n, n_ref, seconds)


def write_report(cfg: EvalVQGANParams, ref: Reference, vqgan_meta: dict, metrics: dict, model: torch.nn.Module,
                 data: PreparedImages, order: list[int], distance: np.ndarray,
                 device: torch.device) -> None:
    out = new_partial_dir(cfg.report_dir)
    labels = [data.entries[i].label for i in order]
    class_names = ref.meta["class_names"]
    per_class = sorted({c: pos for pos, c in reversed(list(enumerate(labels)))}.items())[:10]
    pick = [pos for _, pos in per_class]
    if len(pick) >= 4:
        shown = "one per class (" + ", ".join(
            class_names[c] if c < len(class_names) else str(c) for c, _ in per_class) + ")"
    else:  # too few classes for a useful grid
        pick = list(range(min(10, len(order))))
        shown = f"the first {len(pick)} images"
    worst = np.argsort(-distance)[:N_WORST].tolist()
    for name, positions in (("grid.png", pick), ("worst.png", worst)):
        originals = torch.stack([data[order[p]][0] for p in positions])
        save_rows_grid(out / name, [originals, reconstruct(model, originals, device)], scale=3)

    fig, ax = new_figure(figsize=(6, 3.2))
    ax.hist(distance, bins=min(50, max(5, len(distance) // 10)), color="tab:blue")
    ax.axvline(float(np.median(distance)), color="k", linestyle="--", label=f"median {np.median(distance):.2f}")
    ax.set_xlabel("||f(x) - f(recon(x))||  (pool3 features)"), ax.set_ylabel("images"), ax.legend()
    ax.set_title("reconstruction distance in FID feature space")
    save_figure(fig, out / "feature_distance.png")

    protocol = metrics["rfid"]["protocol"]
    text = (
        f"# eval_vqgan: reconstruction FID\n\n"
        f"VQGAN `{cfg.vqgan_dir}` (codebook fingerprint `{vqgan_meta['fingerprint'][:16]}`, trained "
        f"{vqgan_meta.get('steps', '?')} steps on `{vqgan_meta.get('dataset', '?')}`), reconstructing "
        f"{protocol['n_gen']} images of `{cfg.dataset}` split `{protocol['ref_split']}`, compared with the "
        f"reference `{ref.folder}` ({protocol['n_ref']} images).\n\n"
        f"## Metrics\n\n{markdown_table(metric_rows(metrics))}\n"
        f"FID and KID from fewer than 50k samples are biased (FID upward): compare numbers only when their "
        f"protocols agree.\n\n"
        f"## Protocol\n\n{protocol_lines(protocol)}\n"
        f"## Reconstructions\n\nOriginals (top) and reconstructions (bottom), {shown}:\n\n"
        f"![grid](grid.png)\n\n"
        f"The {len(worst)} reconstructions furthest from their original in feature space:\n\n"
        f"![worst](worst.png)\n\n![feature distance](feature_distance.png)\n\n"
        f"Median paired feature distance {np.median(distance):.3f}, 90th percentile "
        f"{np.quantile(distance, 0.9):.3f}.\n")
    write_text(out / "report.md", text)
    write_json(out / "metrics.json", metrics)
    replace_dir(out, Path(cfg.report_dir), "eval_vqgan")


if __name__ == "__main__":
    run_stage_cli(__doc__, run, check=check)
