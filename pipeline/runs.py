"""How a run starts and how it ends when it fails: the part the CLI and the Prefect flow share (orchestration).

1. Validate first. Overrides (`-S key=value`, a preset, the deployment's `overrides`) are applied to an in-memory
   copy of params.yaml and the result is checked by every stage's `check` (unknown keys, types, ranges, output
   paths inside the project, dataset names) before anything is written.
2. One run at a time. A run holds the project lock (`.dvc/tmp/tokenmill-run.lock`) from the params edit to its
   end; params.yaml is written while DVC's own repository lock is held too, so a `dvc repro` running outside
   tokenmill never records an edit it did not run with.
3. Nothing lost. When the run fails for any reason, params.yaml and dvc.lock go back to their bytes from before
   the run and `dvc checkout` restores every output DVC removed, from the cache.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipeline.atomic import write_bytes
from pipeline.config import PROJECT_ROOT, apply_overrides, load_params, parse_override, printable, set_params_file
from pipeline.errors import UserError
from pipeline.locks import exclusive

log = logging.getLogger("tokenmill.runs")
STAGE_MODULES = ("prepare", "train_vqgan", "tokenize", "fid_ref", "eval_vqgan", "train_transformer", "sample",
                 "evaluate")  # stages/<name>.py, in pipeline order
LOCK_NAME = "tokenmill-run.lock"


def pipeline_stages(root: Path) -> list[str]:
    """The stage modules dvc.yaml runs (a project may run a subset of them)."""
    import yaml

    from pipeline.dvc_deps import stage_module
    if not (root / "dvc.yaml").is_file():
        return list(STAGE_MODULES)
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    used = {(stage_module(body) or "").removeprefix("stages.") for body in (spec.get("stages") or {}).values()}
    return [name for name in STAGE_MODULES if name in used]


def dvc(args: list[str], root: Path) -> str:
    """Run a dvc command and return stdout; raise with its stderr on failure."""
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def stage_names(root: Path) -> list[str]:
    """All stages (foreach expanded, e.g. prepare@fashion_mnist), in dvc.yaml order."""
    return [line.split()[0] for line in dvc(["stage", "list", "--name-only"], root).splitlines() if line.strip()]


def select(names: list[str], wanted: list[str] | None) -> list[str]:
    """Keep stages named in `wanted`, by full name or by base name (`prepare` selects every prepare@...)."""
    if not wanted:
        return names
    unknown = [w for w in wanted if not any(n == w or n.split("@")[0] == w for n in names)]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} (dvc.yaml has: {', '.join(names)})")
    return [n for n in names if n in wanted or n.split("@")[0] in wanted]


def check_params_dict(params: dict[str, Any], source: str, root: Path) -> list[str]:
    """Validate the sections of every stage dvc.yaml runs (unknown sections too); return the dataset names.
    Output paths must lie inside `root`. Raises UserError."""
    known: set[str] = set()
    used = pipeline_stages(root)
    token = PROJECT_ROOT.set(Path(root))
    try:
        for name in STAGE_MODULES:
            mod = importlib.import_module(f"stages.{name}")
            known.update(mod.SECTIONS)
            if name in used:
                mod.check(params, source)
    finally:
        PROJECT_ROOT.reset(token)
    unknown = sorted(set(params) - known, key=str)  # YAML keys may be ints or None too
    if unknown:
        raise UserError(f"{source}: unknown section '{printable(str(unknown[0]))}' "
                        f"(allowed: {', '.join(sorted(known))})")
    return list(params.get("datasets") or {})


def check_params(path: Path, root: Path) -> list[str]:
    return check_params_dict(load_params(path), str(path), root)


def preset_overrides(path: str | Path) -> list[str]:
    """A preset file (configs/*.yaml) is a partial params.yaml; flatten it to `key.path=value` overrides."""
    preset = load_params(Path(path))

    def flat(node: dict, prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            key = f"{prefix}{k}"
            out += flat(v, key + ".") if isinstance(v, dict) and v else [f"{key}={json.dumps(v)}"]
        return out

    return flat(preset, "")


def validate_overrides(root: Path, overrides: list[str]) -> None:
    """Check the params that `overrides` would give, without writing anything; UserError names the key."""
    for text in overrides:
        if not isinstance(text, str):
            raise UserError(f"override {text!r} must be a string key.path=value")
        key, _ = parse_override(text)
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override {text!r}: the key must look like section.key (got {key!r})")
    params = apply_overrides(load_params(root / "params.yaml"), overrides)
    where = str(root / "params.yaml")
    if overrides:  # a preset flattens to dozens of overrides: past three, the error's key and value say enough
        shown = ", ".join(overrides) if len(overrides) <= 3 else f"{len(overrides)} overrides"
        where = f"params.yaml with {shown}"
    check_params_dict(params, where, root)


def project_lock(root: Path) -> contextlib.AbstractContextManager:
    """The project's run lock; a second tokenmill run while one holds it stops with one line."""
    return exclusive(root / ".dvc" / "tmp" / LOCK_NAME, f"the project {root}")


def _write_params_under_dvc_lock(root: Path, overrides: list[str]) -> None:
    """Edit params.yaml only while no dvc command runs here (DVC's repository lock held meanwhile)."""
    from dvc.lock import LockError, make_lock

    lock = make_lock(str(root / ".dvc" / "tmp" / "lock"), tmp_dir=str(root / ".dvc" / "tmp"))
    try:
        lock.lock()
    except LockError:
        raise UserError(f"a dvc command is running in {root}; params.yaml was left unchanged (run again when it "
                        f"has finished)") from None
    try:
        set_params_file(root / "params.yaml", overrides)
    finally:
        lock.unlock()


def restore_outputs(root: Path) -> None:
    """Put every output back as dvc.lock records it (DVC removes a stage's outs before running it)."""
    proc = subprocess.run(["dvc", "checkout", "--force"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. outputs this project never made: nothing of them to restore
        log.warning("dvc checkout restored what the cache holds; not every output recorded in dvc.lock is there")


@contextlib.contextmanager
def run_with_overrides(root: Path, overrides: list[str]) -> Iterator[None]:
    """Validate, lock, apply the overrides; on any failure inside, put params.yaml, dvc.lock and the outputs back.

    The body signals failure by raising (a non-zero `dvc repro` is raised as SystemExit by the CLI)."""
    root = Path(root)
    validate_overrides(root, overrides)
    with project_lock(root):
        saved = {name: (root / name).read_bytes() for name in ("params.yaml", "dvc.lock") if (root / name).is_file()}
        if overrides:
            _write_params_under_dvc_lock(root, overrides)
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                raise
            for name, data in saved.items():
                if (root / name).read_bytes() != data:
                    write_bytes(root / name, data)
            restore_outputs(root)
            log.warning("the run failed: params.yaml%s and the outputs are as they were before it",
                        " (overrides undone), dvc.lock" if overrides else ", dvc.lock")
            raise
