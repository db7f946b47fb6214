"""The import graph (pipeline/codegraph.py) and dvc.yaml's generated code deps (pipeline/dvc_deps.py), on throwaway
project trees whose answers are known: which files a stage's identity covers, which imports break the layering, and
what `deps --write` changes in dvc.yaml (and what it leaves alone)."""
from __future__ import annotations

import pytest

from helpers import fake_tree
from pipeline import codegraph, dvc_deps, layering

TREE = {
    "models/net.py": "import torch\nimport numpy as np\n",
    "models/sub.py": "from models import net\n",
    "pipeline/io.py": "from . import helpers\n",
    "pipeline/reader.py": "from .helpers import X\n",  # the submodule named in a relative from-import
    "training/__init__.py": "from . import loop\n",  # a package's relative import is relative to the package
    "pipeline/helpers.py": "X = 1\n",
    "pipeline/lazy.py": "",
    "pipeline/unused.py": "import pipeline.io\n",
    "training/loop.py": "from ..pipeline import io\n",  # a relative import two levels up
    "stages/s.py": "import models.sub\nfrom pipeline import io, CONSTANT\n\ndef run():\n    import pipeline.lazy\n",
    "stages/t.py": "from training.loop import *\n",
}


@pytest.fixture(autouse=True)
def fresh_cache():
    codegraph._imports_cached.cache_clear()  # trees in tmp_path may reuse a path of an earlier test
    yield
    codegraph._imports_cached.cache_clear()


def test_closure_follows_package_submodule_relative_and_function_level_imports(tmp_path):
    fake_tree(tmp_path, TREE)
    assert codegraph.closure("stages.s", tmp_path) == [
        "models", "models.net", "models.sub", "pipeline", "pipeline.helpers", "pipeline.io", "pipeline.lazy",
        "stages", "stages.s"]
    assert codegraph.closure_files("stages.t", tmp_path) == [
        "pipeline/__init__.py", "pipeline/helpers.py", "pipeline/io.py", "stages/__init__.py", "stages/t.py",
        "training/__init__.py", "training/loop.py"]
    # `from pipeline import io, CONSTANT`: io is a module, CONSTANT an attribute of the package
    assert codegraph.imports_of("stages.s", tmp_path) == {"models.sub", "pipeline", "pipeline.io", "pipeline.lazy"}
    assert codegraph.imports_of("pipeline.io", tmp_path) == {"pipeline", "pipeline.helpers"}
    assert codegraph.imports_of("pipeline.reader", tmp_path) == {"pipeline.helpers"}
    assert codegraph.imports_of("training", tmp_path) == {"training.loop"}
    with pytest.raises(KeyError, match="no project module 'pipeline.missing' under"):
        codegraph.imports_of("pipeline.missing", tmp_path)


def test_relative_imports_climb_one_package_per_dot_beyond_the_first(tmp_path):
    """In a subpackage two and three levels deep (`..` from models/sub/deep.py is models), where dropping a level
    too many or too few lands on another module or none."""
    deep = "from ..net import X\n"
    fake_tree(tmp_path, {"models/net.py": "", "models/sub/__init__.py": "", "models/sub/deep.py": deep,
                         "pipeline/helpers.py": "", "pipeline/a/__init__.py": "", "pipeline/a/b/__init__.py": "",
                         "pipeline/a/b/c.py": "from ...helpers import Y\nfrom .. import b\n"})
    assert codegraph.imports_of("models.sub.deep", tmp_path) == {"models.net"}
    assert codegraph.imports_of("pipeline.a.b.c", tmp_path) == {"pipeline.helpers", "pipeline.a", "pipeline.a.b"}


def test_project_modules_names_packages_by_their_name(tmp_path):
    fake_tree(tmp_path, {"models/net.py": "", "stages/s.py": ""})
    assert codegraph.project_modules(tmp_path) == ["models", "models.net", "pipeline", "training", "stages",
                                                   "stages.s"]


