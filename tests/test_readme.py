"""The README is the front door: its commands must exist, its links must resolve, and it stays short (issue 13).
Every `python -m pipeline ...` command it shows is parsed by the real command line (nothing runs); every
`python -m stages.<name>`, file and link it names exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.dvc_graph import STAGE_MODULES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"`([^`\n]+)`", README) + [line for block in re.findall(r"```bash\n(.*?)```", README, re.S)
                                                 for line in block.splitlines()]


def commands(prefix: str) -> list[str]:
    out = []
    for text in SNIPPETS:
        text = text.split("#")[0].strip()
        if text.startswith(prefix):
            out.append(text)
    return out


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250


@pytest.mark.parametrize("command", commands("python -m pipeline "))
def test_pipeline_commands_parse(command):
    words = shlex.split(command)[3:]
    words = [w for w in words if "..." not in w]
    build_parser().parse_args(words)  # exits (SystemExit) on an unknown command or option


def test_stage_commands_exist():
    for command in commands("python -m stages."):
        name = shlex.split(command)[2].split(".", 1)[1]
        assert name in STAGE_MODULES and (ROOT / "stages" / f"{name}.py").is_file(), command


def test_links_and_named_files_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target
    for path in re.findall(r"`((?:scripts|configs|tests|docs|pipeline|stages|training|models|requirements)/[\w./-]+)`",
                           README):
        assert (ROOT / path).exists(), path
