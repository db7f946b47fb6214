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

import base64
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Collection, Iterator

from pipeline.atomic import OWNER_FILE, write_bytes
from pipeline.config import PROJECT_ROOT, apply_overrides, load_params, parse_override, printable, set_params_file
from pipeline.dvc_repair import repair_rwlock
from pipeline.errors import UserError
from pipeline.locks import exclusive
from pipeline.out_guard import (WorkDir, check_outputs, check_unrecorded_changes, locked_outs, planned_outputs,
                                planned_parents, planned_stage_names)

_EDGE = re.compile(r'^"([^"]+)"\s*->\s*"([^"]+)"')  # an edge of `dvc dag --dot`
log = logging.getLogger("tokenmill.runs")
STAGE_MODULES = ("prepare", "train_vqgan", "tokenize", "fid_ref", "eval_vqgan", "train_transformer", "sample",
                 "evaluate")  # stages/<name>.py, in pipeline order
LOCK_NAME = "tokenmill-run.lock"


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
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=os.environ.copy())
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
    proc = subprocess.run(["dvc", "dag", "--dot"], cwd=root, capture_output=True, text=True, env=os.environ.copy())
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
    proc = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True,
                          env=os.environ.copy())
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


def check_selection(root: Path, params: dict[str, Any], overrides: list[str], targets: list[str] | None,
                    with_deps: bool = True, names: list[str] | None = None) -> None:
    """Before a run starts: a misspelt stage in `targets` is one line (`names`: DVC's stage list, if known), and so is
    a run whose tokenize@<name> would refuse its dataset."""
    if targets:
        select(selectable_stages(root, params, names), targets)
    check_tokenizable(root, params, where_overrides(root, overrides), stages_in_run(root, params, targets, with_deps))


def check_tokenizable(root: Path, params: dict[str, Any], source: str, run: Collection[str]) -> None:
    """Refuse a run whose tokenize@<name> would refuse its dataset (another resolution than the VQGAN's, channels it
    cannot take, tokenize's own rule): before anything runs, not after the stages before it ran and were undone."""
    from pipeline.config import from_dict
    from stages import prepare, tokenize

    datasets = params.get("datasets") or {}
    names = [name for stage in sorted(run) for base, _, name in [stage.partition("@")]
             if base == "tokenize" and name in datasets]
    vqgan_dir = tokenize.check(params, source).vqgan_dir if names else ""
    vqgan = _planned_vqgan(root, params, source, vqgan_dir, "train_vqgan" in run) if names else None
    if vqgan is None:
        return  # unknown until it exists: the stage checks it
    res, f, in_ch, said_by = vqgan
    for name in names:
        spec = from_dict(prepare.DatasetSpec, datasets[name], f"datasets.{name}", source)
        if why := tokenize.compat_problem(spec.resolution, spec.channels, res, f, in_ch, spec.convert_channels):
            raise UserError(f"{source}: tokenize@{name} would refuse datasets.{name} ({spec.resolution} px, "
                            f"{spec.channels} channel(s)): {why} (the VQGAN in {vqgan_dir}: {said_by}); or run "
                            f"prepare@{name} alone (pipeline run --stage prepare@{name})")


def _planned_vqgan(root: Path, params: dict[str, Any], source: str, vqgan_dir: str,
                   trains: bool) -> tuple[int | None, int, int, str] | None:
    """(training resolution, downsampling, input channels, what says so) of the VQGAN in `vqgan_dir` that tokenize
    will read: the one train_vqgan makes under `params` when the run may train it (`vqgan_dir` is its out_dir), else
    the one in the folder; None when neither is known."""
    from models.vqgan import VQGANConfig
    from pipeline.config import from_dict
    from stages import prepare, train_vqgan

    cfg = train_vqgan.check(params, source) if trains else None  # (a project may run no train_vqgan)
    if cfg is not None and os.path.normpath(vqgan_dir) == os.path.normpath(cfg.out_dir):
        spec = from_dict(prepare.DatasetSpec, params["datasets"][cfg.dataset], f"datasets.{cfg.dataset}", source)
        return spec.resolution, cfg.model.downsample, spec.channels, f"train_vqgan trains it on datasets.{cfg.dataset}"
    config = Path(root) / vqgan_dir / "config.json"
    if not config.is_file():  # absent, or a FIFO or device that reading would block on
        return None
    try:
        meta = json.loads(config.read_text())
        model = VQGANConfig(ch_mult=tuple(meta["model"]["ch_mult"]), in_channels=int(meta["model"]["in_channels"]))
        res = meta.get("resolution")
        return (None if res is None else int(res)), model.downsample, model.in_channels, f"its {config.name}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or not a tokenmill VQGAN: the stage says which