def test_code_fingerprint_covers_the_closure_paths_and_contents(tmp_path):
    fake_tree(tmp_path, TREE)
    before = codegraph.code_fingerprint("stages.s", tmp_path)
    (tmp_path / "pipeline" / "unused.py").write_text("Y = 2\n")  # outside the closure
    assert codegraph.code_fingerprint("stages.s", tmp_path) == before
    (tmp_path / "pipeline" / "lazy.py").write_text("Z = 3\n")  # inside (a function-level import)
    codegraph._imports_cached.cache_clear()
    changed = codegraph.code_fingerprint("stages.s", tmp_path)
    assert changed != before
    other = tmp_path / "copy"
    fake_tree(other, {**TREE, "pipeline/lazy.py": "Z = 3\n"})
    assert codegraph.code_fingerprint("stages.s", other) == changed  # a function of the files, not of the folder


def test_code_fingerprint_is_sha256_of_each_path_and_content(tmp_path):
    """Checkpoints store it: the formula is part of the on-disk format (a change would refuse every resume)."""
    import hashlib

    fake_tree(tmp_path, {"stages/s.py": "import pipeline.helpers\n", "pipeline/helpers.py": "X = 1\n"})
    h = hashlib.sha256()
    for rel in ("pipeline/__init__.py", "pipeline/helpers.py", "stages/__init__.py", "stages/s.py"):
        h.update(rel.encode() + b"\0" + (tmp_path / rel).read_bytes() + b"\0")
    assert codegraph.code_fingerprint("stages.s", tmp_path) == h.hexdigest()


def test_find_cycle_returns_the_cycle_path(tmp_path):
    fake_tree(tmp_path, {"pipeline/a.py": "import pipeline.b\n", "pipeline/b.py": "import pipeline.c\n",
                         "pipeline/c.py": "import pipeline.a\n", "models/x.py": "", "models/y.py": "import models.x\n"})
    assert layering.find_cycle(tmp_path) == ["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]
    # a diamond is not a cycle
    diamond = tmp_path / "d"
    fake_tree(diamond, {"pipeline/a.py": "import pipeline.b\nimport pipeline.c\n",
                        "pipeline/b.py": "import pipeline.d\n", "pipeline/c.py": "import pipeline.d\n",
                        "pipeline/d.py": ""})
    assert layering.find_cycle(diamond) is None
    # a cycle reached only through a module visited earlier
    late = tmp_path / "late"
    fake_tree(late, {"pipeline/a.py": "import pipeline.b\n", "pipeline/b.py": "import pipeline.c\n",
                     "pipeline/c.py": "import pipeline.b\n"})
    assert layering.find_cycle(late) == ["pipeline.b", "pipeline.c", "pipeline.b"]
    # a package's __init__ that re-exports a submodule which imports the package back is no cycle (Python allows
    # it: the package is in sys.modules before its __init__ runs), while the same through a plain module is
    package = tmp_path / "package"
    fake_tree(package, {"pipeline/__init__.py": "from pipeline.a import x\n",
                        "pipeline/a.py": "import pipeline\nx = 1\n"})
    assert layering.find_cycle(package) is None
    fake_tree(package, {"pipeline/b.py": "import pipeline.c\n", "pipeline/c.py": "from pipeline import b\n"})
    assert layering.find_cycle(package) == ["pipeline.b", "pipeline.c", "pipeline.b"]


def test_layering_skips_bare_package_imports_only(tmp_path):
    fake_tree(tmp_path, {"pipeline/io.py": "import pipeline\nimport stages\nimport stages.s\n", "stages/s.py": "",
                         "pipeline/flow.py": "import stages.s\n"})  # orchestration may import stages
    assert layering.layering_violations(tmp_path) == ["pipeline.io imports stages.s (a higher layer)"]


DVC_YAML = """\
# the pipeline
stages:
  s:
    foreach: ${datasets}
    do:
      cmd: python -m stages.s --dataset ${key}
      deps:
        - data/raw/${key}     # the data comes first
        - pipeline/old.py
        - stages/s.py
        - configs/extra.yaml
  mine:  # a stage of the user's own: left alone
    cmd: python my_script.py --with a-long-option-value --and another-long-option-value --out somewhere/far
    deps:
      - pipeline/anything.py
"""


def test_write_replaces_only_the_code_deps_and_keeps_the_rest(tmp_path):
    fake_tree(tmp_path, {"pipeline/io.py": "", "stages/s.py": "import pipeline.io\n"})
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {"s": (
        ["pipeline/old.py", "stages/s.py"],
        ["pipeline/__init__.py", "pipeline/io.py", "stages/__init__.py", "stages/s.py"])}
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == ["s"]
    # the code deps replaced by the closure after the data deps, and nothing else changed (comments, order, widths)
    old_deps = "        - pipeline/old.py\n        - stages/s.py\n        - configs/extra.yaml\n"
    new_deps = ("        - configs/extra.yaml\n        - pipeline/__init__.py\n        - pipeline/io.py\n"
                "        - stages/__init__.py\n        - stages/s.py\n")
    assert (tmp_path / "dvc.yaml").read_text() == DVC_YAML.replace(old_deps, new_deps)
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {}
    stamp = (tmp_path / "dvc.yaml").stat().st_mtime_ns
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == []
    assert (tmp_path / "dvc.yaml").stat().st_mtime_ns == stamp  # nothing to change: not rewritten
    # the parse is cached by the file's text: the old text again (an undo) is the old drift, not what write changed
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert list(dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path)) == ["s"]


