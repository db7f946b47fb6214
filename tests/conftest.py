"""Fixtures shared by the tests; the helpers themselves live in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The venv's bin (dvc, prefect) must be on PATH for subprocesses even when pytest runs without activation.
os.environ["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

from helpers import build_tiny_world, make_idx_dataset  # noqa: E402


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_dataset(tmp_path / "idx")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """Built once per test run: prepared data, a random-init VQGAN (+ another codebook) and its token store.
    Tests read it and write their outputs elsewhere."""
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def pytest_collection_modifyitems(items) -> None:
    """`-m unit` selects the fast tests: every test that neither runs a stage end to end nor starts a subprocess
    world (those are marked `stage`, `slow` or live in the stage test files)."""
    stage_files = {"test_train_vqgan.py", "test_train_transformer.py", "test_train_gan.py", "test_tokenize.py",
                   "test_eval_stages.py", "test_orchestration.py", "test_nothing_lost.py", "test_cache_identity.py",
                   "test_prepare.py"}
    for item in items:
        if Path(str(item.fspath)).name not in stage_files and "slow" not in item.keywords:
            item.add_marker(pytest.mark.unit)
