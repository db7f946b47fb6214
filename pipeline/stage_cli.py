"""The command line of a stage (`python -m stages.<name>`): load and validate params, then run the stage.

Every path, key and value is validated before the stage writes anything; user mistakes end as one `error:` line
(pipeline/errors.py `main_guard`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.config import load_params
from pipeline.errors import main_guard


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr so stdout stays quiet enough to read."""
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # it logs every SIMD variant it fails to load


def run_stage_cli(doc: str, run: Callable[[Any], None], *, check: Callable[[dict, str], Any] | None = None,
                  load_config: Callable[[str, str], Any] | None = None) -> None:
    """The command line of a stage (`python -m stages.<name>`): load and validate params, then `run(cfg)`.

    Stages with one params section pass `check(params, source) -> cfg`; per-dataset stages (DVC foreach) pass
    `load_config(params_path, dataset) -> cfg` and get a `--dataset` option.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if load_config is not None:
        ap.add_argument("--dataset", required=True, help="name of an entry under `datasets:` in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    setup_logging()

    def body() -> None:
        if os.environ.get("DVC_STAGE"):  # run by DVC: its record of this stage's code must be the code that runs
            from pipeline.dvc_deps import check_running_stage
            check_running_stage(os.environ["DVC_STAGE"], Path(os.environ.get("DVC_ROOT", ".")))
        cfg = load_config(args.params, args.dataset) if load_config else check(load_params(args.params), args.params)
        run(cfg)

    main_guard(body)