def test_write_gives_a_new_stage_its_code_deps(tmp_path):
    fake_tree(tmp_path, {"stages/s.py": ""})
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -m stages.s\n    outs:\n      - out\n")
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {"s": ([], ["stages/__init__.py", "stages/s.py"])}
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == ["s"]
    assert (tmp_path / "dvc.yaml").read_text() == ("stages:\n  s:\n    cmd: python -m stages.s\n    outs:\n"
                                                   "      - out\n    deps:\n      - stages/__init__.py\n"
                                                   "      - stages/s.py\n")


def test_a_user_stage_first_does_not_hide_the_stages_after_it(tmp_path):
    fake_tree(tmp_path, {"stages/s.py": ""})
    (tmp_path / "dvc.yaml").write_text("stages:\n  mine:\n    cmd: ./plot.sh\n  s:\n    cmd: python -m stages.s\n"
                                       "    deps:\n      - stages/s.py\n")
    assert list(dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path)) == ["s"]
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == ["s"]
    (tmp_path / "vars.yaml").write_text("vars:\n  - x: 1\n")
    dvc_deps.check_running_stage("vars.yaml:s", tmp_path, tmp_path)  # a file without stages: no opinion


def test_deps_given_with_options_count_by_their_path(tmp_path):
    fake_tree(tmp_path, {"stages/s.py": ""})
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n"
                                       "      - stages/__init__.py:\n          hash: md5\n      - stages/s.py\n")
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {}
    assert dvc_deps.describe(["a.py", "b.py"], ["b.py", "c.py", "d.py"]) == "missing c.py, d.py; not imported a.py"
    assert dvc_deps.describe(["a.py"], ["a.py", "b.py"]) == "missing b.py; not imported -"
    assert dvc_deps.describe(["a.py", "b.py", "c.py"], ["a.py"]) == "missing -; not imported b.py, c.py"


def test_the_run_command_lists_our_stages_and_skips_a_user_stage(tmp_path):
    from pipeline.dvc_graph import pipeline_stages

    (tmp_path / "dvc.yaml").write_text("stages:\n  count:\n    cmd: ls data > count.txt\n  prepare:\n    foreach: [a]\n"
                                       "    do:\n      cmd: python -m stages.prepare --dataset ${item}\n"
                                       "  sample:\n    cmd: python -m stages.sample\n")
    assert pipeline_stages(tmp_path) == ["prepare", "sample"]


SUBPACKAGE = {"models/extra/__init__.py": "", "models/extra/util.py": "K = 1\n",
              "models/quantizer.py": "import torch\nfrom models.extra import util\n",
              "stages/s.py": "import models.quantizer\n"}
SUBPACKAGE_FILES = ["models/__init__.py", "models/extra/__init__.py", "models/extra/util.py", "models/quantizer.py",
                    "stages/__init__.py", "stages/s.py"]


def test_a_subpackage_module_is_in_the_closure_and_the_project_modules(tmp_path):
    fake_tree(tmp_path, SUBPACKAGE)
    assert codegraph.closure_files("stages.s", tmp_path) == SUBPACKAGE_FILES
    assert codegraph.project_modules(tmp_path) == ["models", "models.extra", "models.extra.util", "models.quantizer",
                                                   "pipeline", "training", "stages", "stages.s"]
    # the layering sees subpackage modules too: layer = the top-level package
    (tmp_path / "models" / "extra" / "util.py").write_text("import pipeline.io\n")
    (tmp_path / "pipeline" / "io.py").write_text("")
    codegraph._imports_cached.cache_clear()
    assert layering.layering_violations(tmp_path) == ["models.extra.util imports pipeline.io (a higher layer)"]


