"""The project's import graph, read from the source (AST), not from a running interpreter.

One graph serves three purposes:
- a stage's code deps in dvc.yaml are the import closure of `stages/<name>.py` (`python -m pipeline deps`);
- a stage's code fingerprint (part of its cache identity: checkpoints resume only under the same one) hashes
  the same closure;
- the layering check (pipeline/layering.py, which no stage imports, so the list of orchestration modules can change
  without changing any stage's identity) checks that imports point down only and that there are no cycles.

Every `import` / `from ... import` counts, at module level or inside a function. Importing `a.b.c` also runs
`a/__init__.py` and `a/b/__init__.py`, so package `__init__` files are part of a closure.

Project code is whatever `import x` finds in the root, because stages run as `python -m stages.<name>` from there
(the root first on sys.path, so `helpers.py` in the root shadows an installed `helpers`): root/x/__init__.py,
root/x.py, or a module of a namespace folder (root/x/y.py), at any depth. Not code: built-in and frozen modules
(found before sys.path), a file that resolves outside the root (a symlink), and the data/ and runs/ folders. A
module outside the four layered packages (a top-level `helpers.py`, another package) is in the closure and the
fingerprint like any other, but has no layer: the layering check reports every import of one, to be moved in.
"""
from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from importlib.machinery import FrozenImporter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "training", "stages")
# Folders in the root that hold data and run outputs: never code, whatever .py files land in them.
NOT_CODE = frozenset({"data", "runs"})


def _preempted(top: str) -> bool:
    """Built-in and frozen modules are found before sys.path is searched: a root file of that name never runs."""
    return top in sys.builtin_module_names or FrozenImporter.find_spec(top) is not None


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file `import module` runs from the root, or None when that is not project code (module docstring)."""
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts) or parts[0] in NOT_CODE or _preempted(parts[0]):
        return None
    base = root.joinpath(*parts)
    for path in (base / "__init__.py", base.with_suffix(".py")):  # Python's order: a package before a module
        if path.is_file():
            return path if path.resolve().is_relative_to(root.resolve()) else None
    return None


def project_modules(root: Path = ROOT) -> list[str]:
    """Every module of the layered packages, subpackages included (a subpackage's layer is its top package's)."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if all(p.isidentifier() for p in parts):  # a folder like `.ipynb_checkpoints` is not importable
                out.append(".".join(parts))
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


@lru_cache(maxsize=None)
def _imports_cached(path: str, module: str, root: str) -> frozenset[str]:
    rootp = Path(root)
    tree = ast.parse(Path(path).read_text(), filename=path)
    is_package = Path(path).name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            # `from pkg import name`: name is a submodule when a file for it exists, else an attribute of pkg
            names = [target] + [f"{target}.{a.name}" for a in node.names
                                if module_file(f"{target}.{a.name}", rootp) is not None]
        elif isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args:
            names = _dynamic_targets(node.args[0], rootp)
        else:
            continue
        for name in names:
            if name and name != module and module_file(name, rootp) is not None:
                found.add(name)
    return frozenset(found)


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _dynamic_targets(arg: ast.expr, root: Path) -> list[str]:
    """What importlib.import_module(arg) may import: a literal name is that module; f"stages.{name}" is any module of
    the stages package; a name with no literal package part is not known (and not counted)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        package = str(arg.values[0].value).rpartition(".")[0]
        if package:  # (a folder that is not there globs to nothing)
            folder = root.joinpath(*package.split("."))
            return [package] + [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]
    return []


def imports_of(module: str, root: Path = ROOT) -> set[str]:
    """Project modules that `module` imports anywhere in its file (module and function level)."""
    path = module_file(module, root)
    if path is None:
        raise KeyError(f"no project module {module!r} under {root}")
    return set(_imports_cached(str(path), module, str(root)))


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(module: str, root: Path = ROOT) -> list[str]:
    """Every project module that importing `module` runs (itself, its imports, their packages), sorted."""
    seen: set[str] = set()
    todo = list(_with_parents(module))
    while todo:
        m = todo.pop()
        if m in seen or module_file(m, root) is None:
            continue
        seen.add(m)
        for dep in imports_of(m, root):
            todo.extend(_with_parents(dep))
    return sorted(seen)


def closure_files(module: str, root: Path = ROOT) -> list[str]:
    """The closure as paths relative to the project root (what dvc.yaml lists as code deps)."""
    return sorted(module_file(m, root).relative_to(root).as_posix() for m in closure(module, root))


def code_fingerprint(module: str, root: Path = ROOT) -> str:
    """sha256 over the closure's paths and contents: changes whenever any file `module` runs changes."""
    h = hashlib.sha256()
    for rel in closure_files(module, root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()
