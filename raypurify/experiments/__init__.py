"""Experiments: a whole attack x defence table from one spec (a shipped preset or a YAML)."""

from __future__ import annotations

from pathlib import Path

from raypurify import config
from raypurify.errors import ConfigError
from raypurify.experiments.spec import ExperimentSpec

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_spec(name_or_path: str, overrides: list[str] = ()) -> ExperimentSpec:
    """A shipped preset by name, or a YAML file, with `--set` overrides; validated."""
    path = Path(name_or_path)
    if not path.is_file():
        known = presets()
        if name_or_path not in known:
            raise ConfigError(
                f"'{name_or_path}' is neither a YAML file nor a preset "
                f"(presets: {', '.join(known)})"
            )
        path = known[name_or_path]
    return config.load(ExperimentSpec, path, overrides)
