"""OPS, the one-pixel shortcut (Wu et al., ICLR 2023): one pixel per class, so l0 = 1.

For class c, every pair (location p, saturated colour k) is scored by how far and how
consistently the colour sits from the class's own pixels there, over all class-c images of
the clean set and all channels:

    score(p, k) = mean |k - x_c[p]| / std |k - x_c[p]|

(the original `pixel_search`). The best pair not already taken by an earlier class is
written into every class-c image. Because each channel of k is 0 or 1, |k - x| is x or 1 - x,
so the mean and std of every pair follow from two per-location moments of each channel:
a few array operations per class instead of a loop over 1024 locations x 8 colours.
"""

from __future__ import annotations

import itertools

import numpy as np

from raypurify.attacks.base import Attack, AttackConfig, AttackJob
from raypurify.data.imageset import ImageSet


class OPSConfig(AttackConfig):
    """OPS has no size knob: one pixel per image, set to a saturated colour."""

    def limit(self) -> float:
        return 1.0


def corner_colours(channels: int) -> np.ndarray:
    """The 2^C saturated colours, (2^C, C) in {0, 1}, in the original order (000, 001, ...)."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=channels)))


def pair_scores(images: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(colours, H*W) scores mean/std of |colour - pixel| over images and channels."""
    x = images.reshape(len(images), -1, images.shape[-1])
    m1 = x.mean(axis=0, dtype=np.float64) / 255  # (HW, C): E[x]
    m2 = np.square(x, dtype=np.float32).mean(axis=0, dtype=np.float64) / 255**2  # E[x^2]
    zero = colours[:, None, :] == 0  # (K, 1, C): where |k - x| = x, else 1 - x
    first = np.where(zero, m1, 1 - m1).mean(axis=-1)  # (K, HW)
    second = np.where(zero, m2, 1 - 2 * m1 + m2).mean(axis=-1)
    std = np.sqrt(np.maximum(second - first**2, 0))
    return first / np.maximum(std, 1e-12)  # a constant gap (std 0) is the best shortcut


def pixel_search(clean: ImageSet) -> dict[int, tuple[int, int, int]]:
    """For every class present: (row, column, colour index) of its shortcut pixel."""
    colours = corner_colours(clean.shape[2])
    width = clean.shape[1]
    taken = np.zeros((len(colours), clean.shape[0] * width), dtype=bool)
    pixels = {}
    for c in range(clean.num_classes):
        members = clean.images[clean.labels == c]
        if len(members) == 0:
            continue
        scores = np.where(taken, -np.inf, pair_scores(members, colours))
        k, p = np.unravel_index(int(np.argmax(scores)), scores.shape)
        taken[k, p] = True
        pixels[c] = (int(p // width), int(p % width), int(k))
    return pixels


def generate(job: AttackJob, cfg: OPSConfig) -> np.ndarray:
    pixels = pixel_search(job.clean)
    colours = (corner_colours(job.rows.shape[2]) * 255).astype(np.uint8)
    out = job.rows.images.copy()
    for c, (r, col, k) in pixels.items():
        out[job.rows.labels == c, r, col, :] = colours[k]
    if job.run is not None:
        table = {
            job.clean.classes[c]: {"row": r, "col": col, "colour": colours[k].tolist()}
            for c, (r, col, k) in pixels.items()
        }
        job.run.log_dict(table, "ops_pixels.json")
    return out


ATTACK = Attack(
    name="ops",
    description="one-pixel shortcut: one searched pixel and saturated colour per class (l0 = 1)",
    norm="l0",
    config=OPSConfig,
    generate=generate,
)
