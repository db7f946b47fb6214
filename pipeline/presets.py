"""A run's settings: a preset (a file under the project's configs/) and `key.path=value` overrides.

Shared by the CLI and the Prefect flow, and free of Prefect: the CLI resolves and validates a run's settings
before it imports Prefect (which reads its settings, PREFECT_API_URL among them, when first imported).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import apply_overrides, load_params, printable
from pipeline.errors import UserError
from pipeline.run_checks import preset_overrides

SUFFIXES = (".yaml", ".yml")


def resolve_overrides(root: Path, preset: str | None, overrides: list[str] | None) -> list[str]:
    """The preset's settings (a file under the project's configs/), then the explicit overrides: the second win."""
    overrides = list(overrides or [])
    if not preset:
        return overrides
    configs = (root / "configs").resolve()
    path = (root / preset).resolve()
    said = f"preset {printable(preset)}"
    if not path.is_relative_to(configs) or path.suffix not in SUFFIXES:
        raise UserError(f"{said}: must be a .yaml file under {configs}{did_you_mean(root, preset)}")
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in configs.glob("*") if p.suffix in SUFFIXES)) or "none here"
        raise UserError(f"{said}: file not found (presets live in configs/: {have}){did_you_mean(root, preset)}")
    return preset_overrides(path) + overrides


def did_you_mean(root: Path, preset: str) -> str:
    """`--preset openclipart`, `openclipart.yml` or `openclipart.yaml` from another folder: the preset of that name
    under the project's configs/, if there is one."""
    guess = Path(root) / "configs" / f"{Path(preset).stem}.yaml"
    return f"; did you mean configs/{guess.name}?" if guess.is_file() else ""


def unread_note(root: Path, combined: list[str], explicit: list[str] | None) -> str | None:
    """For a validated run: `-S train_transformer.gan.x=...` with kind ar or maskgit is valid, but no code reads it;
    train_transformer still re-runs (its params section changed) and trains the same model. A note says so."""
    unread = [t for t in explicit or [] if t.startswith("train_transformer.gan.")]
    if not unread:
        return None
    kind = (apply_overrides(load_params(root / "params.yaml"), combined).get("train_transformer") or {}).get("kind")
    if kind == "gan":
        return None
    return (f"note: {unread[0].split('=')[0]}: train_transformer.gan.* is read only with kind gan (this run's kind "
            f"is {kind}): train_transformer re-runs for it and trains the same model")
