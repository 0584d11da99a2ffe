"""DatasetSpec: which data to load (a registry name or a dataset directory, plus options)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import NonNegativeInt, PositiveInt

from raypurify.config import Config
from raypurify.data.imageset import ImageSet

if TYPE_CHECKING:
    import ray.data


class DatasetSpec(Config):
    """A dataset by name, e.g. ``{name: cifar10, split: train, subset: 10000, seed: 0}``."""

    name: str
    split: Literal["train", "test"] = "train"
    path: str | None = None  # explicit location: dataset dir, ImageFolder root, torchvision root
    subset: PositiveInt | None = None  # class-balanced subset of this many rows
    seed: NonNegativeInt = 0  # picks the subset (and synthetic images)
    size: PositiveInt | None = None  # resize images to size x size (folder sources)
    classes: PositiveInt | None = None  # how many classes (synthetic, imagenet-subset)
    rows: PositiveInt | None = None  # rows per split (synthetic)


@dataclass(frozen=True)
class Stream:
    """A dataset as a Ray Dataset of decoded rows (image HWC uint8, label, index), with its
    class names and image shape."""

    ds: ray.data.Dataset
    classes: list[str]
    shape: tuple[int, int, int]
    rows: int | None = None  # when known without executing the pipeline
    name: str = "stream"


@dataclass(frozen=True)
class Source:
    """One entry of the dataset registry.

    `load` returns the split in memory, honouring `spec.subset`; `stream`, where present,
    yields decoded rows through Ray Data for data too large for memory.
    """

    name: str
    description: str
    load: Callable[[DatasetSpec], ImageSet]
    stream: Callable[[DatasetSpec], Stream] | None = None
    # Finds the split without decoding it (raises the error `load` would), so a missing
    # dataset stops a run before Ray starts; None: `load` itself is cheap.
    check: Callable[[DatasetSpec], None] | None = None


def subset_of(data: ImageSet, spec: DatasetSpec) -> ImageSet:
    """Apply the spec's class-balanced subset, if any, to an in-memory split."""
    return data.balanced_subset(spec.subset, spec.seed) if spec.subset else data
