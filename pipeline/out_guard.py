"""Refuse, before a run, an output path that DVC would delete although no stage of this project made it.

DVC removes a stage's outs before it runs the stage's command, so a stage's own guard (`check_replaceable`: its
marker inside the folder) comes too late under `dvc repro`: `-S train_vqgan.out_dir=notes` would cost the user's
folder `notes/`. Every tokenmill entry point therefore resolves dvc.yaml's outs under the params the run will use
and refuses an existing path unless removing it loses nothing, i.e. it is
- recorded as that stage's out in dvc.lock (DVC made it and its cache holds it), or
- a folder carrying that stage's marker (`.tokenmill-stage`), or an empty folder, or
- a file whose bytes DVC's cache holds, or a metrics file with its `<stem>.run.json` beside it (what
  `pipeline.runlog.write_metrics` writes, when a run stopped before DVC recorded it);
and a path git tracks is refused in any case (DVC cannot take it over; it would be deleted, then the run fail).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.atomic import OWNER_FILE
from pipeline.dvc_deps import load_dvc_yaml, stage_module
from pipeline.errors import UserError

_REF = re.compile(r"\$\{\s*([^}]*?)\s*\}")


def _lookup(expr: str, params: dict[str, Any], key: str | None, item: Any) -> Any:
    parts = expr.split(".")
    if parts[0] == "key" and key is not None and len(parts) == 1:
        return key
    node = item if parts[0] == "item" and key is not None else params
    for part in parts[1:] if node is item else parts:
        if not isinstance(node, dict) or part not in node:
            raise KeyError(expr)
        node = node[part]
    return node


def _resolve(template: str, params: dict[str, Any], key: str | None = None, item: Any = None) -> str:
    return _REF.sub(lambda m: _dvc_str(_lookup(m.group(1), params, key, item)), template)


def _paths(body: dict[str, Any], kinds: tuple[str, ...], over: str | None) -> Iterator[tuple[str, list[str]]]:
    """(template, the params keys it names) of each entry of `kinds` (outs, metrics, plots, deps) of a stage body;
    `over`: the params key a foreach stage iterates (`${item.path}` of `${datasets}` is datasets.<name>.path), None
    for a literal foreach, whose items are no params."""
    for kind in kinds:
        for entry in body.get(kind) or []:
            template = next(iter(entry)) if isinstance(entry, dict) else str(entry)
            keys = [(f"{over}.<name>{k[4:]}" if over else None) if k.split(".")[0] == "item" else k
                    for k in _REF.findall(template) if k != "key"]
            yield template, [k for k in keys if k]


OUTS = ("outs", "metrics", "plots")


def planned_outputs(root: Path, params: dict[str, Any],
                    kinds: tuple[str, ...] = OUTS) -> list[tuple[str, str, str, list[str]]]:
    """(stage as DVC names it, owner marker, path as written, params keys) of the outs (or other `kinds`) of every
    tokenmill stage in dvc.yaml, with `params` substituted; a stage of the user's own is skipped, a path naming a
    value params lack is one line."""
    stages = load_dvc_yaml(root / "dvc.yaml")["stages"] if (root / "dvc.yaml").is_file() else {}
    out = []
    for name, body in stages.items():
        if stage_module(body) is None:
            continue
        if "foreach" in body:
            items = _resolve_foreach(body["foreach"], params)
            do, over = body.get("do") or {}, _foreach_key(body["foreach"])
        else:
            items, do, over = {None: None}, body, None
        for key, item in items.items():
            for template, keys in _paths(do, kinds, over):
                try:
                    path = _resolve(template, params, key, item)
                except KeyError as exc:  # DVC would stop in a block of text, after the overrides were written
                    raise UserError(f"dvc.yaml: stage {name} uses ${{{exc.args[0]}}}, which params.yaml does not set "
                                    f"(DVC reads it from params.yaml; tokenmill's defaults do not reach it)") from None
                out.append((name if key is None else f"{name}@{key}", name, path, keys))
    return out


def planned_stage_names(root: Path, params: dict[str, Any]) -> list[str]:
    """Every dvc.yaml stage as DVC will name it once `params` are written (foreach copies `name@key`), stages of the
    user's own included: overrides or a preset that add a dataset (configs/openclipart.yaml) add its stages."""
    stages = load_dvc_yaml(root / "dvc.yaml")["stages"] if (root / "dvc.yaml").is_file() else {}
    return [name if key is None else f"{name}@{key}" for name, body in stages.items()
            for key in (_resolve_foreach(body["foreach"], params) if "foreach" in body else [None])]


