"""The Prefect flow: the DVC stages in dvc.yaml order, one task each.

There is no second implementation of any stage: each task runs `dvc repro --single-item <stage>`, so DVC
decides what is stale and the flow skips exactly what `dvc repro` would skip. Prefect adds the UI, per-stage
logs and durations, retries for transient failures, artifacts (manifests, metrics, images) and a deployment
that starts runs with parameters from the UI.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from pipeline import artifacts
from pipeline.dvc_repair import repair_rwlock
from pipeline.runs import run_with_overrides, select, stage_names

PROJECT_ROOT = Path(__file__).resolve().parents[1]
USER_ERROR_EXIT = 2  # stages exit 2 on a user mistake: retrying cannot help
_STAGE_EXIT = re.compile(r"exited with (\d+)")
_PROGRESS = re.compile(r"\d+(\.\d+)?(it|img|step|tok|s)/s")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage} failed with exit code {returncode}: {tail}")
        self.stage, self.returncode = stage, returncode


def _user_error_not_retried(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != USER_ERROR_EXIT
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_user_error_not_retried, task_run_name="{name}")
def run_stage(name: str, force: bool = False, root: str = str(PROJECT_ROOT)) -> dict[str, Any]:
    """`dvc repro --single-item <name>`, streaming its output into the task log."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", name] + (["--force"] if force else [])
    if repair_rwlock(root):  # a killed earlier run can leave DVC's lock table corrupt
        logger.warning("removed a corrupt .dvc/tmp/rwlock left by a killed dvc command")
    logger.info("$ %s", " ".join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy(), bufsize=1)
    tail: list[str] = []
    ran = False
    last_progress = 0.0
    for raw in proc.stdout:
        # Progress bars redraw with \r: log the last redraw of a line, at most every 10 s.
        line = raw.rstrip("\n").split("\r")[-1].rstrip()
        if not line:
            continue
        if _PROGRESS.search(line) and time.monotonic() - last_progress < 10:
            continue
        last_progress = time.monotonic() if _PROGRESS.search(line) else last_progress
        ran = ran or line.startswith("Running stage")
        tail = (tail + [line])[-5:]
        logger.info(line)
    code = proc.wait()
    seconds = round(time.monotonic() - start, 2)
    if code != 0:
        # DVC exits 255 for any failed command; the stage's own exit code is in its last message.
        m = _STAGE_EXIT.search(" ".join(tail))
        raise StageFailed(name, int(m.group(1)) if m else code, " | ".join(tail))
    status = "ran" if ran else "skipped (unchanged)"
    logger.info("%s: %s in %.1f s", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


def _run_pipeline(stages: list[str] | None, force: bool, overrides: list[str] | None,
                  root: Path) -> list[dict[str, Any]]:
    logger = get_run_logger()
    overrides = list(overrides or [])
    with run_with_overrides(root, overrides):  # validated before anything is written; undone if the run fails
        if overrides:
            logger.info("params.yaml updated: %s", ", ".join(overrides))
        names = select(stage_names(root), stages)
        results = []
        for name in names:
            result = run_stage(name, force=force, root=str(root))
            artifacts.publish_stage(name, root)
            results.append(result)
    artifacts.publish_summary(results)
    return results


@flow(name="tokenmill")
def tokenmill_pipeline(stages: list[str] | None = None, force: bool = False,
                       overrides: list[str] | None = None, root: str = str(PROJECT_ROOT)) -> list[dict[str, Any]]:
    """Run the tokenmill pipeline.

    Args:
        stages: stage names to run (full `prepare@fashion_mnist` or base `prepare`); default all, in order.
        force: re-run the selected stages even when DVC says they are up to date.
        overrides: params.yaml edits applied first, `key.path=value` as in `dvc exp run -S`; validated before
            anything is written, undone when the run fails.
        root: the project folder (holding dvc.yaml and params.yaml).
    """
    return _run_pipeline(stages, force, overrides, Path(root))


def deployment_flow(root: Path):
    """The flow a deployment serves: the project folder is fixed here, at serve time, and is not a parameter a
    run started from the UI (or any client of the API) could point elsewhere."""
    root = Path(root).resolve()

    @flow(name="tokenmill")
    def tokenmill(stages: list[str] | None = None, force: bool = False,
                  overrides: list[str] | None = None) -> list[dict[str, Any]]:
        """Run the tokenmill pipeline in the served project.

        Args:
            stages: stage names to run (full `prepare@fashion_mnist` or base `prepare`); default all, in order.
            force: re-run the selected stages even when DVC says they are up to date.
            overrides: params.yaml edits, `key.path=value` as in `dvc exp run -S`; validated before anything is
                written, undone when the run fails.
        """
        return _run_pipeline(stages, force, overrides, root)

    return tokenmill
