"""The learned purifiers as defences: D-VAE (two stages) and the plain VAE (Eq. 3).

Their options name a purification preset plus `--set`-style overrides, so a table column
can say `{name: dvae, options: {preset: cpu}}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from raypurify.config import Config
from raypurify.defenses.base import Defense

if TYPE_CHECKING:
    from raypurify.tracking import Run


class DvaeOptions(Config):
    preset: str = "cpu"
    overrides: list[str] = Field(default_factory=list)


class VaeOptions(Config):
    preset: str = "vae-cpu"
    overrides: list[str] = Field(default_factory=list)


def purify_with(
    options: DvaeOptions | VaeOptions,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    run: Run | None = None,
) -> dict:
    """Run the preset's purification; returns its summary (`output` is the purified set)."""
    from raypurify.defenses.dvae.config import preset
    from raypurify.defenses.dvae.pipeline import purify

    return purify(data_dir, out_dir, preset(options.preset, options.overrides), run=run)


def check(options: DvaeOptions | VaeOptions) -> None:
    """Validate the preset and overrides without running anything."""
    from raypurify.defenses.dvae.config import preset

    preset(options.preset, options.overrides)


DVAE = Defense(
    "dvae",
    "D-VAE: two-stage disentangling purification (Yu et al. 2024)",
    "purify",
    DvaeOptions,
    purify=purify_with,
)
VAE = Defense(
    "vae",
    "plain rate-constrained VAE reconstruction (Eq. 3), one stage",
    "purify",
    VaeOptions,
    purify=purify_with,
)
