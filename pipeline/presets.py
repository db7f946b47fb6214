"""A run's settings: a preset (a file under the project's configs/) and `key.path=value` overrides.

Shared by the CLI and the Prefect flow, and free of Prefect: the CLI resolves and validates a run's settings
before it imports Prefect (which reads its settings, PREFECT_API_URL among them, when first imported).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.runs import preset_overrides


def resolve_overrides(root: Path, preset: str | None, overrides: list[str] | None) -> list[str]:
    """The preset's settings (a file under the project's configs/), then the explicit overrides: the second win."""
    if not preset:
        return list(overrides or [])
    configs = (root / "configs").resolve()
    path = (root / preset).resolve()
    if not path.is_relative_to(configs) or path.suffix not in (".yaml", ".yml"):
        raise UserError(f"preset {preset}: must be a .yaml file under {configs}")
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in configs.glob("*.yaml"))) or "none here"
        raise UserError(f"preset {preset}: file not found (presets live in configs/: {have})")
    return preset_overrides(path) + list(overrides or [])