def planned_parents(root: Path, params: dict[str, Any]) -> dict[str, set[str]]:
    """For each tokenmill stage under `params`, the stages whose outputs it reads (a dep at, inside or around their
    outs, as DVC links them): `dvc dag` knows only the stages params.yaml has now, not those overrides add."""
    outs = [(stage, os.path.normpath(path)) for stage, _, path, _ in planned_outputs(root, params)]
    parents: dict[str, set[str]] = {}
    for stage, _, dep, _ in planned_outputs(root, params, ("deps",)):
        dep = os.path.normpath(dep)
        parents.setdefault(stage, set()).update(
            s for s, out in outs if s != stage and (_inside(dep, out) or _inside(out, dep)))
    return parents


def _resolve_foreach(expr: Any, params: dict[str, Any]) -> dict[str, Any]:
    """{key: item} as DVC names a foreach stage's copies: `${params.key}` or a literal dict or list; a list of
    plain values keys each by its value, a list holding dicts or lists by its index. Unresolvable: no copies."""
    over = _foreach_key(expr)
    try:
        value = _lookup(over, params, None, None) if over else expr
    except KeyError:
        return {}
    if isinstance(value, dict):
        return {_dvc_str(k): v for k, v in value.items()}
    if isinstance(value, list):
        if any(isinstance(v, (dict, list)) for v in value):
            return {str(i): v for i, v in enumerate(value)}
        return {_dvc_str(v): v for v in value}
    return {}


def _foreach_key(expr: Any) -> str | None:
    m = _REF.fullmatch(expr.strip()) if isinstance(expr, str) else None
    return m.group(1) if m else None


def _dvc_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


LOCK_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # (PyYAML built without libyaml: the same, slower)


def locked_outs(root: Path) -> set[tuple[str, str]]:
    """(stage, out path) of every output dvc.lock records."""
    lock = root / "dvc.lock"
    try:
        # DVC writes it, a few thousand lines: libyaml's parser reads it ten times faster than PyYAML's own
        doc = yaml.load(lock.read_text(), Loader=LOCK_LOADER) if lock.is_file() else None  # noqa: S506 (safe)
    except (yaml.YAMLError, UnicodeDecodeError):
        doc = None  # DVC reports a damaged dvc.lock itself; without it nothing counts as recorded
    stages = doc.get("stages") if isinstance(doc, dict) else None
    return {(name, str(o.get("path"))) for name, body in (stages or {}).items() if isinstance(body, dict)
            for o in body.get("outs") or [] if isinstance(o, dict)}


def _cache_dir(root: Path) -> Path:
    from dvc.repo import Repo  # here: importing DVC costs a second, and only this check needs it

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def _in_cache(path: Path, cache: Path) -> bool:
    h = hashlib.md5()  # DVC 3's file hash
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    return (cache / digest[:2] / digest[2:]).is_file()


def _git_tracked(root: Path, paths: list[str]) -> set[str]:
    if not paths or not (root / ".git").exists():
        return set()
    proc = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=root, capture_output=True)
    tracked = [p for p in proc.stdout.decode(errors="replace").split("\0") if p]
    return {p for p in paths if any(t == p or t.startswith(p.rstrip("/") + "/") for t in tracked)}


def _why_not_ours(path: Path, owner: str, cache: Path | None, run_logs: list[Path] = ()) -> str | None:
    """None when removing `path` loses nothing; else why it may not be removed. `run_logs`: the `.run.json` of the
    stage's metrics, whose times every file its run writes after it takes; a file out no newer than one was written
    by that run (its plots file after `python -m stages.<name>` by hand, before DVC ever recorded the stage)."""
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        marker = path / OWNER_FILE
        if marker.is_file():
            mark = marker.read_text(errors="replace").strip()
            return None if mark == owner else f"a folder written by {mark!r}"
        return None if not any(path.iterdir()) else f"a folder without a {OWNER_FILE} marker"
    if path.with_name(f"{path.stem}.run.json").is_file() or (cache is not None and _in_cache(path, cache)):
        return None
    if _not_newer_than_a_run_log(path, run_logs):
        return None
    return "a file DVC's cache does not hold"


def _not_newer_than_a_run_log(path: Path, run_logs: list[Path]) -> bool:
    """The file is no newer than one of these `.run.json` files, whose times a stage's run gives the files it writes
    after them (`atomic_path(stamp=...)`)."""
    return any(log.is_file() and path.stat().st_mtime_ns <= log.stat().st_mtime_ns for log in run_logs)


def _named(path: str, keys: list[str]) -> str:
    return f"{path} ({', '.join(keys)})" if keys else path


