"""Image grids for `datasets show`, MLflow artifacts and the paper-style figures."""

from __future__ import annotations

import numpy as np


def grid(images: np.ndarray, ncol: int = 8, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one RGB uint8 image, `ncol` per row."""
    n, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = img
    return out


def class_rows(
    labels: np.ndarray, num_classes: int, per_class: int, max_classes: int = 10
) -> np.ndarray:
    """Positions of up to `per_class` examples for each of the first classes, class by class."""
    rows: list[int] = []
    for c in range(min(num_classes, max_classes)):
        rows.extend(np.flatnonzero(labels == c)[:per_class])
    return np.asarray(rows, dtype=np.int64)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1], NCHW or NHWC, to uint8 NHWC by rounding."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def amplify(delta: np.ndarray) -> np.ndarray:
    """A signed perturbation rescaled per image to fill [0, 1] (0 maps to mid-grey)."""
    d = np.asarray(delta, dtype=np.float32)
    axes = tuple(range(1, d.ndim))
    peak = np.abs(d).max(axis=axes, keepdims=True)
    return 0.5 + 0.5 * d / np.maximum(peak, 1e-12)
