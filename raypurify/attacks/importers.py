"""Importers: released poisons made elsewhere, lined up with our copy of the clean data.

Poisons of the expensive attacks (TAP, SEP, REM, NTGA) are downloaded rather than made here.
Each importer reads one published format, checks it against a base dataset (shapes, value
ranges, labels) and returns the base with the poisoned pixels in place. Row r of a released
file is the image whose `index` is r in the base, which is the row number of the source split
(torchvision order for CIFAR), so a class-balanced subset of the base picks its rows out of the
full file. Formats:

- perturbation: additive tensors (.pt read with weights_only, or .npy), sample-wise N x C x h x w
  or class-wise K x C x h x w, in [-1, 1] or in grey levels; a patch smaller than the image is
  placed at its centre. Huang et al.'s released EM noise has this form.
- png: a folder of `<row>.png` files, e.g. `data/<row>.png` (Fowl et al., APBench) or
  `train/<class>/<row>.png` (an ImageFolder export, whose class folders are checked).
- npz: a numpy dump with keys data/targets (AVATAR) or x/y: NHWC uint8, or floats in [0, 1].
- ntga: NTGA's released arrays, float NHWC in [0, 1] with one-hot or integer labels: a folder
  holding x_*.npy and y_*.npy, or the two paths.

Every error is one line naming the file. The poisoned column marks the rows that changed.
The readers of the formats are in released_formats.py; here are their registry, the budget
an imported poison is held to and the import itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from raypurify import config
from raypurify.attacks.base import Norm, log_poisoning, measure_budget
from raypurify.attacks.released_formats import (
    ImportConfig,
    PerturbationImportConfig,
    ScaledImportConfig,
    read_npz,
    read_ntga,
    read_perturbation,
    read_png_folder,
)
from raypurify.data.imageset import ImageSet
from raypurify.errors import DatasetError
from raypurify.registry import Registry
from raypurify.tracking import Run

Reader = Callable[[list[Path], ImageSet, Any], np.ndarray]


@dataclass(frozen=True)
class Importer:
    """One entry of the importer registry: `read(paths, base, cfg)` returns the base's images
    with the imported poison in place, uint8 (N, H, W, C) in the base's row order."""

    name: str
    description: str
    config: type[ImportConfig]
    read: Reader


IMPORTERS = Registry(
    "importer",
    [
        Importer(
            "perturbation",
            "additive .pt/.npy perturbations",
            PerturbationImportConfig,
            read_perturbation,
        ),
        Importer("png", "folder of <row>.png poisoned images", ImportConfig, read_png_folder),
        Importer("npz", "numpy dump with data/targets or x/y", ScaledImportConfig, read_npz),
        Importer("ntga", "NTGA's released x_*.npy / y_*.npy arrays", ScaledImportConfig, read_ntga),
    ],
)


# ---------------------------------------------------------------------------------------
# The driver


def configure_import(
    fmt: str, settings: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()
) -> tuple[Importer, ImportConfig]:
    importer = IMPORTERS.get(fmt, key="format")
    return importer, config.load(importer.config, settings, overrides, source=f"import {fmt}")


# l_inf 8/255, l2 1.0, l0 one pixel
PROTOCOL_BUDGETS: dict[Norm, float] = {"linf": 8 / 255, "l2": 1.0, "l0": 1.0}


def budget_check(budget: Mapping[str, float], attack: str | None) -> dict[str, Any]:
    """The protocol budget an imported poison is held to, and whether it fits.

    A poison naming a registered attack (`--set attack=em`) is held to that attack's
    default budget in its norm; any other to the protocol's: it fits when it is within
    l_inf 8/255, l2 1.0 per image or l0 one pixel.
    """
    from raypurify.attacks import ATTACKS
    from raypurify.attacks.base import within_budget

    if attack and attack in ATTACKS.names():
        entry = ATTACKS.get(attack)
        limits = {entry.norm: entry.config().limit()}
    else:
        limits = PROTOCOL_BUDGETS
    fits = [norm for norm, limit in limits.items() if within_budget(norm, limit, budget)]
    return {"limits": limits, "within": bool(fits), "fits": fits}


def describe_over(check: Mapping[str, Any], budget: Mapping[str, float]) -> str:
    measured = {"linf": budget["linf"], "l2": budget["l2_max"], "l0": budget["l0_max"]}
    return ", ".join(
        f"{norm} {measured[norm]:.4g} > {limit:.4g}" for norm, limit in check["limits"].items()
    )


def held_to_budget(
    budget: Mapping[str, float], attack: str | None, where: Path, allowed: bool, how: str
) -> dict[str, Any]:
    """`budget_check`, as one line naming the file when the poison is over its budget and
    that was not `allowed` (`how` says how to allow it)."""
    from raypurify.errors import RaypurifyError

    check = budget_check(budget, attack)
    if not check["within"] and not allowed:
        raise RaypurifyError(
            f"{where}: poison over the protocol budget ({describe_over(check, budget)}); {how}"
        )
    return check


def content_digest(paths: Iterable[str | Path]) -> str:
    """sha256 over what the paths hold: each file's bytes, a folder's files by relative
    name, so a released poison is known by its content wherever it lies."""
    from raypurify.data.manifest import file_sha256

    h = hashlib.sha256()
    for p in map(Path, paths):
        if not p.exists():
            raise DatasetError(f"{p}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f"{f.relative_to(p) if p.is_dir() else ''}:{file_sha256(f)};".encode())
        h.update(b"|")
    return h.hexdigest()


def import_poison(
    base: ImageSet,
    fmt: str,
    paths: Iterable[str | Path],
    overrides: Iterable[str] = (),
    run: Run | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
) -> tuple[ImageSet, dict[str, float]]:
    """The base with a released poison in place (poisoned = changed rows) and its budget,
    logged to `run` like a generated poison."""
    importer, cfg = configure_import(fmt, settings, overrides)
    paths = [Path(p) for p in paths]
    images = importer.read(cast(list[Path], paths), base, cfg)  # Paths, one line up
    changed = (images != base.images).reshape(len(base), -1).any(axis=1)
    poisoned, budget = base.replace(images, poisoned=changed), measure_budget(base.images, images)
    if run is not None:
        params = {"format": importer.name, "from": [str(p) for p in paths], **cfg.to_dict()}
        log_poisoning(run, params, base, poisoned, budget)
    return poisoned, budget
