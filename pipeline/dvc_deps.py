"""dvc.yaml's code deps, generated from the import graph (`python -m pipeline deps --check | --write`).

A stage's deps are its data (whatever dvc.yaml lists that is not project code) plus exactly the files its module
imports, transitively (pipeline/codegraph.py). Nothing is listed by hand, so nothing can drift: a test runs the
check, and `--write` rewrites the lists in place, keeping comments and the data deps' order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_path
from pipeline.codegraph import PACKAGES, ROOT, closure_files
from pipeline.errors import UserError

_MODULE = re.compile(r"-m\s+(stages\.[A-Za-z_][A-Za-z0-9_]*)")


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments and key order survive
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _dep_path(entry: Any) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def is_code_dep(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and parts[0] in PACKAGES and parts[1].endswith(".py")


def stage_module(body: dict) -> str:
    body = body.get("do", body)  # foreach stages keep their body under `do`
    m = _MODULE.search(str(body.get("cmd", "")))
    if not m:
        raise UserError(f"dvc.yaml: stage command {body.get('cmd')!r} does not run `python -m stages.<name>`")
    return m.group(1)


def drift(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stages whose listed code deps differ from their import closure: name -> (listed, wanted)."""
    doc = _yaml().load(dvc_yaml.read_text())
    out = {}
    for name, body in doc["stages"].items():
        deps = body.get("do", body).get("deps", [])
        listed = sorted(_dep_path(d) for d in deps if is_code_dep(_dep_path(d)))
        wanted = closure_files(stage_module(body), root)
        if listed != wanted:
            out[name] = (listed, wanted)
    return out


def write(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> list[str]:
    """Rewrite every stage's code deps as its import closure; return the names of the stages that changed."""
    y = _yaml()
    doc = y.load(dvc_yaml.read_text())
    changed = []
    for name, body in doc["stages"].items():
        stage = body.get("do", body)
        deps = stage.get("deps", [])
        data = [d for d in deps if not is_code_dep(_dep_path(d))]
        wanted = closure_files(stage_module(body), root)
        if sorted(_dep_path(d) for d in deps if is_code_dep(_dep_path(d))) != wanted:
            changed.append(name)
        deps.clear()
        deps.extend(data + wanted)
    if changed:
        with atomic_path(dvc_yaml) as tmp, open(tmp, "w") as fh:
            y.dump(doc, fh)
    return changed
