"""`python -m pipeline compare`: experiments side by side — the params that differ and the headline numbers.

Reads `dvc exp show --json` (the workspace, the baseline commit and every DVC experiment on it, or the revisions
given with --rev) and prints one row per run: its name, when it ran, each params.yaml value that differs between
the rows, and gFID, rFID, PSNR, recall, bits/token. A gFID or rFID measured under another protocol than the first
row's (other sample counts, reference, resize, network: the `protocol` id in the metrics file) is not a comparable
number and is shown as `n/c`, with the ids listed below the table.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError
from pipeline.dvc_graph import changed_stages, upstream_stages

# (column, metrics file of params.yaml's section, key); the protocol of FID columns is checked
COLUMNS = (("gFID", "evaluate", "fid"), ("rFID", "eval_vqgan", "fid"), ("PSNR", "train_vqgan", "psnr"),
           ("recall", "evaluate", "recall"), ("bits/token", "train_transformer", "bits_per_token"))
PROTOCOL_CHECKED = {"gFID", "rFID"}


def _runs(entries: list[dict], name: str | None = None) -> Iterator[dict]:
    """Every run in `dvc exp show --json`: baselines and the experiments nested under them (format of DVC 3)."""
    for entry in entries:
        data = entry.get("data") or {}
        if data.get("params") is not None or data.get("metrics") is not None:
            label = str(entry.get("name") or name or entry.get("rev", "?"))
            if re.fullmatch(r"[0-9a-f]{40}", label):  # a detached HEAD or a bare commit: git's short form
                label = label[:7]
            yield {"name": label[:24], "rev": entry.get("rev", ""),
                   "timestamp": data.get("timestamp"), "params": data.get("params") or {},
                   "metrics": data.get("metrics") or {}}
        for exp in entry.get("experiments") or []:
            yield from _runs(exp.get("revs") or [], exp.get("name"))


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def _metrics_of(run: dict, section: str, params: dict) -> dict:
    """The metrics file of a stage in a run, found through that run's own params (its path may differ)."""
    path = (params.get(section) or {}).get("metrics")
    entry = run["metrics"].get(path) or {}
    return entry.get("data") or {}


def rows_of(shown: list[dict], stale: set[str] = frozenset()) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """(columns, rows, notes) of the comparison table for the parsed output of `dvc exp show --json`. `stale`: the
    stages (base names) whose workspace outputs predate the workspace's params or code (marked `*`)."""
    runs = list(_runs(shown))
    if not runs:
        raise UserError("dvc exp show: no runs to compare (run the pipeline or `dvc exp run` first)")
    params = [(r["params"].get("params.yaml") or {}).get("data") or {} for r in runs]
    flat = [_flat(p) for p in params]
    # a dataset some runs lack is one column (yes / -); its path is left out (it differs per machine)
    sets = [set((p.get("datasets") or {}) if isinstance(p.get("datasets"), dict) else ()) for p in params]
    partial = {name for name in set().union(*sets) if any(name not in s for s in sets)}
    for f, names in zip(flat, sets):
        f.update({f"datasets.{name}": "yes" if name in names else "-" for name in partial})
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
              and not (k.startswith("datasets.") and (k.endswith(".path") or k.split(".")[1] in partial
                                                       and k.count(".") > 1))]
    reference_protocol: dict[str, str | None] = {}
    rows, notes, marked = [], [], []
    for run, p, f in zip(runs, params, flat):
        row = {"run": run["name"], "when": (run["timestamp"] or "now")[:16].replace("T", " ")}
        row.update({k: json.dumps(f.get(k)) if not isinstance(f.get(k), str) else f[k] for k in differ})
        if f.get("train_transformer.kind") != "gan":  # gan.* settings of an ar or maskgit run: read by no code
            row.update({k: "-" for k in differ if k.startswith("train_transformer.gan.")})
        for column, section, key in COLUMNS:
            m = _metrics_of(run, section, p)
            value = m.get(key)
            if column in PROTOCOL_CHECKED and value is not None:
                protocol = m.get("protocol")
                first = reference_protocol.setdefault(column, protocol)
                if protocol != first:
                    notes.append(f"{column} of {run['name']}: protocol {protocol}, not {first} as in the first "
                                 f"row (other sample counts, reference or network): not comparable")
                    value = "n/c"
            row[column] = value if isinstance(value, str) else "-" if value is None else f"{value:.4g}"
            if run["rev"] == "workspace" and section in stale and value is not None:
                row[column] += "*"
                marked.append(column)
        rows.append(row)
    if marked:
        verb, them = ("predates", "it") if len(marked) == 1 else ("predate", "them")
        notes.append(f"* workspace: {', '.join(marked)} {verb} its params or code (out of date, or after a stage "
                     f"that is: {', '.join(sorted(stale))}); run the pipeline to measure {them}")
    return ["run", "when", *differ, *(c for c, _, _ in COLUMNS)], rows, notes


def table(columns: list[str], rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def compare(root: Path, revs: list[str] | None = None) -> str:
    cmd = ["dvc", "exp", "show", "--json"]
    for rev in revs or []:
        if not rev or rev.startswith("-") or not rev.isprintable():  # handed to DVC: never as one of its options
            raise UserError(f"--rev {rev!r}: not a git revision (a commit, branch, tag or experiment name)")
        cmd += ["--rev", rev]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"dvc exp show failed: {last}")
    try:
        shown = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise UserError("dvc exp show --json printed no JSON; is this a DVC project with a git commit?") from None
    try:
        stale, unknown = stale_stages(root), None
    except RuntimeError as exc:  # a run holds DVC's lock: what is current is not known now
        stale, unknown = set(), f"workspace: whether its metrics are current is not known ({exc})"
    columns, rows, notes = rows_of(shown, stale)
    return table(columns, rows) + "".join(f"\nnote: {n}" for n in notes + ([unknown] if unknown else []))


def stale_stages(root: Path) -> set[str]:
    """Base names of the stages `dvc status` calls out of date, and of every stage downstream of one: their
    outputs in the workspace are not what the workspace's params and code make. RuntimeError when dvc status fails
    (a running `dvc repro` holds its lock)."""
    changed = changed_stages(root)
    if not changed:
        return set()
    below = {stage for stage, ups in upstream_stages(root).items() if ups & changed}
    return {name.split("@")[0] for name in changed | below}
