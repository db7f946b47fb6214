"""The Prefect flow: the DVC stages in dvc.yaml order, one task each.

There is no second implementation of any stage: each task runs `dvc repro --single-item <stage>`, so DVC
decides what is stale and the flow skips exactly what `dvc repro` would skip. Prefect adds the UI, per-stage
logs and durations, retries for transient failures, artifacts (manifests, metrics, images) and a deployment
that starts runs with parameters from the UI.

Failures, as `dvc repro --keep-going` treats them: a failed stage skips only the stages that depend on it, every
other stage still runs, and the run ends Failed with a summary. A user error (a stage exits 2 with its one
`error:` line) is a Failed state whose message is that line: no retry and no traceback in the logs. Any other
failure is raised as usual (its traceback and the stage output stay in the log) and retried.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from pipeline import artifacts
from pipeline.dvc_graph import missing_dependency, select, stage_names, stale_upstream_note, upstream_stages
from pipeline.dvc_repair import repair_rwlock
from pipeline.errors import UserError
from pipeline.presets import resolve_overrides, unread_note
from pipeline.runs import run_with_overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]
USER_ERROR_EXIT = 2  # stages exit 2 on a user mistake: retrying cannot help
_STAGE_EXIT = re.compile(r"exited with (\d+)")
_PROGRESS = re.compile(r"\d+(\.\d+)?(it|img|step|tok|s)/s")
_DVC_ERROR = re.compile(r"^ERROR: failed to reproduce '[^']+': (.*)$")
_MISSING = re.compile(r"No such file or directory: '([^']+)'|'([^']+)' does not exist")


class StageFailed(RuntimeError):
    """A stage's `dvc repro` failed. `user_error`: the stage said why in one `error:` line (exit 2)."""

    def __init__(self, stage: str, returncode: int, tail: str, error_line: str | None = None):
        self.stage, self.returncode, self.tail, self.error_line = stage, returncode, tail, error_line
        super().__init__(self.summary)

    def __reduce__(self):  # picklable with all its fields (Prefect may persist a failed state's data)
        return StageFailed, (self.stage, self.returncode, self.tail, self.error_line)

    @property
    def user_error(self) -> bool:
        return self.returncode == USER_ERROR_EXIT and self.error_line is not None

    @property
    def summary(self) -> str:
        """One line: `error: <stage>: <message>` for a user error, else the exit code and the output's tail."""
        if self.user_error:
            return f"error: {self.stage}: {self.error_line[len('error: '):]}"
        return f"stage {self.stage} failed with exit code {self.returncode}: {self.tail}"


class PipelineFailed(RuntimeError):
    """Some stages failed (others may have run). `results` has a row per selected stage."""

    def __init__(self, results: list[dict[str, Any]]):
        self.results = results
        failed = [r for r in results if r["status"] == "failed"]
        self.user_error = all(r.get("user_error") for r in failed)
        skipped = sum(r["status"].startswith("skipped: needs") for r in results)
        if len(failed) == 1:
            head = failed[0]["error"]
        else:
            head = f"{len(failed)} stages failed: " + ", ".join(r["stage"] for r in failed)
        super().__init__(head + (f" ({skipped} stage(s) that need it skipped)" if skipped else ""))

    def __reduce__(self):
        return PipelineFailed, (self.results,)


def _classify(name: str, code: int, lines: list[str], error_line: str | None, root: str) -> StageFailed:
    """DVC exits 255 for any failed command: the stage's own exit code is in DVC's last message. A dependency
    DVC cannot find (an earlier stage never ran) is the user's to fix too: one line saying so."""
    m = _STAGE_EXIT.search(" ".join(lines[-5:]))
    returncode = int(m.group(1)) if m else code
    if not m:
        dvc_error = next((x for x in reversed(lines) if _DVC_ERROR.match(x)), None)
        missing = _MISSING.search(dvc_error or "")
        if missing:
            # worded like a stage's own line (the summary puts the stage's name in front)
            error_line = f"error: {missing_dependency(missing.group(1) or missing.group(2), Path(root))}"
            returncode = USER_ERROR_EXIT
    return StageFailed(name, returncode, " | ".join(lines[-5:]), error_line)


