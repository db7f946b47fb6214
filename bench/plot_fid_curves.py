"""FID over training, one panel per GAN family, one line per variant (tag) of bench/compare_stage2.py.

Reads <dir>/summary-<tag>.json as compare_stage2.py writes them (e.g. --tag tokenmill and --tag paper), so the
figure shows what those runs measured and nothing else:
  python bench/plot_fid_curves.py --tags tokenmill paper --out docs/gan_fid_over_training_recipes.png
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="+", required=True)
    ap.add_argument("--dir", default=str(ROOT / "data" / "compare"), help="where compare_stage2.py wrote")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not Path(args.out).parent.is_dir():
        sys.exit(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
    data = curves(Path(args.dir), args.tags)
    if not data:
        sys.exit(f"{args.dir}: no FID-over-training curves in the summaries of {args.tags}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(data), figsize=(3.6 * len(data), 3.2), sharey=True, squeeze=False)
    for ax, (family, by_tag) in zip(axes[0], sorted(data.items())):
        for tag, points in by_tag.items():
            ax.plot(*zip(*points), "o-", label=tag)
        ax.set_title(family), ax.set_xlabel("step"), ax.legend()
    axes[0][0].set_ylabel("FID over training (EMA G)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
