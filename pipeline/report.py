"""Helpers shared by the evaluation stages' reports: metric tables, image grids, plots, code usage.

Reports are plain markdown next to PNG files (`report.md` links `grid.png`), readable offline and in any
markdown viewer; `embed_images` inlines the PNGs as data URIs for a Prefect markdown artifact, which cannot
reference files.
"""
from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from pipeline.atomic import atomic_path, write_bytes

PROTOCOL_COLUMNS = ("n_gen", "n_ref", "ref_split", "resize_mode", "feature_network_hash", "seed")


# ----------------------------------------------------------------------------- numbers

def code_usage(counts: np.ndarray) -> dict[str, float]:
    """Codebook usage from a histogram of token ids (length = codebook size).

    Same definitions as the quantizer's `usage_stats`: share of codes used at least once, and perplexity =
    exp(entropy) of the code distribution (K when uniform over K codes, 1 when everything is one code).
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {"code_usage_pct": 0.0, "code_perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"code_usage_pct": 100.0 * float((counts > 0).sum()) / len(counts),
            "code_perplexity": float(math.exp(-(p * np.log(p)).sum()))}


def iter_metrics(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted name, entry) for every {"value", "protocol"} entry, descending into groups (e.g. per class)."""
    for name, entry in metrics.items():
        if not isinstance(entry, Mapping):
            continue
        if "value" in entry and "protocol" in entry:
            yield prefix + name, entry
        else:
            yield from iter_metrics(entry, f"{prefix}{name}.")


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per metric (value + the protocol fields that vary), for tables."""
    rows = []
    for name, entry in iter_metrics(metrics):
        p = entry["protocol"]
        row = {"metric": name, "value": _fmt(entry["value"])}
        row.update({k: (str(p[k])[:12] if k == "feature_network_hash" else p[k]) for k in PROTOCOL_COLUMNS})
        if entry.get("unreliable"):
            row["note"] = "few samples"
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- files

def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def embed_images(markdown: str, folder: str | Path) -> str:
    """Replace `![alt](file.png)` links to PNG files in `folder` by base64 data URIs. Only a plain file name of
    `folder` is read (no sub-path, no `..`, no hidden file) and only a file that is a PNG: a report's own names
    never need more, and a markdown file edited by hand cannot pull another file into the UI. Anything else stays a
    link."""
    folder = Path(folder)

    def inline(m: re.Match) -> str:
        path = folder / m.group(2)
        if m.group(2).startswith(".") or not path.is_file():
            return m.group(0)
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(data).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s:/\\]+\.png)\)", inline, markdown)


def save_rows_grid(path: str | Path, rows: Sequence[torch.Tensor], scale: int = 2, pad: int = 2,
                   background: int = 128) -> None:
    """uint8 image rows (each [n_i, C, H, W], same C/H/W) -> one PNG; short rows are padded with background.

    The grey padding between cells keeps black-background images (Fashion-MNIST) visually separate.
    """
    from PIL import Image

    rows = [r for r in rows if len(r)]
    if not rows:
        raise ValueError("no images for the grid")
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    canvas = np.full((pad + len(rows) * (h + pad), pad + cols * (w + pad), c), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img.permute(1, 2, 0).numpy()
    im = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas, "L" if c == 1 else "RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def new_figure(*args: Any, **kwargs: Any):
    """matplotlib with the file-only Agg backend (no display on servers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str | Path, dpi: int = 90) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def protocol_lines(protocol: Mapping[str, Any]) -> str:
    """The protocol as a markdown bullet list."""
    return "".join(f"- {k}: `{v}`\n" for k, v in protocol.items())