def check_params_dict(params: dict[str, Any], source: str, root: Path, outputs: bool = True) -> list[str]:
    """Validate the sections of every stage dvc.yaml runs (unknown sections too); return the dataset names.
    Output paths must lie inside `root`, and with `outputs` an existing one must be the stage's own and none may
    overlap another (pipeline/out_guard.py).
    Raises UserError."""
    known: set[str] = set()
    used = pipeline_stages(root)
    work: list[WorkDir] = []
    token = PROJECT_ROOT.set(Path(root))
    try:
        for name in STAGE_MODULES:
            mod = importlib.import_module(f"stages.{name}")
            known.update(mod.SECTIONS)
            if name in used:
                work += _work_dirs(name, mod.check(params, source))
    finally:
        PROJECT_ROOT.reset(token)
    unknown = sorted(set(params) - known, key=str)  # YAML keys may be ints or None too
    if unknown:
        raise UserError(f"{source}: unknown section '{printable(str(unknown[0]))}' "
                        f"(allowed: {', '.join(sorted(known))})")
    check_dataset_paths(params, source, root, exist=())  # `~`; existence where the run names a path (below)
    if outputs:  # an existing path DVC would delete before the stage could refuse it; overlapping outputs
        named = {k for _, _, _, keys in planned_outputs(root, params) for k in keys}  # dvc.yaml's outs
        check_outputs(root, params, source, [w for w in work if w[2] not in named])
    return list(params.get("datasets") or {})


def _work_dirs(stage: str, cfg: Any) -> list[WorkDir]:
    """(stage, path, key) of each path a stage's params say it writes (kind out_path); those dvc.yaml does not name
    as outputs are its work folders (checkpoints), which DVC never sees, so nothing else keeps them apart."""
    if not dataclasses.is_dataclass(cfg):
        return []
    return [(stage, getattr(cfg, f.name), f"{stage}.{f.name}") for f in dataclasses.fields(cfg)
            if f.metadata.get("kind") == "out_path"]


def check_dataset_paths(params: dict[str, Any], source: str, base: Path,
                        exist: Collection[str] | None = None) -> None:
    """Dataset source paths: none may start with `~` (DVC does not expand it, so it hashes a folder named `~`),
    and those of the datasets in `exist` (None: all) must exist, relative paths taken from `base`. DVC hashes the
    path before prepare could say so, and its own message names neither the key nor what to do. Only the paths a
    run sets are checked by it: a dataset folder that is absent (its outputs pulled) blocks no other stage."""
    for name, entry in (params.get("datasets") or {}).items():
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path:
            continue  # prepare's own check names a missing path key
        key = f"datasets.{printable(str(name))}.path = {printable(path)}"
        if path.startswith("~"):
            raise UserError(f"{source}: {key}: DVC does not expand '~'; write the full path "
                            f"({printable(str(Path(path).expanduser()))})")
        if Path(base).resolve().is_relative_to((Path(base) / path).resolve()):  # DVC would hash the project itself
            raise UserError(f"{source}: {key} is this project's folder or holds it; point it at the dataset's own "
                            f"folder")
        if (exist is None or name in exist) and not (Path(base) / path).exists():
            raise UserError(f"{source}: {key} does not exist (install the dataset there, or point the path at it)")


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


def where_overrides(root: Path, overrides: list[str]) -> str:
    """How an error names the params a run checks: params.yaml, and the overrides applied to it."""
    if not overrides:
        return str(root / "params.yaml")
    # a preset flattens to dozens of overrides: past three, the error's key and value say enough
    shown = ", ".join(overrides) if len(overrides) <= 3 else f"{len(overrides)} overrides"
    return f"params.yaml with {shown}"


