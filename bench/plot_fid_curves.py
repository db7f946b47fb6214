"""FID over training, one panel per GAN family, one line per variant (tag) of bench/compare_stage2.py.

Reads <dir>/summary-<tag>.json as compare_stage2.py writes them (e.g. --tag tokenmill and --tag paper), so the
figure shows what those runs measured and nothing else:
  python bench/plot_fid_curves.py --tags tokenmill paper --out docs/gan_fid_over_training_recipes.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def curves(summary_dir: Path, tags: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{family: {tag: [(step, fid), ...]}} from each tag's summary (the AR row has no curve and is skipped)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for tag in tags:
        path = summary_dir / f"summary-{tag}.json"
        if not path.is_file():
            sys.exit(f"{path}: missing; run bench/compare_stage2.py --tag {tag} first")
        for row in json.loads(path.read_text()):
            if row["fid_over_training"]:
                family = row["model"].split(" (")[0]
                out.setdefault(family, {})[tag] = [(int(s), float(v)) for s, v in row["fid_over_training"]]
    return out


def variant_and_seed(tag: str) -> tuple[str, int]:
    """'vq2e-3-b128-seed2' -> ('vq2e-3-b128', 2); a tag without '-seedN' is seed 0 (compare_stage2's default)."""
    m = re.fullmatch(r"(.*)-seed(\d+)", tag)
    return (m.group(1), int(m.group(2))) if m else (tag, 0)


def label(tag: str) -> str:
    variant, seed = variant_and_seed(tag)
    return f"{variant} (seed {seed})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="+", required=True)
    ap.add_argument("--dir", default=str(ROOT / "data" / "compare"), help="where compare_stage2.py wrote")
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", nargs="+", help="panels to draw (default: every family with a curve)")
    args = ap.parse_args()
    if not Path(args.out).parent.is_dir():
        sys.exit(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
    data = curves(Path(args.dir), args.tags)
    if args.families:
        if unknown := sorted(set(args.families) - set(data)):
            sys.exit(f"--families {' '.join(unknown)}: no curve in the summaries of {args.tags} (have: {sorted(data)})")
        data = {family: data[family] for family in args.families}
    if not data:
        sys.exit(f"{args.dir}: no FID-over-training curves in the summaries of {args.tags}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # one colour per variant, one line style per seed, so the seeds of a variant read as one bundle
    variants = list(dict.fromkeys(variant_and_seed(t)[0] for t in args.tags))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["o-", "s--", "^:", "d-."]
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data) + 2.4, 3.6), squeeze=False)
    for ax, (family, by_tag) in zip(axes[0], data.items() if args.families else sorted(data.items())):
        for tag, points in by_tag.items():
            variant, seed = variant_and_seed(tag)
            ax.plot(*zip(*points), styles[seed % len(styles)], color=colours[variants.index(variant) % len(colours)],
                    label=label(tag), alpha=0.85)
        ax.set_title(family), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FID over training (EMA G)")
    by_label = {}  # one legend for every panel: a tag may have curves in some families only
    for ax in axes[0]:
        by_label.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels = [label(t) for t in args.tags if label(t) in by_label]
    axes[0][-1].legend([by_label[lab] for lab in labels], labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(args.out)


if __name__ == "__main__":
    main()
