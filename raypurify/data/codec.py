"""Image bytes <-> uint8 pixels.

We store PNG (lossless: pixel values survive a round trip exactly) and accept JPEG on read
(the offline CIFAR-10 copy is JPEG). Decoding checks each image against the dataset's
declared shape so a mixed-shape dataset fails with the file and row that broke it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import cast

import numpy as np
from PIL import Image

from raypurify.errors import DatasetError

_MODES = {1: "L", 3: "RGB"}


def encode_png(image: np.ndarray) -> bytes:
    """One HWC uint8 image to PNG bytes (deterministic for the same pixels)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, _MODES[image.shape[-1]])
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_batch(images: np.ndarray) -> list[bytes]:
    return [encode_png(img) for img in images]


def decode_image(blob: bytes, channels: int = 3) -> np.ndarray:
    """PNG or JPEG bytes to an HWC uint8 array with `channels` channels."""
    with Image.open(io.BytesIO(blob)) as pil:
        if pil.format not in ("PNG", "JPEG"):
            raise ValueError(f"format {pil.format} is neither PNG nor JPEG")
        arr = np.asarray(pil.convert(_MODES[channels]))
    return arr[..., None] if channels == 1 else arr


def decode_batch(
    blobs: Sequence[bytes],
    shape: tuple[int, int, int] | None,
    *,
    where: str | Sequence[str] | np.ndarray,
    ids: Sequence[int] | np.ndarray,
    numbered: bool = True,
) -> np.ndarray:
    """Decode a column of image bytes to (N, H, W, C), naming the file and row on failure.

    `shape` is (H, W, C) as declared by the dataset; None takes the first image's shape.
    `where` names the file (or each row's file); `ids` is the `index` column. When the rows
    are a whole file in order (`numbered`), errors also give the row number within it.
    """
    channels = shape[2] if shape else 3
    out = None
    for i, blob in enumerate(blobs):
        file = where if isinstance(where, str) else where[i]
        row = f"row {i} (index {int(ids[i])})" if numbered else f"row with index {int(ids[i])}"
        if blob is None:
            raise DatasetError(f"{file}: {row}: image is missing")
        try:
            img = decode_image(blob, channels)
        except Exception as e:
            raise DatasetError(f"{file}: {row}: undecodable image bytes ({e})") from None
        if out is None:
            shape = shape or img.shape
            out = np.empty((len(blobs), *shape), dtype=np.uint8)
        # Set from the first image by now when the dataset declared none.
        shape = cast(tuple[int, int, int], shape)
        if img.shape != tuple(shape):
            got = "x".join(map(str, img.shape))
            want = "x".join(map(str, shape))
            raise DatasetError(f"{file}: {row}: image is {got}, the dataset's images are {want}")
        out[i] = img
    if out is None:
        return np.empty((0, *(shape or (0, 0, channels))), dtype=np.uint8)
    return out
