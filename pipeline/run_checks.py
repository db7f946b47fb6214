"""Validate first: the checks a run passes before it writes anything (orchestration: it calls every stage's `check`).

Overrides (`-S key=value`, a preset, the deployment's `overrides`) are applied to an in-memory copy of params.yaml
and the result is checked by every stage's `check` (unknown keys, types, ranges, output paths inside the project,
dataset names and paths), the stages named must exist, and a tokenize the run would reach must accept its dataset.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Collection

from pipeline.config import PROJECT_ROOT, apply_overrides, load_params, parse_override, printable
from pipeline.dvc_graph import STAGE_MODULES, pipeline_stages, select, selectable_stages, stages_in_run
from pipeline.errors import UserError
from pipeline.out_guard import WorkDir, check_outputs, planned_outputs


def check_selection(root: Path, params: dict[str, Any], overrides: list[str], targets: list[str] | None,
                    with_deps: bool = True, names: list[str] | None = None) -> None:
    """Before a run starts: a misspelt stage in `targets` is one line (`names`: DVC's stage list, if known), and so is
    a run whose tokenize@<name> would refuse its dataset."""
    if targets:
        select(selectable_stages(root, params, names), targets)
    check_tokenizable(root, params, where_overrides(root, overrides), stages_in_run(root, params, targets, with_deps))


def check_tokenizable(root: Path, params: dict[str, Any], source: str, run: Collection[str]) -> None:
    """Refuse a run whose tokenize@<name> would refuse its dataset (another resolution than the VQGAN's, channels it
    cannot take, tokenize's own rule): before anything runs, not after the stages before it ran and were undone."""
    from pipeline.config import from_dict
    from stages import prepare, tokenize

    datasets = params.get("datasets") or {}
    names = [name for stage in sorted(run) for base, _, name in [stage.partition("@")]
             if base == "tokenize" and name in datasets]
    vqgan_dir = tokenize.check(params, source).vqgan_dir if names else ""
    vqgan = _planned_vqgan(root, params, source, vqgan_dir, "train_vqgan" in run) if names else None
    if vqgan is None:
        return  # unknown until it exists: the stage checks it
    res, f, in_ch, said_by = vqgan
    for name in names:
        spec = from_dict(prepare.DatasetSpec, datasets[name], f"datasets.{name}", source)
        if why := tokenize.compat_problem(spec.resolution, spec.channels, res, f, in_ch, spec.convert_channels):
            raise UserError(f"{source}: tokenize@{name} would refuse datasets.{name} ({spec.resolution} px, "
                            f"{spec.channels} channel(s)): {why} (the VQGAN in {vqgan_dir}: {said_by}); or run "
                            f"prepare@{name} alone (pipeline run --stage prepare@{name})")


def _planned_vqgan(root: Path, params: dict[str, Any], source: str, vqgan_dir: str,
                   trains: bool) -> tuple[int | None, int, int, str] | None:
    """(training resolution, downsampling, input channels, what says so) of the VQGAN in `vqgan_dir` that tokenize
    will read: the one train_vqgan makes under `params` when the run may train it (`vqgan_dir` is its out_dir), else
    the one in the folder; None when neither is known."""
    from models.vqgan import VQGANConfig
    from pipeline.config import from_dict
    from stages import prepare, train_vqgan

    cfg = train_vqgan.check(params, source) if trains else None  # (a project may run no train_vqgan)
    if cfg is not None and os.path.normpath(vqgan_dir) == os.path.normpath(cfg.out_dir):
        spec = from_dict(prepare.DatasetSpec, params["datasets"][cfg.dataset], f"datasets.{cfg.dataset}", source)
        return spec.resolution, cfg.model.downsample, spec.channels, f"train_vqgan trains it on datasets.{cfg.dataset}"
    config = Path(root) / vqgan_dir / "config.json"
    if not config.is_file():  # absent, or a FIFO or device that reading would block on
        return None
    try:
        meta = json.loads(config.read_text())
        model = VQGANConfig(ch_mult=tuple(meta["model"]["ch_mult"]), in_channels=int(meta["model"]["in_channels"]))
        res = meta.get("resolution")
        return (None if res is None else int(res)), model.downsample, model.in_channels, f"its {config.name}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or not a tokenmill VQGAN: the stage says which


def check_params_dict(params: dict[str, Any], source: str, root: Path, outputs: bool = True) -> list[str]:
    """Validate the sections of every stage dvc.yaml runs (unknown sections too); return the dataset names.
    Output paths must lie inside `root`, and with `outputs` an existing one must be the stage's own and none may
    overlap another (pipeline/out_guard.py).
    Raises UserError."""
    known: set[str] = set()
    used = pipeline_stages(root)
    work: list[WorkDir] = []
    token = PROJECT_ROOT.set(Path(root))
    try:
        for name in STAGE_MODULES:
            mod = importlib.import_module(f"stages.{name}")
            known.update(mod.SECTIONS)
            if name in used:
                work += _work_dirs(name, mod.check(params, source))
    finally:
        PROJECT_ROOT.reset(token)
    unknown = sorted(set(params) - known, key=str)  # YAML keys may be ints or None too
    if unknown:
        raise UserError(f"{source}: unknown section '{printable(str(unknown[0]))}' "
                        f"(allowed: {', '.join(sorted(known))})")
    check_dataset_paths(params, source, root, exist=())  # `~`; existence where the run names a path (below)
    if outputs:  # an existing path DVC would delete before the stage could refuse it; overlapping outputs
        named = {k for _, _, _, keys in planned_outputs(root, params) for k in keys}  # dvc.yaml's outs
        check_outputs(root, params, source, [w for w in work if w[2] not in named])
    return list(params.get("datasets") or {})


def _work_dirs(stage: str, cfg: Any) -> list[WorkDir]:
    """(stage, path, key) of each path a stage's params say it writes (kind out_path); those dvc.yaml does not name
    as outputs are its work folders (checkpoints), which DVC never sees, so nothing else keeps them apart."""
    if not dataclasses.is_dataclass(cfg):
        return []
    return [(stage, getattr(cfg, f.name), f"{stage}.{f.name}") for f in dataclasses.fields(cfg)
            if f.metadata.get("kind") == "out_path"]


def check_dataset_paths(params: dict[str, Any], source: str, base: Path,
                        exist: Collection[str] | None = None) -> None:
    """Dataset source paths: none may start with `~` (DVC does not expand it, so it hashes a folder named `~`),
    and those of the datasets in `exist` (None: all) must exist, relative paths taken from `base`. DVC hashes the
    path before prepare could say so, and its own message names neither the key nor what to do. Only the paths a
    run sets are checked by it: a dataset folder that is absent (its outputs pulled) blocks no other stage."""
    for name, entry in (params.get("datasets") or {}).items():
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path:
            continue  # prepare's own check names a missing path key
        key = f"datasets.{printable(str(name))}.path = {printable(path)}"
        if path.startswith("~"):
            raise UserError(f"{source}: {key}: DVC does not expand '~'; write the full path "
                            f"({printable(str(Path(path).expanduser()))})")
        if Path(base).resolve().is_relative_to((Path(base) / path).resolve()):  # DVC would hash the project itself
            raise UserError(f"{source}: {key} is this project's folder or holds it; point it at the dataset's own "
                            f"folder")
        if (exist is None or name in exist) and not (Path(base) / path).exists():
            raise UserError(f"{source}: {key} does not exist (install the dataset there, or point the path at it)")


def check_params(path: Path, root: Path) -> list[str]:
    return check_params_dict(load_params(path), str(path), root)


def preset_overrides(path: str | Path) -> list[str]:
    """A preset file (configs/*.yaml) is a partial params.yaml; flatten it to `key.path=value` overrides."""
    preset = load_params(Path(path))

    def flat(node: dict, prefix: str) -> list[str]:
        out = []
        for k, v in node.items():
            key = f"{prefix}{k}"
            out += flat(v, key + ".") if isinstance(v, dict) and v else [f"{key}={json.dumps(v)}"]
        return out

    return flat(preset, "")


def where_overrides(root: Path, overrides: list[str]) -> str:
    """How an error names the params a run checks: params.yaml, and the overrides applied to it."""
    if not overrides:
        return str(root / "params.yaml")
    # a preset flattens to dozens of overrides: past three, the error's key and value say enough
    shown = ", ".join(overrides) if len(overrides) <= 3 else f"{len(overrides)} overrides"
    return f"params.yaml with {shown}"


def validate_overrides(root: Path, overrides: list[str]) -> dict[str, Any]:
    """Check the params that `overrides` would give, without writing anything; UserError names the key."""
    for text in overrides:
        if not isinstance(text, str):
            raise UserError(f"override {text!r} must be a string key.path=value")
        key, _ = parse_override(text)
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override {text!r}: the key must look like section.key (got {key!r})")
    params = apply_overrides(load_params(root / "params.yaml"), overrides)
    where = where_overrides(root, overrides)
    check_params_dict(params, where, root)
    # the dataset paths this run sets must exist (a whole `datasets` mapping: every one of them)
    keys = [parse_override(text)[0].split(".") for text in overrides]
    named = {k[1] for k in keys if k[0] == "datasets" and len(k) > 1}
    check_dataset_paths(params, where, root, exist=None if ["datasets"] in keys else named)
    return params
