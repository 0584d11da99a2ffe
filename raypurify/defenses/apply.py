"""Run a pre-training defence over a dataset and write the defended set.

Transform defences (JPEG, grayscale, BDR, ISS) run in Ray Data `map_batches` over the
decoded rows, so they scale from the bundled sample to ImageNet-size folders; the output
is a new dataset in the interchange format whose manifest names the defence and its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from raypurify.data.interchange import MANIFEST, DatasetInfo, open_dataset
from raypurify.data.interchange_ray import write_ray
from raypurify.data.spec import Stream
from raypurify.defenses.base import Defense
from raypurify.runtime import init_ray

if TYPE_CHECKING:
    from raypurify.config import Config


def transform_dataset(
    defense: Defense,
    options: Config,
    source: Stream,
    out: str | Path,
    *,
    parents: Iterable[Mapping[str, Any]] = (),
    overwrite: bool = False,
) -> DatasetInfo:
    """Apply `defense.transform` to every image of `source`, writing `out` atomically."""
    if defense.kind != "transform":
        raise ValueError(f"defense '{defense.name}' is not a dataset transform")
    init_ray()

    def apply(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Set for every defence of kind "transform" (checked above).
        return batch | {
            "image": cast("Callable[[np.ndarray, Any], np.ndarray]", defense.transform)(
                np.asarray(batch["image"]), options
            )
        }

    ds = source.ds.map_batches(apply, batch_format="numpy", batch_size=512)
    config = {"defense": defense.name, "options": options.to_dict()}
    return write_ray(
        ds,
        out,
        classes=source.classes,
        shape=source.shape,
        config=config,
        parents=list(parents),
        overwrite=overwrite,
    )


def reuse(out: str | Path) -> DatasetInfo | None:
    """The complete dataset already at `out` (left by an earlier run), or None."""
    return open_dataset(out) if (Path(out) / MANIFEST).exists() else None
