"""Image-squeezing defences applied to the training set: JPEG, grayscale, bit-depth
reduction, and ISS (Liu et al. 2023: grayscale or JPEG, whichever suits the poison).

Each is a batch transform of uint8 NHWC images; compression removes the small
perturbations that unlearnable examples rely on, at some cost in clean accuracy.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from raypurify.config import Config
from raypurify.defenses.base import Defense, NoOptions

# ITU-R 601-2 luma, the weights of PIL's convert("L") and torchvision's Grayscale.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class JpegOptions(Config):
    quality: int = Field(10, ge=1, le=95)


class BdrOptions(Config):
    bits: int = Field(2, ge=1, le=7)


class IssOptions(Config):
    mode: Literal["gray", "jpeg"] = "jpeg"
    quality: int = Field(10, ge=1, le=95)


def jpeg(images: np.ndarray, options: JpegOptions) -> np.ndarray:
    """Re-encode every image as JPEG at `quality` and decode it again."""
    out = np.empty_like(images)
    mode = "L" if images.shape[-1] == 1 else "RGB"
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode).save(
            buf, format="JPEG", quality=options.quality
        )
        decoded = np.asarray(Image.open(buf).convert(mode))
        out[i] = decoded[..., None] if mode == "L" else decoded
    return out


def grayscale(images: np.ndarray, options: NoOptions | None = None) -> np.ndarray:
    """Luma replicated over the channels (the classifier still sees 3 channels)."""
    if images.shape[-1] == 1:
        return images.copy()
    luma = np.round(images.astype(np.float32) @ LUMA)
    return np.repeat(np.clip(luma, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def bit_depth(images: np.ndarray, options: BdrOptions) -> np.ndarray:
    """Quantise each channel to 2**bits evenly spaced levels spanning [0, 255] (rounding)."""
    levels = 2**options.bits - 1
    q = np.round(images.astype(np.float32) * levels / 255.0)
    return np.round(q * 255.0 / levels).astype(np.uint8)


def iss(images: np.ndarray, options: IssOptions) -> np.ndarray:
    if options.mode == "gray":
        return grayscale(images)
    return jpeg(images, JpegOptions(quality=options.quality))


JPEG = Defense(
    "jpeg",
    "JPEG re-compression of the training set (quality 10)",
    "transform",
    JpegOptions,
    transform=jpeg,
)
GRAYSCALE = Defense(
    "grayscale", "grayscale training set (luma on 3 channels)", "transform", transform=grayscale
)
BDR = Defense(
    "bdr",
    "bit-depth reduction to 2**bits levels (2 bits)",
    "transform",
    BdrOptions,
    transform=bit_depth,
)
ISS = Defense(
    "iss",
    "image shortcut squeezing: grayscale or JPEG-10 (mode)",
    "transform",
    IssOptions,
    transform=iss,
)
