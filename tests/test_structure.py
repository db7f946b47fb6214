"""The house rules that a reader cannot check by eye every time (issue 13): the layering of imports, and one
source of defaults."""
from __future__ import annotations

import dataclasses

import pytest

from helpers import fake_tree
from pipeline import codegraph, layering
from pipeline.codegraph import ROOT
from pipeline.config import load_params


def test_imports_point_down_only_and_stages_never_import_stages():
    """models -> pipeline (plumbing) -> training -> stages -> orchestration (pipeline.cli/flow/artifacts);
    function-level imports count."""
    assert layering.layering_violations() == []


def test_no_import_cycles():
    assert layering.find_cycle() is None


def test_the_layering_rules_are_in_no_stage_closure():
    """Naming a new orchestration module must not change any stage's cache identity (a full re-run)."""
    stages = [m for m in codegraph.project_modules() if m.startswith("stages.")]
    assert stages and all("pipeline.layering" not in codegraph.closure(m) for m in stages)
    assert all("pipeline.codegraph" in codegraph.closure(m) for m in ("stages.train_vqgan", "stages.tokenize"))


def test_models_import_nothing_outside_models():
    for m in codegraph.project_modules():
        if m.startswith("models"):
            assert all(d.startswith("models") for d in codegraph.imports_of(m)), m


def test_layering_check_catches_an_upward_import(tmp_path):
    fake_tree(tmp_path, {"models/net.py": "def f():\n    from pipeline.io import x\n",
                         "pipeline/io.py": "from models.net import f\nx = 1\n",
                         "stages/a.py": "", "stages/b.py": "import stages.a\n"})
    found = layering.layering_violations(tmp_path)
    assert "models.net imports pipeline.io (a higher layer)" in found
    assert "stages.b imports stages.a (a stage never imports another stage)" in found
    assert layering.find_cycle(tmp_path) in (["models.net", "pipeline.io", "models.net"],
                                              ["pipeline.io", "models.net", "pipeline.io"])


def test_a_dynamic_import_of_a_stage_counts_as_an_import(tmp_path):
    """pipeline/runs.py (the pre-run checks, now in run_checks.py) called every stage's `check` through
    importlib.import_module(f"stages.{name}") while the graph called it plumbing: the layering test saw no import.
    A literal prefix of the name counts now."""
    fake_tree(tmp_path, {"stages/a.py": "", "stages/b.py": "",
                         "pipeline/plumb.py": "import importlib\n\ndef f(n):\n"
                                              "    return importlib.import_module(f'stages.{n}')\n",
                         "pipeline/named.py": "from importlib import import_module\nm = import_module('stages.a')\n",
                         "pipeline/opaque.py": "import importlib\n\ndef f(p):\n"
                                               "    return importlib.import_module(p)\n",
                         "stages/sub/__init__.py": "", "stages/sub/c.py": "",
                         "pipeline/nested.py": "import importlib\nm = importlib.import_module(f'stages.sub.{1}')\n",
                         "pipeline/nodot.py": "import importlib\nm = importlib.import_module(f'stages{1}')\n"})
    assert layering.layering_violations(tmp_path) == [
        "pipeline.named imports stages.a (a higher layer)", "pipeline.nested imports stages.sub (a higher layer)",
        "pipeline.nested imports stages.sub.c (a higher layer)",
        "pipeline.plumb imports stages.a (a higher layer)", "pipeline.plumb imports stages.b (a higher layer)"]
    assert codegraph.imports_of("pipeline.opaque", tmp_path) == set()
    assert codegraph.imports_of("pipeline.nested", tmp_path) == {"stages.sub", "stages.sub.c"}
    assert codegraph.imports_of("pipeline.nodot", tmp_path) == set()


def _section_classes() -> dict[str, type]:
    from stages.eval_vqgan import EvalVQGANParams
    from stages.evaluate import EvaluateParams
    from stages.fid_ref import FidRefParams
    from stages.prepare import PrepareParams
    from stages.sample import SampleParams
    from stages.tokenize import TokenizeParams
    from stages.train_transformer import TrainTransformerParams
    from stages.train_vqgan import TrainVQGANParams
    return {"prepare": PrepareParams, "train_vqgan": TrainVQGANParams, "tokenize": TokenizeParams,
            "fid_ref": FidRefParams, "eval_vqgan": EvalVQGANParams, "train_transformer": TrainTransformerParams,
            "sample": SampleParams, "evaluate": EvaluateParams}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _disagreements(defaults: dict, values: dict, where: str) -> list[str]:
    """`defaults`: {field: default value} of a section (nested dataclass defaults as instances)."""
    out = []
    for key, value in values.items():
        default = defaults[key]
        if default is dataclasses.MISSING:
            continue
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            nested = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            out += _disagreements(nested, value, f"{where}.{key}")
            continue
        norm = list(default) if isinstance(default, tuple) else default
        if norm != value:
            out.append(f"{where}.{key}: code default {default!r}, params.yaml {value!r}")
    return out


@pytest.mark.parametrize("section", list(_section_classes()))
def test_code_defaults_equal_params_yaml(section):
    """params.yaml is the single source of the default run; a dataclass default (what a test, a notebook or a
    preset that omits the key gets) must say the same thing."""
    params = load_params(codegraph.ROOT / "params.yaml")
    cls = _section_classes()[section]
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    assert _disagreements(defaults, params[section], section) == []


def test_no_line_is_longer_than_120_characters():
    """The house width (two files side by side); long lines crept in through bulk renames before this test."""
    long = [f"{p.relative_to(ROOT)}:{i}" for folder in ("models", "pipeline", "training", "stages", "tests", "bench",
                                                       "scripts")
            for p in sorted((ROOT / folder).rglob("*.py")) if ".venv" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []
