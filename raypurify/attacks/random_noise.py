"""Uniform random noise in an l_inf ball: the weak reference every real attack should beat.

Sample-wise noise (a fresh pattern per image, the default) is the "random noise" baseline of
Huang et al. and barely lowers test accuracy. Class-wise noise (one pattern per class) is
already a shortcut a network can latch onto. Noise is drawn on the CPU from the seed, so a
seed gives the same poison on any device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb

if TYPE_CHECKING:
    import numpy as np


class RandomNoiseConfig(EpsConfig):
    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound in [0, 1] pixel units")
    granularity: Literal["sample", "class"] = "sample"


def generate(job: AttackJob, cfg: RandomNoiseConfig) -> np.ndarray:
    shape = job.rows.shape
    gen = torch.Generator().manual_seed(cfg.seed)

    def uniform(n: int) -> torch.Tensor:
        return (torch.rand((n, *shape), generator=gen) * 2 - 1) * cfg.eps

    if cfg.granularity == "class":
        patterns = uniform(job.clean.num_classes)
        labels = torch.from_numpy(job.rows.labels)

        def delta_for(rows: slice) -> torch.Tensor:
            return patterns[labels[rows]]

    else:

        def delta_for(rows: slice) -> torch.Tensor:
            return uniform(rows.stop - rows.start)

    return perturb(job.rows.images, delta_for, "linf", cfg.eps, job.device)


ATTACK = Attack(
    name="random-noise",
    description="uniform l_inf noise, sample-wise or class-wise (weak reference, 8/255)",
    norm="linf",
    config=RandomNoiseConfig,
    generate=generate,
)