def validate_overrides(root: Path, overrides: list[str]) -> dict[str, Any]:
    """Check the params that `overrides` would give, without writing anything; UserError names the key."""
    for text in overrides:
        if not isinstance(text, str):
            raise UserError(f"override {text!r} must be a string key.path=value")
        key, _ = parse_override(text)
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override {text!r}: the key must look like section.key (got {key!r})")
    params = apply_overrides(load_params(root / "params.yaml"), overrides)
    where = where_overrides(root, overrides)
    check_params_dict(params, where, root)
    # the dataset paths this run sets must exist (a whole `datasets` mapping: every one of them)
    keys = [parse_override(text)[0].split(".") for text in overrides]
    named = {k[1] for k in keys if k[0] == "datasets" and len(k) > 1}
    check_dataset_paths(params, where, root, exist=None if ["datasets"] in keys else named)
    return params


def project_lock(root: Path) -> contextlib.AbstractContextManager:
    """The project's run lock; a second tokenmill run while one holds it stops with one line."""
    return exclusive(root / ".dvc" / "tmp" / LOCK_NAME, f"the project {root}")


def running_stage_commands(root: Path) -> list[str]:
    """The commands of live processes in DVC's table of running stages (`.dvc/tmp/rwlock`). DVC releases its
    repository lock while a stage's command runs, so that lock alone does not say that `dvc repro` is running."""
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError):
        return ["(DVC is writing its table of running stages)"]  # mid-write: a dvc command is active
    infos = [*(table.get("write") or {}).values(), *(i for lst in (table.get("read") or {}).values() for i in lst)]
    return sorted({str(i.get("cmd")) for i in infos if isinstance(i, dict) and _alive(i.get("pid"))})


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_params_under_dvc_lock(root: Path, overrides: list[str]) -> None:
    """Edit params.yaml only while no dvc command runs here (DVC's repository lock held meanwhile)."""
    from dvc.lock import LockError, make_lock

    lock = make_lock(str(root / ".dvc" / "tmp" / "lock"), tmp_dir=str(root / ".dvc" / "tmp"))
    busy = f"a dvc command is running in {root}; params.yaml was left unchanged (run again when it has finished)"
    try:
        lock.lock()
    except LockError:
        raise UserError(busy) from None
    try:
        if running_stage_commands(root):  # DVC lets go of its lock while a stage's command runs
            raise UserError(busy.replace("a dvc command is", "a dvc stage is", 1))
        set_params_file(root / "params.yaml", overrides)
    finally:
        lock.unlock()


