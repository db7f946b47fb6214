"""Run facts (timing, throughput, device, resume counts) kept apart from the metrics DVC hashes.

A stage's metrics file is a DVC out: it must be a function of the stage's code, params and inputs, so the same
identity gives the same bytes on any machine and DVC's run cache and remotes can restore it. What the run measured
about itself goes to `<metrics stem>.run.json` beside it: not an out, overwritten by every real run, read by the
Prefect artifacts and by people.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import read_json, write_json


def run_log_path(metrics: str | Path) -> Path:
    metrics = Path(metrics)
    return metrics.with_name(f"{metrics.stem}.run.json")


def write_metrics(path: str | Path, metrics: dict[str, Any], run_facts: dict[str, Any]) -> None:
    """The metrics (hashed by DVC) and this run's facts (not hashed) side by side."""
    write_json(path, metrics)
    write_json(run_log_path(path), run_facts)


def read_run_facts(metrics: str | Path) -> dict[str, Any]:
    """The facts of the run that last executed the stage here ({} when DVC restored it from a cache)."""
    path = run_log_path(metrics)
    return read_json(path) if path.is_file() else {}