def _not_a_user_error(task, task_run, state) -> bool:
    """The retry condition: retry a failure unless it is a user error (a stage's `error:` line, exit 2)."""
    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(exc, StageFailed):
        return exc.returncode != USER_ERROR_EXIT
    return not isinstance(exc, UserError)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_not_a_user_error, task_run_name="{name}")
def run_stage(name: str, force: bool = False, root: str = str(PROJECT_ROOT)) -> dict[str, Any] | State:
    """`dvc repro --single-item <name>`, streaming its output into the task log. A user error returns a Failed
    state whose message is the stage's `error:` line; other failures raise StageFailed (retried)."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", name] + (["--force"] if force else [])
    if repair_rwlock(root):  # a killed earlier run can leave DVC's lock table corrupt
        logger.warning("removed a corrupt .dvc/tmp/rwlock left by a killed dvc command")
    logger.info("$ %s", " ".join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy(), bufsize=1)
    lines: list[str] = []
    error_line = None
    ran = restored = False
    last_progress = 0.0
    for raw in proc.stdout:
        # Progress bars redraw with \r: log the last redraw of a line, at most every 10 s.
        line = raw.rstrip("\n").split("\r")[-1].rstrip()
        if not line:
            continue
        if line.startswith("error: "):  # the stage's own one-line message (pipeline.errors.main_guard)
            error_line = line
        if _PROGRESS.search(line) and time.monotonic() - last_progress < 10:
            continue
        last_progress = time.monotonic() if _PROGRESS.search(line) else last_progress
        ran = ran or line.startswith("Running stage")
        restored = restored or "is cached - skipping run" in line
        lines = (lines + [line])[-20:]
        logger.info(line)
    code = proc.wait()
    seconds = round(time.monotonic() - start, 2)
    if code != 0:
        failure = _classify(name, code, lines, error_line, root)
        if failure.user_error:
            logger.error(failure.summary)
            return Failed(message=failure.summary, data=failure)
        raise failure
    status = "ran" if ran else "restored from DVC's run cache" if restored else "skipped (unchanged)"
    logger.info("%s: %s in %.1f s", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


def run_name() -> str:
    """The flow run's name says what the run was: the preset, the overrides and the stages it was started with."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    parts = ([Path(p["preset"]).stem] if p.get("preset") else []) + list(p.get("overrides") or [])
    parts += [f"stages {','.join(p['stages'])}"] if p.get("stages") else []
    parts += ["force"] if p.get("force") else []
    name = " ".join(parts) or "params.yaml as is"
    return name if len(name) <= 120 else name[:117] + "..."


def _run_pipeline(stages: list[str] | None, force: bool, overrides: list[str] | None, preset: str | None,
                  root: Path) -> list[dict[str, Any]]:
    logger = get_run_logger()
    applied = resolve_overrides(root, preset, overrides)
    with run_with_overrides(root, applied, stages):  # validated before anything is written; undone if it fails
        artifacts.publish_parameters(preset, list(overrides or []), applied, stages, force)
        if applied:
            logger.info("params.yaml updated: %s", ", ".join(applied))
        if note := unread_note(root, applied, overrides):
            logger.warning(note)
        names = select(stage_names(root), stages)
        if stages and (note := stale_upstream_note(root, names)):
            logger.warning(note)
        results: list[dict[str, Any]] = []
        failed: list[str] = []
        graph: dict[str, set[str]] | None = None
        for name in names:
            blocked = [f for f in failed if f in (graph or {}).get(name, ())]
            if blocked:  # as `dvc repro --keep-going`: what depends on a failed stage is skipped
                logger.warning("%s: skipped, it needs %s which failed", name, blocked[0])
                results.append({"stage": name, "status": f"skipped: needs {blocked[0]}", "seconds": 0.0})
                continue
            state = run_stage(name, force=force, root=str(root), return_state=True)
            if state.is_failed():
                exc = state.result(raise_on_failure=False)
                failure = exc if isinstance(exc, StageFailed) else None
                results.append({"stage": name, "status": "failed", "seconds": 0.0,
                                "error": failure.summary if failure else f"{name}: {exc}",
                                "user_error": bool(failure and failure.user_error)})
                failed.append(name)
                graph = graph if graph is not None else upstream_stages(root)
                continue
            result = state.result()
            try:
                artifacts.publish_stage(name, root)
            except Exception as exc:  # the UI's view of a stage that succeeded must not fail (and undo) the run
                logger.warning("%s: its artifacts were not published (%s: %s)", name, type(exc).__name__, exc)
            results.append(result)
        artifacts.publish_summary(results)
        if failed:
            raise PipelineFailed(results)  # inside: params.yaml, dvc.lock and the outputs go back
    return results


