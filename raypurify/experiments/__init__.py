"""Experiments: a whole attack x defence table from one spec (a shipped preset or a YAML)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raypurify import config
from raypurify.experiments.spec import ExperimentSpec

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_spec(name_or_path: str, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """A shipped preset by name, or a YAML file, with `--set` overrides; validated."""
    path = config.named_or_file(name_or_path, presets(), "preset")
    return config.load(ExperimentSpec, path, overrides).with_paths_from(path.resolve().parent)