def _signature(path: Path) -> tuple | None:
    """Changes when a run removes, rewrites or replaces the file or folder (a stage builds a new folder)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    marker = path / OWNER_FILE
    inner = marker.stat().st_mtime_ns if path.is_dir() and marker.is_file() else None
    return st.st_ino, st.st_size if not path.is_dir() else 0, st.st_mtime_ns if not path.is_dir() else 0, inner


def recorded_outputs(root: Path) -> dict[str, tuple | None]:
    """{stage: signatures of its outputs} of every stage dvc.lock records."""
    out: dict[str, list] = {}
    for stage, path in sorted(locked_outs(root)):
        out.setdefault(stage, []).append(_signature(root / path))
    return {stage: tuple(sigs) for stage, sigs in out.items()}


def restore_outputs(root: Path, before: dict[str, tuple | None]) -> None:
    """Put back, as dvc.lock records them, the outputs of the stages whose outputs the run removed or replaced (DVC
    removes a stage's outs before running it); outputs the run did not touch, and files of the user's inside
    them, are left alone."""
    stages = sorted(stage for stage, sigs in recorded_outputs(root).items() if before.get(stage) != sigs)
    if not stages:
        return
    # in a session of its own: a second Ctrl-C at the terminal must not stop the restore half-way
    proc = subprocess.run(["dvc", "checkout", "--force", *stages], cwd=root, capture_output=True, text=True,
                          start_new_session=True)
    if proc.returncode != 0:  # e.g. outputs this project never made: nothing of them to restore
        log.warning("dvc checkout restored what the cache holds; not every output recorded in dvc.lock is there")


def remove_new_outputs(root: Path, new: set[str]) -> list[str]:
    """After a failed run: remove the outputs in `new` (paths that did not exist before the run) that the run made
    and the restored dvc.lock does not record (a folder only with a stage's marker inside)."""
    recorded = {path for _, path in locked_outs(root)}
    removed = []
    for path in sorted(new - recorded):
        full = root / path
        if full.is_dir() and not full.is_symlink() and (full / OWNER_FILE).is_file():
            shutil.rmtree(full)
        elif full.is_file() and not full.is_symlink():
            full.unlink()
        else:
            continue
        removed.append(path)
    return removed


STOPPED_BY: list[int] = []  # the signal that stopped this process's run, if one did (read by the CLI)


def _prefect_server(process: Any) -> bool:
    """The temporary Prefect server a flow run without a UI starts as its child: it must outlive the stop, or the
    flow spends minutes retrying to report the run's end."""
    import psutil

    try:  # Prefect's own temporary server, or the CLI's (pipeline/prefect_server.temporary_server)
        return any("prefect.server.api.server:create_app" in arg or "import serve_temporary" in arg
                   for arg in process.cmdline())
    except psutil.Error:
        return False


def _stop_on_terminate() -> contextlib.AbstractContextManager:
    """SIGTERM / SIGHUP (a `kill`, a closed terminal, a cancelled job) end the run like Ctrl-C: the children (dvc, a
    stage) are stopped and the run is undone, instead of the process dying with params.yaml edited."""
    import signal
    import threading

    @contextlib.contextmanager
    def installed() -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            import psutil

            # what Ctrl-C sends first (a stage saves its checkpoint on it); then SIGTERM and SIGKILL, since a shell
            # script's background job starts with SIGINT ignored
            alive = [p for p in psutil.Process().children(recursive=True) if not _prefect_server(p)]
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                for child in alive:
                    with contextlib.suppress(psutil.Error):
                        child.send_signal(sig)
                alive = psutil.wait_procs(alive, timeout=grace)[1]
                if not alive:
                    break
            STOPPED_BY.append(signum)
            raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return installed()


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (one line says so); the journal covers a SIGKILL."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    told: list[int] = []

    def wait(signum: int, frame: Any) -> None:
        if not told:
            log.warning("still undoing the run (params.yaml, dvc.lock, outputs); it stops when that is done")
        told.append(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, wait) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _refuse_while_a_stage_runs(root: Path) -> None:
    repair_rwlock(root)  # a killed dvc's cut table of running stages would read as "busy" for ever
    if running := running_stage_commands(root):
        raise UserError(f"a dvc stage is running in {root} ({running[0].strip('()')}); run again when it has "
                        f"finished")


def _undo(root: Path, saved: dict[str, bytes], before: dict[str, tuple | None], new: set[str]) -> list[str]:
    """Put params.yaml and dvc.lock back to `saved`, restore the outputs that changed since `before` and remove
    those made at the `new` paths; returns what was removed."""
    for name, data in saved.items():
        if (root / name).read_bytes() != data:
            write_bytes(root / name, data)
    if "dvc.lock" not in saved and (root / "dvc.lock").is_file():
        (root / "dvc.lock").unlink()  # the run's first: its outputs are new (removed below, in the run cache)
    restore_outputs(root, before)
    return remove_new_outputs(root, new)


def _journal(root: Path) -> Path:
    return root / ".dvc" / "tmp" / "tokenmill-run.json"


def undo_killed_run(root: Path) -> bool:
    """Undo a run with overrides that was killed before it could undo itself (its journal is left): params.yaml
    and dvc.lock back as they were before it, the outputs it replaced restored, those it made at new paths
    removed, as after a failed run. Call with the project lock held: the killed run held it, so it is over."""
    path = _journal(root)
    if not path.is_file():
        return False
    _refuse_while_a_stage_runs(root)  # the killed run's dvc may outlive it: let it finish first
    try:
        journal = json.loads(path.read_text())
        saved = {name: base64.b64decode(data) for name, data in journal["saved"].items()}
        before = {stage: tuple(tuple(s) if s else None for s in sigs) for stage, sigs in journal["before"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: the journal of a killed run is damaged ({exc}); check params.yaml and dvc.lock "
                        f"against git, then delete it") from None
    what = f"a run started {journal.get('started', '?')} with {' '.join(journal.get('overrides') or [])}"
    params = (root / "params.yaml").read_bytes() if (root / "params.yaml").is_file() else b""
    written = journal.get("written") == hashlib.sha256(params).hexdigest()  # (no "written": killed before the edit)
    if written and _up_to_date(root):  # finished since (a plain `dvc repro`), or killed after its last stage
        path.unlink()
        log.warning("%s was killed, but its result is complete (dvc status: up to date); it is kept", what)
        return True
    if not written and params != saved.get("params.yaml"):
        saved.pop("params.yaml", None)  # edited since the kill: the user's now, left as it is
        log.warning("params.yaml changed after the killed run wrote its overrides; it is left as it is")
    _undo(root, saved, before, set(journal.get("new") or []))
    path.unlink()
    log.warning("%s was killed before it could undo itself: %s and the outputs are put back as they were before it",
                what, "params.yaml, dvc.lock" if "params.yaml" in saved else "dvc.lock")
    return True


def _up_to_date(root: Path) -> bool:
    """`dvc status` finds nothing to run and no output missing or modified."""
    return subprocess.run(["dvc", "status", "--quiet"], cwd=root, capture_output=True).returncode == 0


@contextlib.contextmanager
def run_with_overrides(root: Path, overrides: list[str], targets: list[str] | None = None,
                       with_deps: bool = True) -> Iterator[None]:
    """Validate, lock, apply the overrides; on any failure inside, put params.yaml, dvc.lock and the outputs back
    and remove the outputs the run made at new paths. `targets` (default: every stage; `with_deps`: and what they
    need) are the stages the run may execute, whose recorded outputs must hold no files of the user's.

    The body signals failure by raising (a non-zero `dvc repro` is raised as SystemExit by the CLI)."""
    root = Path(root)
    params = validate_overrides(root, overrides)
    with project_lock(root), _stop_on_terminate():
        if undo_killed_run(root):  # params.yaml was the killed run's: validate against the user's own again
            params = validate_overrides(root, overrides)
        _refuse_while_a_stage_runs(root)
        now = stage_names(root) if targets else []
        check_selection(root, params, overrides, targets, with_deps, now)
        # a stage the overrides add is not DVC's yet, so `dvc status` cannot name it or what it needs: check them all
        added = [t for t in targets or [] if not any(names_stage(t, n) for n in now)]
        check_unrecorded_changes(root, None if added else targets, with_deps)
        saved = {name: (root / name).read_bytes() for name in ("params.yaml", "dvc.lock") if (root / name).is_file()}
        before = recorded_outputs(root)
        new = {path for _, _, path, _ in planned_outputs(root, params) if not (root / path).exists()}
        if overrides:  # until the run ends, a journal says how to undo it if it is killed (SIGKILL, a power cut)
            journal = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": overrides,
                       "saved": {name: base64.b64encode(data).decode() for name, data in saved.items()},
                       "before": before, "new": sorted(new)}
            _journal(root).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(_journal(root), json.dumps(journal).encode())
        started = False
        try:  # from the edit on, a signal at any point is undone below
            if overrides:
                _write_params_under_dvc_lock(root, overrides)
                journal["written"] = hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()
                write_bytes(_journal(root), json.dumps(journal).encode())
            started = True
            yield
            _journal(root).unlink(missing_ok=True)
        except BaseException as exc:
            unedited = not started and (root / "params.yaml").read_bytes() == saved.get("params.yaml")
            if isinstance(exc, SystemExit) and exc.code in (0, None) or unedited:  # refused before any edit
                _journal(root).unlink(missing_ok=True)
                raise
            how = "was stopped" if isinstance(exc, KeyboardInterrupt) else "failed"  # Ctrl-C, SIGTERM, a cancel
            with _signals_wait():  # a second Ctrl-C would leave the run half undone
                if removed := _undo(root, saved, before, new):
                    log.warning("removed what the run made at new paths: %s", ", ".join(removed))
                _journal(root).unlink(missing_ok=True)
            log.warning("the run %s: params.yaml%s and the outputs are as they were before it", how,
                        " (overrides undone), dvc.lock" if overrides else ", dvc.lock")
            raise