def test_write_lists_subpackage_files_once_and_then_checks_clean(tmp_path):
    """Nested code deps were taken for data deps: never removed (so piled up on every --write), never counted as
    listed (so --check could not be satisfied)."""
    fake_tree(tmp_path, SUBPACKAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - data/in\n")
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == ["s"]
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {}
    once = (tmp_path / "dvc.yaml").read_text()
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == []
    assert (tmp_path / "dvc.yaml").read_text() == once
    assert once.count("models/extra/util.py") == 1 and "      - data/in\n" in once


OUTSIDE = {"helpers.py": "SCALE = 1.0\n", "extpkg/__init__.py": "", "extpkg/mod.py": "", "loose/ns.py": "",
           "data/gen.py": "", "runs/r.py": "",
           "training/vqgan.py": "import torch\nimport helpers\nfrom extpkg import mod\nimport loose.ns\n",
           "stages/s.py": "import training.vqgan\nimport data.gen\nimport runs.r\nimport json\n"}


def test_a_top_level_project_module_is_in_the_closure_and_the_fingerprint(tmp_path):
    """`python -m stages.s` runs from the root, so `import helpers` finds root/helpers.py first: project code (a
    top-level module, another package, a namespace folder's module), unlike data/, runs/ and installed packages."""
    fake_tree(tmp_path, OUTSIDE)
    assert codegraph.closure_files("stages.s", tmp_path) == [
        "extpkg/__init__.py", "extpkg/mod.py", "helpers.py", "loose/ns.py", "stages/__init__.py", "stages/s.py",
        "training/__init__.py", "training/vqgan.py"]
    before = codegraph.code_fingerprint("stages.s", tmp_path)
    (tmp_path / "helpers.py").write_text("SCALE = 2.0\n")
    codegraph._imports_cached.cache_clear()
    assert codegraph.code_fingerprint("stages.s", tmp_path) != before
    # a stage's module outside the layered packages is flagged: it has no layer
    assert layering.layering_violations(tmp_path) == [
        "training.vqgan imports extpkg (outside models, pipeline, training, stages: move it into one)",
        "training.vqgan imports extpkg.mod (outside models, pipeline, training, stages: move it into one)",
        "training.vqgan imports helpers (outside models, pipeline, training, stages: move it into one)",
        "training.vqgan imports loose.ns (outside models, pipeline, training, stages: move it into one)"]


def test_a_module_file_outside_the_root_or_shadowed_by_a_builtin_is_not_project_code(tmp_path):
    outside = tmp_path / "elsewhere"
    fake_tree(outside, {"linked.py": ""})
    root = tmp_path / "root"
    fake_tree(root, {"stages/s.py": "import linked\nimport sys\nimport json\n", "sys.py": "", "json.py": ""})
    (root / "linked.py").symlink_to(outside / "linked.py")
    # sys is built into the interpreter (found before the path); json.py in the root shadows the stdlib's
    assert codegraph.closure_files("stages.s", root) == ["json.py", "stages/__init__.py", "stages/s.py"]


def test_write_and_check_count_top_level_modules_as_code_deps(tmp_path):
    fake_tree(tmp_path, OUTSIDE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - data/in\n"
                                       "      - configs/x.yaml\n      - data/raw/${key}\n")
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == ["s"]
    assert dvc_deps.drift(tmp_path / "dvc.yaml", tmp_path) == {}
    once = (tmp_path / "dvc.yaml").read_text()
    assert dvc_deps.write(tmp_path / "dvc.yaml", tmp_path) == []
    assert once.count("- helpers.py\n") == 1 and "      - configs/x.yaml\n      - data/raw/${key}\n" in once
    assert [p for p in ("helpers.py", "extpkg/mod.py", "a/b/c.py", "data/gen.py", "runs/r.py", ".venv/x.py",
                        "data/raw/${key}", "configs/x.yaml", "bad-name.py") if dvc_deps.is_code_dep(p)] == [
        "helpers.py", "extpkg/mod.py", "a/b/c.py"]
