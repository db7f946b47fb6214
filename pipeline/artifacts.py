"""Prefect artifacts for finished stages: manifests, metrics tables, images.

Each stage base name maps to a publisher that reads the stage's outputs (paths from params.yaml) and creates
artifacts; stages without a publisher publish nothing. Artifact keys are lowercase-dash as Prefect requires.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.atomic import read_json
from pipeline.config import load_params


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish_prepare(item: str, root: Path) -> None:
    params = load_params(root / "params.yaml")
    manifest = read_json(root / params["prepare"]["out_dir"] / item / "manifest.json")
    names = manifest["class_names"]
    rows = [{"class": names[i], **{s: v["per_class"][i] for s, v in manifest["splits"].items()}}
            for i in range(len(names))]
    rows.append({"class": "total", **{s: v["count"] for s, v in manifest["splits"].items()}})
    create_table_artifact(rows, key=artifact_key("prepare", item, "counts"),
                          description=f"prepare {item}: samples per split and class")
    create_markdown_artifact(
        f"### prepare {item}\n\n"
        f"- source: `{manifest['source']['kind']}` {manifest['source']['path']}\n"
        f"- resolution: {manifest['resolution']}x{manifest['resolution']}, channels {manifest['channels']}, "
        f"resize `{manifest['resize']}`\n"
        f"- splits: " + ", ".join(f"{s} {v['count']} ({len(v['shards'])} shards)"
                                  for s, v in manifest["splits"].items()) + "\n"
        f"- skipped inputs: {manifest['skipped']} (see report.json)\n"
        f"- fingerprint: `{manifest['fingerprint']}`\n",
        key=artifact_key("prepare", item, "manifest"), description=f"prepare {item}: manifest")


PUBLISHERS: dict[str, Callable[[str, Path], None]] = {
    "prepare": publish_prepare,
}


def publish_stage(name: str, root: Path) -> None:
    base, _, item = name.partition("@")
    if base in PUBLISHERS:
        PUBLISHERS[base](item, root)


def publish_summary(results: list[dict[str, Any]]) -> None:
    if results:
        create_table_artifact(results, key="pipeline-stages", description="stages of this run: status and seconds")
