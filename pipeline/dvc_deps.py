"""dvc.yaml's code deps, generated from the import graph (`python -m pipeline deps --check | --write`).

A stage's deps are its data (whatever dvc.yaml lists that is not project code) plus exactly the files its module
imports, transitively (pipeline/codegraph.py). Nothing is listed by hand, so nothing can drift: a test runs the
check, and `--write` rewrites the lists in place, keeping comments and the data deps' order.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_path
from pipeline.codegraph import NOT_CODE, ROOT, closure_files
from pipeline.errors import UserError, first_line

_MODULE = re.compile(r"-m\s+(stages\.[A-Za-z_][A-Za-z0-9_]*)")


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments and key order survive
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def load_dvc_yaml(dvc_yaml: Path, require_stages: bool = True) -> Any:
    """dvc.yaml, round-trip loaded (comments kept); a damaged file is one line naming it. Without
    `require_stages`, a file with no stages (another DVC file of the user's) loads as {"stages": {}}.
    One `check` or `run` reads it about ten times: the parse is cached by the file's text, so the document returned
    is shared and must not be changed (`write` changes a copy)."""
    try:
        text = dvc_yaml.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{dvc_yaml}: not valid YAML ({first_line(exc)})") from None
    doc = _parsed(text, str(dvc_yaml))
    if not require_stages and not (isinstance(doc, dict) and doc.get("stages")):
        return {"stages": {}}
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise UserError(f"{dvc_yaml}: no `stages:` mapping (the project's dvc.yaml lists its stages there)")
    if bad := next((name for name, body in doc["stages"].items() if not isinstance(body, dict)), None):
        raise UserError(f"{dvc_yaml}: stage {bad!r} is not a mapping (cmd, deps, outs, ...)")
    return doc


@functools.lru_cache(maxsize=8)
def _parsed(text: str, name: str) -> Any:
    from ruamel.yaml import YAMLError

    try:
        return _yaml().load(text)
    except YAMLError as exc:
        raise UserError(f"{name}: not valid YAML ({first_line(exc)})") from None


def _dep_path(entry: Any) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def is_code_dep(path: str) -> bool:
    """A path a module can have (`helpers.py`, `models/extra/util.py`: identifiers, .py) outside data/ and runs/. Such a
    dep is code, so generated: `--write` replaces it with the closure. Anything else (a folder, a data or config file,
    `data/raw/${key}`) is data and kept as listed."""
    parts = path.removesuffix(".py").split("/")
    return path.endswith(".py") and all(p.isidentifier() for p in parts) and parts[0] not in NOT_CODE


def stage_module(body: dict) -> str | None:
    """The `stages.<name>` module a dvc.yaml stage runs; None for a stage of the user's own (another command), whose
    deps are the user's to list and are left alone."""
    body = body.get("do", body)  # foreach stages keep their body under `do`
    m = _MODULE.search(str(body.get("cmd", "")))
    return m.group(1) if m else None


def _listed_and_wanted(body: dict, root: Path) -> tuple[list[str], list[str]]:
    deps = body.get("do", body).get("deps", [])
    return sorted(_dep_path(d) for d in deps if is_code_dep(_dep_path(d))), closure_files(stage_module(body), root)


def drift(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stages whose listed code deps differ from their import closure: name -> (listed, wanted)."""
    doc = load_dvc_yaml(dvc_yaml)
    out = {}
    for name, body in doc["stages"].items():
        if stage_module(body) is None:
            continue
        listed, wanted = _listed_and_wanted(body, root)
        if listed != wanted:
            out[name] = (listed, wanted)
    return out


def describe(listed: list[str], wanted: list[str]) -> str:
    """`missing a, b; not imported c` (a dash where a side is empty)."""
    missing, extra = sorted(set(wanted) - set(listed)), sorted(set(listed) - set(wanted))
    return f"missing {', '.join(missing) or '-'}; not imported {', '.join(extra) or '-'}"


def check_running_stage(addressing: str, dvc_root: Path, root: Path = ROOT) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE and DVC_ROOT for the command): stop before any work when the stage's code
    deps in dvc.yaml are not its import closure, since DVC would record the outputs as made by code it does not
    track (an import added without `deps --write`). `addressing` is DVC's: `name`, `name@item` or `path:name`."""
    file_part, _, name = addressing.rpartition(":")
    dvc_yaml = dvc_root / (file_part or "dvc.yaml")
    body = load_dvc_yaml(dvc_yaml, require_stages=False)["stages"].get(name.split("@")[0])
    if body is None or stage_module(body) is None:
        return  # not a tokenmill stage
    listed, wanted = _listed_and_wanted(body, root)
    if listed != wanted:
        raise UserError(f"{dvc_yaml}: stage {name.split('@')[0]}'s code deps are not what {stage_module(body)} "
                        f"imports ({describe(listed, wanted)}); run `python -m pipeline deps --write`, then repro")


def write(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> list[str]:
    """Rewrite every stage's code deps as its import closure; return the names of the stages that changed."""
    doc = copy.deepcopy(load_dvc_yaml(dvc_yaml))  # the cached parse stays what the file says
    changed = []
    for name, body in doc["stages"].items():
        if stage_module(body) is None:
            continue
        listed, wanted = _listed_and_wanted(body, root)
        if listed != wanted:
            changed.append(name)
        deps = body.get("do", body).setdefault("deps", [])  # a new stage: its code deps are all it has so far
        for i in reversed(range(len(deps))):  # delete in place: the data deps keep their comments
            if is_code_dep(_dep_path(deps[i])):
                del deps[i]
        deps.extend(wanted)
    if changed:
        with atomic_path(dvc_yaml) as tmp, open(tmp, "w") as fh:
            _yaml().dump(doc, fh)
    return changed
