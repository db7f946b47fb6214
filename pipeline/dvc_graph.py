"""The stages of this project as DVC sees them: its stage list, its graph, what is out of date, and which stages a
run selects. Plumbing: it asks `dvc` and reads dvc.yaml, and imports no stage."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.out_guard import planned_parents, planned_stage_names

_EDGE = re.compile(r'^"([^"]+)"\s*->\s*"([^"]+)"')  # an edge of `dvc dag --dot`
STAGE_MODULES = ("prepare", "train_vqgan", "tokenize", "fid_ref", "eval_vqgan", "train_transformer", "sample",
                 "evaluate")  # stages/<name>.py, in pipeline order


def pipeline_stages(root: Path) -> list[str]:
    """The stage modules dvc.yaml runs (a project may run a subset of them)."""
    from pipeline.dvc_deps import load_dvc_yaml, stage_module
    if not (root / "dvc.yaml").is_file():
        return list(STAGE_MODULES)
    used = {(stage_module(body) or "").removeprefix("stages.")
            for body in load_dvc_yaml(root / "dvc.yaml")["stages"].values()}
    return [name for name in STAGE_MODULES if name in used]


def dvc(args: list[str], root: Path) -> str:
    """Run a dvc command and return stdout; raise with its stderr on failure."""
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    lock = Path(root) / "dvc.lock"
    if proc.returncode != 0 and lock.is_file() and lock.stat().st_size == 0:
        # DVC rewrites dvc.lock in place: a dvc killed between truncating and writing it leaves it empty, and every
        # dvc command then fails on its schema. Nothing in it is lost; the user decides how to restore it.
        raise UserError(f"{lock} is empty: a dvc command was killed while rewriting it (DVC writes it in place); "
                        f"restore it (git checkout dvc.lock) or delete it: the stages it recorded are then restored "
                        f"from DVC's run cache, not retrained")
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def stage_names(root: Path) -> list[str]:
    """All stages (foreach expanded, e.g. prepare@fashion_mnist), in dvc.yaml order."""
    return [line.split()[0] for line in dvc(["stage", "list", "--name-only"], root).splitlines() if line.strip()]


def upstream_stages(root: Path) -> dict[str, set[str]]:
    """For each stage, every stage it depends on, directly or not (DVC's own graph: `dvc dag --dot`, whose edges
    run from a stage to the stages that read its outputs)."""
    proc = subprocess.run(["dvc", "dag", "--dot"], cwd=root, capture_output=True, text=True)
    parents: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        m = _EDGE.match(line.strip())
        if m:
            parents.setdefault(m.group(2), set()).add(m.group(1))

    def ancestors(name: str, seen: set[str]) -> set[str]:
        for p in parents.get(name, ()):
            if p not in seen:
                seen.add(p)
                ancestors(p, seen)
        return seen

    return {name: ancestors(name, set()) for name in parents}


def missing_dependency(path: str, root: Path) -> str:
    """Why a stage never ran, from the dependency DVC could not find: an earlier stage's output is made by running
    that stage; any other path is one params.yaml names (e.g. a dataset's folder)."""
    full = (Path(root) / path).resolve()
    if full.is_relative_to(Path(root).resolve()):
        return f"its dependency {full.relative_to(Path(root).resolve())} does not exist (run the stage that makes it " \
               f"first)"
    return f"its dependency {path} does not exist (a path params.yaml names: check it)"


def changed_stages(root: Path) -> set[str]:
    """The stages `dvc status` calls out of date (full names, e.g. tokenize@a). RuntimeError naming DVC's last
    line when it fails (a running `dvc repro` holds its lock)."""
    proc = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            raise ValueError
        status = json.loads(proc.stdout or "{}")
        if not isinstance(status, dict):
            raise ValueError
    except ValueError:  # (json's decode error too)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"dvc status: {last[:160]}") from None
    return set(status)


def stale_upstream_note(root: Path, selected: list[str]) -> str | None:
    """A note when stages the selected ones depend on are out of date but not selected: each selected stage runs
    alone (`--single-item`) on their outputs as they are, e.g. evaluate scoring the samples of the old
    `sample.n`. None when all are current, or `dvc status` cannot tell (the run reports DVC's trouble itself)."""
    try:
        changed = changed_stages(root)
    except RuntimeError:
        return None
    if not changed - set(selected):
        return None
    ups = upstream_stages(root)
    behind = sorted({u for name in selected for u in ups.get(name, ()) if u in changed and u not in selected})
    if not behind:
        return None
    return (f"{', '.join(behind)} {'is' if len(behind) == 1 else 'are'} out of date and not selected: "
            f"{', '.join(selected)} will read {'its' if len(behind) == 1 else 'their'} outputs as they are (select "
            f"{'it' if len(behind) == 1 else 'them'} too, or run the whole pipeline)")


def selectable_stages(root: Path, params: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """The stages a run with `params` may select: DVC's list now (`names`, if known) and those `params` add (a dataset
    that the run's overrides or preset add has its prepare@ and tokenize@ only once params.yaml is written)."""
    names = stage_names(root) if names is None else names
    return names + [n for n in planned_stage_names(root, params) if n not in names]


def names_stage(wanted: str, name: str) -> bool:
    """`wanted` names stage `name` by its full name or its base name (`prepare` names every prepare@...)."""
    return wanted in (name, name.split("@")[0])


def select(names: list[str], wanted: list[str] | None) -> list[str]:
    """Keep stages named in `wanted` (`names_stage`)."""
    if not wanted:
        return names
    unknown = [w for w in wanted if not any(names_stage(w, n) for n in names)]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} (dvc.yaml has: {', '.join(names)})")
    return [n for n in names if any(names_stage(w, n) for w in wanted)]


def stages_in_run(root: Path, params: dict[str, Any], targets: list[str] | None = None,
                  with_deps: bool = True) -> set[str]:
    """The stages a run with `params` may execute: every one, or those `targets` select and (`with_deps`) every stage
    they read from, directly or not; from dvc.yaml under `params`, so the stages of a dataset the run adds count."""
    names = planned_stage_names(root, params)
    chosen = set(select(names, targets)) if targets else set(names)
    if targets and with_deps:
        parents, todo = planned_parents(root, params), list(chosen)
        while todo:
            for parent in parents.get(todo.pop(), ()):
                if parent not in chosen:
                    chosen.add(parent)
                    todo.append(parent)
    return chosen
