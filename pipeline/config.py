"""params.yaml loading and validation.

Each stage declares its section as a dataclass in its own module (so changing one stage's schema only
invalidates that stage in DVC). `from_dict` checks a raw YAML mapping against such a dataclass: unknown keys,
wrong types and out-of-range values raise `UserError` naming the key, the bad value and what is allowed.

Constraints are attached with `param(default, min=..., max=..., choices=...)`.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.errors import UserError, first_line

T = TypeVar("T")
PARAMS_FILE = "params.yaml"
_MISSING = dataclasses.MISSING
# Every int param must fit a signed 64-bit integer: torch, numpy and faiss take no larger one, and a value that
# passed validation must not become a traceback in the stage.
INT_MIN, INT_MAX = -2**63, 2**63 - 1
# Every seed param's max. The tightest consumer is training/gan.py's step_generator: torch seeds must be < 2**64
# and ((seed * 1_000_003 + step) * 8 + stream) * 4096 + rank stays below that for seeds < 2**29 (faiss's k-means,
# an int32 seed, takes them too; the other stages derive seeds by seed * 1_000_003 + i).
SEED_MAX = 2**29 - 1


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot or an exponent sign (`5e-4`, `1E3`).

    PyYAML follows YAML 1.1, where `5e-4` is a string, while DVC (ruamel, YAML 1.2) reads it as a float: a
    learning rate written that way in params.yaml or `-S` must not become "wrong type" here only."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse params YAML: safe (no objects), with YAML 1.2 floats."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader subclass)


NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
# Top-level folders an output path may never point into.
RESERVED_TOPS = {".git", ".dvc", "models", "pipeline", "training", "stages", "tests", "configs", "scripts", "bench"}


def param(default: Any = _MISSING, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, default_factory: Any = _MISSING, kind: str | None = None) -> Any:
    """A dataclass field with validation metadata. Without default the key is required.

    kind "out_path": a path the stage writes, which must stay inside the project (relative, no `..`, not into
    the code or .git/.dvc); kind "name": a dataset / split name used inside file names (letters, digits, _ -)."""
    meta = {"min": min, "max": max, "choices": choices, "kind": kind}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def printable(text: str) -> str:
    """User text inside a message, kept on one line: control characters and line breaks escaped as repr does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_params_text(path: Path) -> str:
    """A params file's text. It must be UTF-8 (what DVC reads it as); anything else is one line naming the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); params files are "
                        f"UTF-8") from None


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as plain data (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found (run from the project root or pass --params)")
    text = read_params_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        # a parser/scanner error carries a mark and a problem; a reader error (a control character) a position
        mark, pos = getattr(exc, "problem_mark", None), getattr(exc, "position", None)
        line = mark.line + 1 if mark else text.count("\n", 0, pos) + 1 if isinstance(pos, int) else None
        problem = printable(getattr(exc, "problem", None) or first_line(exc))
        where = f" line {line}" if line else ""
        raise UserError(f"{path}:{where} is not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def check_dataset_ref(params: dict[str, Any], key: str, name: str, source: str = PARAMS_FILE) -> None:
    """`key` (e.g. train_vqgan.dataset) names a dataset, which must be an entry of the datasets section: only then
    does a prepare stage keep its data current (a prepared folder left from a removed entry never changes)."""
    datasets = params.get("datasets")
    if isinstance(datasets, dict) and name in datasets:
        return
    have = ", ".join(sorted(map(str, datasets))) if isinstance(datasets, dict) and datasets else "none"
    raise UserError(f"{source}: {key} = {printable(repr(name))} is not an entry of the datasets section (it has: "
                    f"{have}); add it with `python -m pipeline add-dataset {printable(str(name))} <path>`")


def section(params: dict[str, Any], name: str, cls: type[T], source: str = PARAMS_FILE) -> T:
    """Validate params[name] against the dataclass `cls`."""
    if name not in params:
        raise UserError(f"{source}: missing section '{name}'")
    return from_dict(cls, params[name], name, source)


def from_dict(cls: type[T], raw: Any, where: str, source: str = PARAMS_FILE) -> T:
    """Build dataclass `cls` from `raw`, validating every key; `where` is the dotted key path for messages."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where} = {raw!r} has the wrong type (allowed: a mapping)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be ints or None too
    if unknown:
        raise UserError(f"{source}: unknown key '{key_path(where, unknown[0])}' (allowed: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name not in raw:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise UserError(f"{source}: missing key '{key}'")
            continue
        if type(raw[name]) is int and not INT_MIN <= raw[name] <= INT_MAX:  # a field's own bounds are tighter
            _check_range({"min": f.metadata.get("min"), "max": f.metadata.get("max")}, raw[name], key, source)
        value = _coerce(hints[name], raw[name], key, source)
        _check_range(f.metadata, value, key, source)
        _check_kind(f.metadata.get("kind"), value, key, source)
        values[name] = value
    return cls(**values)


def key_path(where: str, key: Any) -> str:
    """`where.key` for messages; a user's key keeps to one line (a quoted YAML key may hold a newline)."""
    return f"{where}.{printable(str(key))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _wrong(tp: Any, value: Any, key: str, source: str) -> UserError:
    return UserError(f"{source}: {key} = {value!r} has the wrong type (allowed: {_type_name(tp)})")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: report X's own, more precise error
            return _coerce(options[0], value, key, source)
        for arg in options:
            try:
                return _coerce(arg, value, key, source)
            except UserError:
                continue
        raise _wrong(tp, value, key, source)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {key} = {value!r} is not allowed (allowed: {_type_name(tp)})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _wrong(tp, value, key, source)
        items = [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(tp, value, key, source)
        return {str(k): _coerce(args[1], v, key_path(key, k), source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(tp, value, key, source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(tp, value, key, source)
        if not INT_MIN <= value <= INT_MAX:
            raise UserError(f"{source}: {key} = {value!r} is out of range (allowed: "
                            f"{f'<= {INT_MAX}' if value > 0 else f'>= {INT_MIN}'})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(tp, value, key, source)
        try:
            number = float(value)
        except OverflowError:  # an int beyond every float (10**309 written out)
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan / .inf slip past every range check
            raise UserError(f"{source}: {key} = {value!r} is not allowed (allowed: a finite number)")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(tp, value, key, source)
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_range(meta: Any, value: Any, key: str, source: str) -> None:
    if value is None or isinstance(value, (list, dict, tuple)) or dataclasses.is_dataclass(value):
        return
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{source}: {key} = {value!r} is not allowed (allowed: {', '.join(map(repr, choices))})")
    if lo is not None and value < lo:
        raise UserError(f"{source}: {key} = {value!r} is out of range (allowed: >= {lo}"
                        + (f" and <= {hi})" if hi is not None else ")"))
    if hi is not None and value > hi:
        raise UserError(f"{source}: {key} = {value!r} is out of range (allowed: <= {hi}"
                        + (f" and >= {lo})" if lo is not None else ")"))


# The folder outputs must stay in: set by the orchestration while it validates; otherwise the folder of the params
# file being read (a stage's own command line), else the working directory.
PROJECT_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("tokenmill_project_root", default=None)


def check_out_path(value: str, key: str, source: str) -> None:
    """Outputs stay inside the project: a path that resolves inside it, without `..`, not into the code, .git
    or .dvc, and not the project folder itself."""
    root = PROJECT_ROOT.get() or (Path(source).parent if Path(source).is_file() else Path.cwd())
    root = root.resolve()
    target = (root / value).resolve() if value else root
    rel = target.relative_to(root).parts if target.is_relative_to(root) else None
    if not value or value.strip() != value or ".." in Path(value).parts or not rel or rel[0] in RESERVED_TOPS:
        raise UserError(f"{source}: {key} = {value!r} is not allowed (allowed: a path inside the project {root}, "
                        f"e.g. data/..., without '..' and outside {', '.join(sorted(RESERVED_TOPS))})")


def check_name(value: str, key: str, source: str) -> None:
    if not NAME_RE.match(value):
        raise UserError(f"{source}: {key} = {value!r} is not allowed (allowed: letters, digits, _ and -, "
                        f"not starting with -)")


def check_dataset_name(name: Any, source: str) -> None:
    """A key under `datasets:` names folders and DVC stages (prepare@<name>): letters, digits and _ only."""
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or not name.isascii():
        raise UserError(f"{source}: dataset name {name!r} is not allowed (allowed: letters, digits and _)")


def _check_kind(kind: str | None, value: Any, key: str, source: str) -> None:
    if kind is None or value is None:
        return
    if kind == "out_path":
        check_out_path(value, key, source)
    elif kind == "name":
        check_name(value, key, source)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ('a.b.c', parsed YAML value); the same syntax as `dvc exp run -S`."""
    # a newline would split the error naming the override, and YAML would fold it into the value ('5\nx' -> '5 x')
    if not text.isprintable():
        raise UserError(f"override {text!r}: a key or value may not hold a control character or line break")
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of params with dotted-key overrides applied (new keys are created)."""
    import copy
    out = copy.deepcopy(params)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def asdict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (for manifests and metrics)."""
    return dataclasses.asdict(cfg)


def set_params_file(path: str | Path, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides to params.yaml in place, keeping its comments and order."""
    from ruamel.yaml import YAML

    from pipeline.atomic import atomic_path

    yaml_rt = YAML()  # round-trip mode: comments survive
    # ruamel writes None as an empty value (`key:`); params.yaml spells it `null`, so a diff shows only the change
    yaml_rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null",
                                                                                        "null"))
    path = Path(path)
    doc = yaml_rt.load(read_params_text(path))
    for text in overrides:
        key, value = parse_override(text)
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            yaml_rt.dump(doc, fh)
