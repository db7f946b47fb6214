"""How a run starts and how it ends when it fails: the part the CLI and the Prefect flow share (orchestration).

1. Validate first (pipeline/run_checks.py): the params a run would give, checked by every stage's `check`,
   before anything is written.
2. One run at a time. A run holds the project lock (`.dvc/tmp/tokenmill-run.lock`) from the params edit to its
   end; params.yaml is written while DVC's own repository lock is held too, so a `dvc repro` running outside
   tokenmill never records an edit it did not run with.
3. Nothing lost. When the run fails for any reason, params.yaml and dvc.lock go back to their bytes from before
   the run and `dvc checkout` restores every output DVC removed, from the cache.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.atomic import OWNER_FILE, write_bytes
from pipeline.config import set_params_file
from pipeline.dvc_graph import names_stage, stage_names
from pipeline.dvc_repair import repair_rwlock
from pipeline.errors import UserError
from pipeline.locks import exclusive
from pipeline.out_guard import check_unrecorded_changes, locked_outs, planned_outputs
from pipeline.run_checks import check_selection, validate_overrides

log = logging.getLogger("tokenmill.runs")
LOCK_NAME = "tokenmill-run.lock"


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
