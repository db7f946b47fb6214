"""Run facts (timing, throughput, device, resume counts) kept apart from the metrics DVC hashes.

A stage's metrics file is a DVC out: it must be a function of the stage's code, params and inputs, so the same
identity gives the same bytes on any machine (with the same `byte_facts`) and DVC's run cache and remotes can
restore it. What the run measured about itself goes to `<metrics stem>.run.json` beside it: not an out,
overwritten by every real run, read by the Prefect artifacts and by people.

The metrics file itself holds only a few flat headline numbers (`headline`), so `dvc metrics show/diff` and
`dvc exp show` fit a terminal; the full record (every value with its protocol, per-class numbers, counts) is a
`metrics.json` in the stage's output folder, an out like the rest of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.atomic import read_json, write_json


def run_log_path(metrics: str | Path) -> Path:
    metrics = Path(metrics)
    return metrics.with_name(f"{metrics.stem}.run.json")


def byte_facts() -> dict[str, Any]:
    """What, besides the stage's identity, decides its output bytes on a CPU: the kernels' instruction set (capped
    to AVX2 by pipeline.env unless TOKENMILL_CPU_ISA=native) and the thread count (parallel reductions split by
    thread). Two runs that agree here and in identity write the same bytes."""
    import torch  # here, not at the top: pipeline.env must set the caps before torch loads

    return {"cpu_isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def write_metrics(path: str | Path, metrics: dict[str, Any], run_facts: dict[str, Any]) -> None:
    """The metrics (hashed by DVC) and this run's facts (not hashed) side by side. The facts come first and the
    metrics file takes their times before it appears: the out guard reads a metrics file as its run's when its
    run log is beside it and no older, which then holds at every instant of a kill (the other order left a first
    run's metrics file without its run log for a moment)."""
    write_json(run_log_path(path), {**run_facts, **byte_facts()})
    write_json(path, metrics, stamp=run_log_path(path))


def read_run_facts(metrics: str | Path) -> dict[str, Any]:
    """The facts of the run that last executed the stage here ({} when DVC restored it from a cache)."""
    path = run_log_path(metrics)
    return read_json(path) if path.is_file() else {}


def headline(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """{column: record value} for the metrics file, `columns` mapping a column name to a dotted key of `record`.
    An entry that carries a protocol ({"value", "protocol"}) gives its value; a missing key gives None. Only
    scalars are allowed: a nested value would spread into many columns of `dvc metrics show`."""
    out = {}
    for column, dotted in columns.items():
        value: Any = record
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, Mapping) and "value" in value:
            value = value["value"]
        if value is not None and not isinstance(value, (int, float, str, bool)):
            raise TypeError(f"metrics column {column!r} ({dotted}) is {type(value).__name__}, not a scalar")
        out[column] = value
    return out
