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
    # The longest modules first (scripts/test.sh turns off xdist's reordering by test count, which put the five-test
    # bad-input sweep last, alone on one core for 80 s), so the last modules to finish are short ones.
    first = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(Path(str(item.fspath)).name, len(first)))  # stable: within a module as is


# Seconds of one run of each module on 2 shared cores (pytest --junitxml, session 28), longest first. Order only:
# a stale entry costs time, never a result.
LONGEST_MODULES = ("test_orchestration.py",  # 171 s
                   "test_cache_identity.py",  # 106
                   "test_nothing_lost.py",  # 84
                   "test_out_guard.py",  # 69
                   "test_ddp.py",  # 45
                   "test_doctor.py",  # 40
                   "test_tokenize.py",  # 39
                   "test_prefect_server.py",  # 27
                   "test_eval_stages.py",  # 25
                   "test_behaviour_side_commands.py",  # 24
                   "test_train_vqgan.py")  # 18
