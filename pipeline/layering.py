"""The layering rule over the import graph: models -> pipeline plumbing -> training -> stages -> orchestration.

Kept apart from pipeline/codegraph.py on purpose: codegraph is in every stage's import closure (it computes the code
fingerprint), this module is in none, so naming a new orchestration module here re-runs nothing.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.codegraph import PACKAGES, ROOT, imports_of, module_file, project_modules

# Modules of the pipeline package that orchestrate (may import stages); every other pipeline module is plumbing.
ORCHESTRATION = frozenset({"pipeline.cli", "pipeline.flow", "pipeline.artifacts", "pipeline.__main__", "pipeline.tiny",
                           "pipeline.retokenize", "pipeline.runs", "pipeline.run_checks", "pipeline.compare",
                           "pipeline.presets"})
LAYERS = {"models": 0, "pipeline": 1, "training": 2, "stages": 3}


def layer_of(module: str) -> int:
    """models 0, plumbing 1, training 2, stages 3, orchestration 4."""
    if module in ORCHESTRATION:
        return 4
    return LAYERS[module.split(".")[0]]


def find_cycle(root: Path = ROOT) -> list[str] | None:
    """One import cycle between project modules (package __init__ edges excluded), or None."""
    graph = {m: sorted(d for d in imports_of(m, root) if module_file(d, root).name != "__init__.py")
             for m in project_modules(root)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in graph.get(m, ()):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def layering_violations(root: Path = ROOT) -> list[str]:
    """Imports that point up a layer, a stage importing another stage, imports of modules that have no layer."""
    out = []
    for m in project_modules(root):
        for dep in sorted(imports_of(m, root)):
            if dep.split(".")[0] not in LAYERS:
                out.append(f"{m} imports {dep} (outside {', '.join(PACKAGES)}: move it into one)")
                continue
            if dep in PACKAGES:  # a bare package import runs only its __init__
                continue
            if layer_of(dep) > layer_of(m):
                out.append(f"{m} imports {dep} (a higher layer)")
            elif m.startswith("stages.") and dep.startswith("stages.") and dep != m:
                out.append(f"{m} imports {dep} (a stage never imports another stage)")
    return out