def _as_state(fn) -> list[dict[str, Any]] | State:
    """Run the pipeline; a user error or failed stages become a Failed state with a one-line message (what the UI
    shows), so no traceback is logged for them. Anything unexpected is raised as usual."""
    try:
        return fn()
    except UserError as exc:
        get_run_logger().error("error: %s", exc)
        return Failed(message=f"error: {exc}", data=exc)
    except PipelineFailed as exc:
        logger = get_run_logger()
        for r in exc.results:
            if r["status"] == "failed" or r["status"].startswith("skipped: needs"):
                logger.error("%-32s %s", r["stage"], r.get("error") or r["status"])
        return Failed(message=str(exc), data=exc)


@flow(name="tokenmill", flow_run_name=run_name)
def tokenmill_pipeline(stages: list[str] | None = None, force: bool = False,
                       overrides: list[str] | None = None, preset: str | None = None,
                       root: str = str(PROJECT_ROOT)) -> list[dict[str, Any]]:
    """Run the tokenmill pipeline.

    Args:
        stages: stage names to run (full `prepare@fashion_mnist` or base `prepare`); default all, in order.
        force: re-run the selected stages even when DVC says they are up to date.
        overrides: params.yaml edits applied first, `key.path=value` as in `dvc exp run -S`; validated before
            anything is written, undone when the run fails.
        preset: a file under configs/ (e.g. `configs/tiny.yaml`) applied before `overrides`.
        root: the project folder (holding dvc.yaml and params.yaml).
    """
    return _as_state(lambda: _run_pipeline(stages, force, overrides, preset, Path(root)))


def deployment_flow(root: Path):
    """The flow a deployment serves: the project folder is fixed here, at serve time, and is not a parameter a
    run started from the UI (or any client of the API) could point elsewhere."""
    root = Path(root).resolve()

    @flow(name="tokenmill", flow_run_name=run_name)
    def tokenmill(stages: list[str] | None = None, force: bool = False,
                  overrides: list[str] | None = None, preset: str | None = None) -> list[dict[str, Any]]:
        """Run the tokenmill pipeline in the served project.

        Args:
            stages: stage names to run (full `prepare@fashion_mnist` or base `prepare`); default all, in order.
            force: re-run the selected stages even when DVC says they are up to date.
            overrides: params.yaml edits, `key.path=value` as in `dvc exp run -S`; validated before anything is
                written, undone when the run fails.
            preset: a file under configs/ (e.g. `configs/tiny.yaml`) applied before `overrides`.
        """
        return _as_state(lambda: _run_pipeline(stages, force, overrides, preset, root))

    return tokenmill


def serve(root: Path, name: str) -> None:
    """Serve the deployment (`python -m pipeline serve` runs this in a child process it can always stop).

    As `Flow.serve`, except that the deployment's parameter schema admits no other parameter: a misspelt one
    (`overides`) is refused by the server when the run is created (409, one line naming it), instead of the run's
    process crashing on Prefect's signature check with nothing in the run's log."""
    import asyncio
    import warnings

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameters(ParameterSchema):
        additionalProperties: bool = False

    tokenmill = deployment_flow(root)
    deployment = tokenmill.to_deployment(
        name=name, description=f"tokenmill pipeline in {root}; set stages / force / overrides / preset when starting "
                               f"a run")
    schema = deployment._parameter_openapi_schema
    deployment._parameter_openapi_schema = ClosedParameters(**schema.model_dump(), additionalProperties=False)
    # the rest as Runner.add_flow does it (prefect pinned at 3.8.8): runs execute here, with this flow object
    deployment.work_pool_name = None
    deployment.work_queue_name = None
    runner = Runner(name=name, pause_on_shutdown=True)
    runner._deployment_registry.register_flow(runner.add_deployment(deployment), tokenmill)
    print(f"Your flow 'tokenmill' is being served as deployment 'tokenmill/{name}' (start runs from the UI)",
          flush=True)
    # Prefect 3.8's SIGTERM handler calls the async-dispatched Runner.stop from inside the loop, which only makes a
    # coroutine; it pauses the deployments and exits anyway, so the warning about it is noise
    warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
