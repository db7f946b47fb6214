"""What a perfect stage-2 model could score on the `evaluate` protocol: held-out real images, and their VQGAN
reconstructions, measured exactly as generated samples are.

A stage-2 model that sampled the data distribution of token grids perfectly would produce the VQGAN
reconstructions of fresh images. So its gFID / precision / recall on `evaluate`'s protocol (n_gen images, class
balanced as `sample` draws them, against the val reference) are those of the reconstructions of train images
that the reference does not hold. The real images themselves give the protocol's own floor (the sample count
alone biases FID up and moves recall). Each of --subsets draws a different class-balanced set of train images.
Needs the default pipeline's prepared data, VQGAN and FID reference (`dvc repro fid_ref train_vqgan`).

  python bench/stage2_ceiling.py                 # 3 subsets of 1000 (~6 min on 2 CPU cores)
  python bench/stage2_ceiling.py --n 1000 --subsets 5
  python bench/stage2_ceiling.py --subsets 2 --no-real   # only the reconstructions (the real rows need no VQGAN)
Prints a markdown table (mean and range over subsets) and writes data/compare/stage2_ceiling.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.fid import Protocol, compute_metrics  # noqa: E402
from pipeline.fid_reference import features_of, image_batches, load_network, load_reference  # noqa: E402
from pipeline.prepared import PreparedImages  # noqa: E402
from pipeline.vqgan_io import load_vqgan, to_model_range, to_uint8  # noqa: E402
from stages.evaluate import check as check_evaluate  # noqa: E402

METRICS = ("fid", "precision", "recall")


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> list[int]:
    """n indices with the classes in the shares `sample` uses (cycling 0..K-1), drawn without replacement."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    want = np.bincount(np.arange(n) % len(classes), minlength=len(classes))
    picks = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, want)]
    return sorted(int(i) for i in np.concatenate(picks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="images per subset (default: evaluate's sample count)")
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--no-real", action="store_true",
                    help="skip the real images' rows: they do not depend on the VQGAN (half the time)")
    ap.add_argument("--out", default=str(ROOT / "data" / "compare" / "stage2_ceiling.json"))
    args = ap.parse_args()
    params = load_params(args.params)
    ev = check_evaluate(params, args.params)
    ref = load_reference(ev.reference)
    data = PreparedImages(Path(params["train_transformer"]["prepared_dir"]) / ev.dataset, "train")
    n = args.n or params["sample"]["n"]
    net, device = load_network(ev.network)
    vqgan, _ = load_vqgan(params["train_transformer"]["vqgan_dir"], device)
    labels = np.array([e.label for e in data.entries])

    @torch.no_grad()
    def recon(images: torch.Tensor) -> torch.Tensor:
        return to_uint8(vqgan(to_model_range(images).to(device))[0]).cpu()

    rows: dict[str, list[dict[str, float]]] = {"their VQGAN reconstructions": []}
    if not args.no_real:
        rows = {"real train images": [], **rows}
    for s in range(args.subsets):
        order = balanced_subset(labels, n, seed=s)
        feats = [] if args.no_real else \
            [features_of(image_batches(data, order, 250), net, ev.network, ev.resize, device, total=n)]
        feats.append(features_of((recon(b) for b in image_batches(data, order, 250)), net, ev.network, ev.resize,
                                 device, total=n))
        protocol = Protocol(n_gen=n, n_ref=len(ref.keys), ref_split=ref.meta["split"], resize_mode=ev.resize,
                            feature_network_hash=net.feature_network_hash, seed=ev.seed,
                            kid_subset_size=ev.kid_subset_size, kid_subsets=ev.kid_subsets, pr_k=ev.pr_k)
        for name, f in zip(rows, feats):
            m = compute_metrics(ref.features, f, protocol, real_stats=(ref.mu, ref.sigma))
            rows[name].append({k: m[k]["value"] for k in METRICS})
            print(f"subset {s}: {name}: " + ", ".join(f"{k} {rows[name][-1][k]:.3f}" for k in METRICS), flush=True)
    print(f"\n{n} class-balanced train images per subset vs the {len(ref.keys)}-image {ref.meta['split']} reference, "
          f"{ev.resize}, k={ev.pr_k}; mean (min-max) over {args.subsets} subsets\n")
    print("| images | gFID | precision | recall |\n|---|---|---|---|")
    summary = {}
    for name, vals in rows.items():
        cols = {k: [v[k] for v in vals] for k in METRICS}
        summary[name] = {k: {"mean": float(np.mean(c)), "min": float(min(c)), "max": float(max(c))}
                         for k, c in cols.items()}
        print(f"| {name} | " + " | ".join(f"{np.mean(c):.3f} ({min(c):.3f}-{max(c):.3f})" for c in cols.values())
              + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": n, "subsets": args.subsets, "rows": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