def _inside(a: str, b: str) -> bool:
    """a is b or lies inside it (lexically: what DVC compares)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


WorkDir = tuple[str, str, str]  # (stage, path, params key): a folder a stage writes that is no DVC output


def check_overlaps(root: Path, params: dict[str, Any], source: str, work: list[WorkDir] = ()) -> None:
    """One line for what DVC refuses in a block of text: two outputs that are one path or nested (across all
    stages), or a stage that would read a path holding its own output; and for what DVC never sees: a work folder
    (checkpoints) that is, holds or lies inside any stage's output or input, or is another stage's work folder."""
    def full(path: str) -> str:
        return os.path.normpath(os.path.join(root, path))

    outs = planned_outputs(root, params)
    paths = outs + planned_outputs(root, params, ("deps",))
    for i, (stage, path, key) in enumerate(work):
        for other, _, other_path, other_keys in paths:
            if _inside(full(path), full(other_path)) or _inside(full(other_path), full(path)):
                raise UserError(f"{source}: {key} = {path}, where stage {stage} keeps its checkpoints, and "
                                f"{_named(other_path, other_keys)} of stage {other} are the same path or one inside "
                                f"the other (DVC would delete or rewrite one with the other); give the checkpoints "
                                f"a folder of their own")
        for other, other_path, other_key in work[i + 1:]:
            if full(path) == full(other_path):  # nested is harmless: each prunes only its own folder's step files
                raise UserError(f"{source}: {key} and {other_key} are both {path}; each stage prunes the checkpoints "
                                f"in its folder, so give each its own")
    for i, (stage, _, path, keys) in enumerate(outs):
        for other, _, other_path, other_keys in outs[i + 1:]:
            if _inside(full(path), full(other_path)) or _inside(full(other_path), full(path)):
                raise UserError(f"{source}: {_named(path, keys)} of stage {stage} and {_named(other_path, other_keys)}"
                                f" of stage {other} are the same path or one inside the other; give each its own")
    for stage, _, dep, keys in planned_outputs(root, params, ("deps",)):
        for out_stage, _, path, out_keys in outs:
            if out_stage == stage and (_inside(full(path), full(dep)) or _inside(full(dep), full(path))):
                raise UserError(f"{source}: stage {stage} would read {_named(dep, keys)}, which holds its own output "
                                f"{_named(path, out_keys)}; point one of them elsewhere")


def check_stale_inputs(root: Path, params: dict[str, Any], source: str) -> None:
    """A stage input set by params that lies in what dvc.lock records as a stage's output but no stage makes under
    these params (`-S sample.out_dir=other` with `evaluate.samples_dir` still at the old samples): the stage would
    read leftovers, and DVC would never re-run it for new ones. Dataset sources and paths dvc.lock does not record
    (a copy of the user's, a VQGAN of their own) are not checked."""
    root = Path(root).resolve()
    made = [os.path.normpath(root / p) for _, _, p, _ in planned_outputs(root, params)]
    recorded = sorted(locked_outs(root))
    for stage, _, dep, keys in planned_outputs(root, params, ("deps",)):
        if not keys or any(k.startswith("datasets.") for k in keys):
            continue
        path = os.path.normpath(root / dep)
        if any(_inside(path, m) for m in made):
            continue
        for writer, out in recorded:
            if _inside(path, os.path.normpath(root / out)):
                base = writer.split("@")[0]
                now = [p for s, o, p, _ in planned_outputs(root, params, ("outs",)) if o == base]
                raise UserError(f"{source}: stage {stage} would read {_named(dep, keys)}, which dvc.lock records as "
                                f"an output of {writer} but no stage makes under these params ({base} now writes "
                                f"{', '.join(now) or 'nothing'}); point it at the output it should read")


def check_outputs(root: Path, params: dict[str, Any], source: str, work: list[WorkDir] = ()) -> None:
    """UserError naming the first existing output path that a run with `params` would delete but no stage made,
    outputs that overlap (check_overlaps), or an input that only leftovers of an earlier run hold
    (check_stale_inputs)."""
    root = Path(root)
    check_overlaps(root, params, source, work)
    check_stale_inputs(root, params, source)
    planned = [(s, o, p, k) for s, o, p, k in planned_outputs(root, params)
               if (root / p).exists() or (root / p).is_symlink()]
    if not planned:
        return
    locked, tracked, cache = locked_outs(root), _git_tracked(root, [p for _, _, p, _ in planned]), None
    metrics = planned_outputs(root, params, ("metrics",))  # by dvc.yaml's section: a key may be `metrics_dir`
    for stage, owner, path, keys in planned:
        if path in tracked:
            why = "tracked by git"
        elif (stage, path) in locked:
            continue
        else:
            if cache is None and (root / path).is_file() and not (root / path).is_symlink():
                cache = _cache_dir(root)
            run_logs = [(root / p).with_name(f"{Path(p).stem}.run.json") for s, _, p, _ in metrics
                        if s == stage and p != path]
            why = _why_not_ours(root / path, owner, cache, run_logs)
            if why is None:
                continue
        raise UserError(f"{source}: {_named(path, keys)} exists and is {why}, not an output of stage {stage}; DVC "
                        f"deletes a stage's outputs before running it, so nothing was run: move it away or choose "
                        f"another path")


def changed_after_written(path: Path) -> bool:
    """A file in the output newer than what its stage wrote last: the `.tokenmill-stage` marker of a folder (the
    last file a stage writes before the swap), the `<stem>.run.json` of a metrics file. No marker: unknown."""
    if path.is_dir():
        marker = path / OWNER_FILE
        if not marker.is_file():
            return True
        written = marker.stat().st_mtime_ns
        # files only: a folder's own time changes when an entry goes, which loses nothing of the user's
        return any(f.lstat().st_mtime_ns > written for f in path.rglob("*")
                   if f.name != OWNER_FILE and (f.is_symlink() or not f.is_dir()))
    run_log = path.with_name(f"{path.stem}.run.json")
    return run_log.is_file() and path.stat().st_mtime_ns > run_log.stat().st_mtime_ns


def _written_by_stage(path: Path, stage: str, outs: list[Path]) -> bool:
    """`path` is as `stage` wrote it: a folder with the stage's marker and no file newer than it, or a file no
    newer than the `.run.json` of one of the stage's metrics (`outs`), whose times its later files take."""
    if path.is_dir():
        marker = path / OWNER_FILE
        return (marker.is_file() and marker.read_text(errors="replace").strip() == stage.split("@")[0]
                and not changed_after_written(path))
    return _not_newer_than_a_run_log(path, [out.with_name(f"{out.stem}.run.json") for out in outs if not out.is_dir()])


def _uncached_file(path: Path, cache: Path) -> Path | None:
    """The first file of an output (a file or a folder) whose bytes DVC's cache does not hold, else None; files
    newer than the folder's marker (most likely added by the user) first, so the message names one of them."""
    files = [path] if not path.is_dir() else sorted(f for f in path.rglob("*") if f.is_file() or f.is_symlink())
    marker = path / OWNER_FILE
    if path.is_dir() and marker.is_file():
        written = marker.stat().st_mtime_ns
        files.sort(key=lambda f: f.lstat().st_mtime_ns <= written)  # stable: sorted by name within each group
    for f in files:
        if f.is_symlink() or not _in_cache(f, cache):
            return f
    return None


def check_unrecorded_changes(root: Path, targets: list[str] | None = None, with_deps: bool = True,
                             source: str = "dvc.lock") -> None:
    """Refuse a run that would make DVC delete files of the user's inside an output it recorded: an output that
    `dvc status` calls modified and that holds a file whose bytes DVC's cache does not hold (a stage whose
    outputs changed is run again, or restored from the run cache, and both replace the whole folder). Outputs of
    another recorded version (after `git checkout` of an older dvc.lock, a discarded experiment) are all in the
    cache and pass; so do outputs dvc.lock does not record."""
    cmd = ["dvc", "status", "--json", *(["--with-deps"] if targets and with_deps else []), *(targets or [])]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    try:
        status = json.loads(proc.stdout) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        status = None
    if not isinstance(status, dict):  # unknown is not "unchanged": the run would let DVC delete what it finds
        said = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        error = next((line for line in said if line.startswith("ERROR")), said[-1] if said else "no output")
        if "Unable to acquire lock" in error:  # DVC's repository lock: another dvc command holds it
            raise UserError(f"a dvc command is running in {root}; nothing was run (run again when it has finished)")
        raise UserError(f"{source}: `{' '.join(cmd)}` failed ({error}), so whether a recorded output holds files of "
                        f"yours is unknown; nothing was run")
    cache, locked = None, locked_outs(root)
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            outs = change.get("changed outs") if isinstance(change, dict) else None
            for path, what in (outs or {}).items():
                # an output dvc.lock does not record (its stage run by hand) is no version DVC could restore:
                # check_outputs decides whether it is the stage's own
                if what != "modified" or (stage, path) not in locked or not (root / path).exists():
                    continue
                if _written_by_stage(root / path, stage, [root / p for s, p in locked if s == stage]):
                    continue  # `python -m stages.<name>` by hand: the stage's own output, nothing added since
                cache = cache or _cache_dir(root)
                if (lost := _uncached_file(root / path, cache)) is not None:
                    shown = lost.relative_to(root) if lost.is_relative_to(root) else lost
                    raise UserError(f"{source}: {path}, an output of stage {stage}, holds {shown}, which DVC's cache "
                                    f"does not hold; DVC replaces the whole output when {stage} runs: move it out, "
                                    f"keep the output as it is with `dvc commit {stage}`, or drop the changes with "
                                    f"`dvc checkout --force {stage}`")
