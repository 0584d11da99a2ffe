"""ImageSet: a small dataset held in memory as uint8 NHWC arrays.

This is the in-process form of the interchange format (see `interchange.py`): attacks,
defences and classifiers on small data work on it directly; large data streams through
Ray Data instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raypurify.errors import DatasetError


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64, in [0, len(classes))
    index: np.ndarray  # (N,) int64, stable id of the source image
    classes: list[str]
    poisoned: np.ndarray | None = None  # (N,) bool, rows an attack changed
    name: str = field(default="dataset", compare=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        if self.poisoned is not None:
            self.poisoned = np.asarray(self.poisoned, dtype=bool)
        check_arrays(self.images, self.labels, self.index, len(self.classes), self.name)
        if self.poisoned is not None and self.poisoned.shape != self.labels.shape:
            raise DatasetError(
                f"{self.name}: poisoned has {len(self.poisoned)} rows, not {len(self)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every image."""
        return tuple(self.images.shape[1:])

    def take(self, rows: np.ndarray) -> ImageSet:
        """The rows `rows` (positions, not `index` ids), as a new ImageSet."""
        return ImageSet(
            images=self.images[rows],
            labels=self.labels[rows],
            index=self.index[rows],
            classes=list(self.classes),
            poisoned=None if self.poisoned is None else self.poisoned[rows],
            name=self.name,
        )

    def replace(self, images: np.ndarray, **changes: Any) -> ImageSet:
        """Same rows, new pixels (and optionally a `poisoned` column)."""
        return ImageSet(
            images=images,
            labels=self.labels,
            index=self.index,
            classes=list(self.classes),
            poisoned=changes.get("poisoned", self.poisoned),
            name=changes.get("name", self.name),
        )

    def balanced_subset(self, n: int, seed: int = 0) -> ImageSet:
        return self.take(balanced_rows(self.labels, n, self.num_classes, seed, self.name))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def check_arrays(images: Any, labels: Any, index: Any, num_classes: int, name: str) -> None:
    """Raise a one-line DatasetError unless the arrays form a valid dataset."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = getattr(images, "dtype", type(images).__name__), getattr(images, "shape", None)
        raise DatasetError(f"{name}: images must be a uint8 (N, H, W, C) array, got {got}")
    if images.shape[-1] not in (1, 3):
        raise DatasetError(f"{name}: images must have 1 or 3 channels, got {images.shape[-1]}")
    n = len(images)
    if n == 0:
        raise DatasetError(f"{name}: dataset is empty (0 rows)")
    if labels.shape != (n,) or index.shape != (n,):
        raise DatasetError(f"{name}: {n} images but labels {labels.shape} and index {index.shape}")
    if num_classes < 1:
        raise DatasetError(f"{name}: no class names")
    if (r := first_bad_label(labels, num_classes)) is not None:
        raise DatasetError(
            f"{name}: row {r} (index {int(index[r])}): label {int(labels[r])} "
            f"outside [0, {num_classes})"
        )
    check_unique(name, index)


def first_bad_label(labels: np.ndarray, num_classes: int) -> int | None:
    """The position of the first label outside [0, num_classes), if any."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    return int(bad[0]) if len(bad) else None


def check_unique(where: object, index: np.ndarray) -> None:
    """Refuse a row index that appears more than once (naming `where`: a file or dataset)."""
    uniq, counts = np.unique(index, return_counts=True)
    if len(uniq) != len(index):
        raise DatasetError(f"{where}: index {int(uniq[counts > 1][0])} appears more than once")


def balanced_rows(labels: np.ndarray, n: int, num_classes: int, seed: int, name: str) -> np.ndarray:
    """Positions of a class-balanced random subset of size n (sorted, reproducible).

    Each class gets n // K rows; the first n % K classes get one more.
    """
    if n <= 0:
        raise DatasetError(f"{name}: subset size must be positive, got {n}")
    rng = np.random.default_rng(seed)
    per_class = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        rows = np.flatnonzero(labels == c)
        if len(rows) < k:
            raise DatasetError(
                f"{name}: subset of {n} needs {k} images of class {c}, only {len(rows)} exist"
            )
        chosen.append(rng.permutation(rows)[:k])
    return np.sort(np.concatenate(chosen))
