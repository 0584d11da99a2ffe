"""SEP, self-ensemble protection (Chen et al., ICLR 2023).

Train one surrogate normally and keep a checkpoint of every epoch; take `checkpoints`
evenly spaced ones and craft targeted PGD towards (y + 5) mod K against their ensemble
(the mean of their losses), 30 steps of 1/255. The checkpoints of one training run see the
data at different stages, so their shared gradient direction is a feature any model
trained on the set picks up. The authors train 120 epochs and ensemble 15-30 checkpoints
(the defaults: several GPU-hours at full size); `steps`, `checkpoints` and the surrogate's
recipe scale the cost down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.attacks.tap import train_surrogate
from raypurify.attacks.targeted import PGD, craft
from raypurify.runtime import Precision
from raypurify.storage import scratch
from raypurify.workers import STATE_FILE, checkpoint_dirs


class SEPConfig(EpsConfig):
    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound, [0, 1] units")
    steps: PositiveInt = 30
    step_size: float = Field(1 / 255, gt=0)
    shift: PositiveInt = Field(5, description="target class (y + shift) mod K")
    checkpoints: PositiveInt = Field(15, description="evenly spaced checkpoints ensembled")
    surrogate_recipe: str = "paper"
    surrogate_overrides: list[str] = Field(default_factory=lambda: ["epochs=120"])
    batch_size: PositiveInt = 256
    actors: PositiveInt = 1
    precision: Precision = "auto"


def spaced(items: list, k: int) -> list:
    """k items evenly spaced over `items`, the last one included."""
    picks = np.linspace(0, len(items) - 1, num=min(k, len(items))).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def generate(job: AttackJob, cfg: SEPConfig) -> np.ndarray:
    from raypurify.runtime import init_ray

    init_ray()
    overrides = [*cfg.surrogate_overrides, "keep_checkpoints=null"]
    with scratch() as tmp:
        train_cfg, _ = train_surrogate(job, cfg.surrogate_recipe, overrides, cfg.seed, Path(tmp))
        dirs = spaced(checkpoint_dirs(Path(tmp) / "checkpoints", "train"), cfg.checkpoints)
        states = [
            torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)["model"] for d in dirs
        ]
    pgd = PGD(
        eps=cfg.eps,
        steps=cfg.steps,
        restarts=1,
        shift=cfg.shift,
        step_size=cfg.step_size,
        augment=False,
        precision=cfg.precision,
        seed=cfg.seed,
    )
    delta = craft(
        job.rows,
        states,
        train_cfg.arch,
        train_cfg.arch_options,
        job.clean.num_classes,
        pgd,
        batch_size=cfg.batch_size,
        actors=cfg.actors,
        desc=f"SEP crafting ({len(states)} checkpoints)",
    )
    return perturb(job.rows.images, lambda rows: delta[rows], "linf", cfg.eps, job.device)


ATTACK = Attack(
    name="sep",
    description="self-ensemble protection (Chen et al. 2023): PGD on a checkpoint ensemble",
    norm="linf",
    config=SEPConfig,
    generate=generate,
)
