"""`synthetic`: procedural images with class structure, for tests (no files, no network).

Each class owns a smooth random colour template; an image is its class template, randomly
shifted and scaled in brightness, plus smooth and pixel noise. A small CNN separates the
classes within a few epochs, yet no single pixel gives the label away.
"""

from __future__ import annotations

import numpy as np

from raypurify.data.imageset import ImageSet
from raypurify.data.spec import DatasetSpec, Source, subset_of

DEFAULT_ROWS = {"train": 1000, "test": 500}


def _smooth(rng: np.random.Generator, n: int, size: int, grid: int) -> np.ndarray:
    """n random (3, size, size) fields in [-1, 1], bilinearly upsampled from grid x grid."""
    # Imported here: the dataset registry (and so every CLI command, `--help` too) imports
    # this module, and torch takes a second or more to import.
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 3, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()


def generate(num_classes: int, rows: int, size: int, seed: int, split: str) -> ImageSet:
    templates = _smooth(np.random.default_rng(1234), num_classes, size, grid=4)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = np.arange(rows) % num_classes
    rng.shuffle(labels)
    shifts = rng.integers(-size // 8, size // 8 + 1, size=(rows, 2))
    base = np.stack(
        [np.roll(templates[y], tuple(s), axis=(1, 2)) for y, s in zip(labels, shifts, strict=True)]
    )
    gain = rng.uniform(0.6, 1.0, (rows, 1, 1, 1))
    x = 0.5 + 0.35 * gain * base + 0.12 * _smooth(rng, rows, size, grid=8)
    x += rng.normal(0, 0.03, x.shape)
    images = np.clip(np.round(x * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    classes = [f"class{k}" for k in range(num_classes)]
    return ImageSet(images, labels, np.arange(rows), classes, name=f"synthetic/{split}")


def load(spec: DatasetSpec) -> ImageSet:
    rows = spec.rows or DEFAULT_ROWS[spec.split]
    data = generate(spec.classes or 10, rows, spec.size or 32, spec.seed, spec.split)
    return subset_of(data, spec)


SOURCE = Source(
    "synthetic", "procedural class-structured images (options: classes, rows, size)", load
)
