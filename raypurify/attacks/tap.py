"""TAP, targeted adversarial poisoning (Fowl et al., NeurIPS 2021).

A surrogate is trained on the clean set with the project's classifier trainer (Ray Train);
then every image is pushed by targeted PGD towards the class (y + shift) mod K, with a random
crop/flip at every step (the authors' differentiable augmentation) and `restarts` random
starts (see `targeted.py`). Adversarial features of the wrong class become the shortcut a
victim learns. The authors use 250 steps and 8 restarts on a 40-epoch ResNet-18 (the
defaults); the CPU protocol passes fewer. `objective=untargeted` is the authors' other
recipe (PGD away from each image's own label), which APBench's copy of their code runs by
default and their released CIFAR-10 poison was made with; `shift` is then unused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.attacks.targeted import PGD, Objective, craft
from raypurify.runtime import Precision
from raypurify.storage import scratch

if TYPE_CHECKING:
    from raypurify.training.config import TrainConfig


class TAPConfig(EpsConfig):
    added_fields = frozenset({"objective"})

    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound, [0, 1] units")
    steps: PositiveInt = 250
    restarts: PositiveInt = 8
    step_size: float | None = Field(None, gt=0, description="default: eps * max(0.05, 2.5/steps)")
    shift: PositiveInt = Field(1, description="target class (y + shift) mod K")
    objective: Objective = "targeted"
    augment: bool = True
    surrogate_recipe: str = "paper"  # trained on the clean set with this classifier recipe
    surrogate_overrides: list[str] = Field(default_factory=lambda: ["epochs=40"])
    batch_size: PositiveInt = 256
    actors: PositiveInt = 1
    precision: Precision = "auto"


def train_surrogate(
    job: AttackJob, recipe_name: str, overrides: list[str], seed: int, out: Path
) -> tuple[TrainConfig, dict[str, Any]]:
    """A classifier trained on the clean set (Ray Train); returns (its config, the metrics)."""
    from raypurify.training.classifier import train_classifier
    from raypurify.training.config import recipe

    train_cfg = recipe(recipe_name, [*overrides, f"seed={seed}"])
    check = job.clean.take(np.arange(min(len(job.clean), 1000)))  # a progress readout only
    metrics = train_classifier(job.clean, check, train_cfg, out, run=None)
    if job.run is not None:
        job.run.log_metrics({"surrogate_train_acc": metrics["accuracy"]})
    return train_cfg, metrics


def generate(job: AttackJob, cfg: TAPConfig) -> np.ndarray:
    from raypurify.runtime import init_ray
    from raypurify.training.classifier import MODEL_FILE

    init_ray()
    with scratch() as tmp:
        train_cfg, _ = train_surrogate(
            job, cfg.surrogate_recipe, cfg.surrogate_overrides, cfg.seed, Path(tmp)
        )
        weights = torch.load(Path(tmp) / MODEL_FILE, map_location="cpu", weights_only=True)
    pgd = PGD(
        eps=cfg.eps,
        steps=cfg.steps,
        restarts=cfg.restarts,
        shift=cfg.shift,
        step_size=cfg.step_size or cfg.eps * max(0.05, 2.5 / cfg.steps),
        augment=cfg.augment,
        precision=cfg.precision,
        seed=cfg.seed,
        objective=cfg.objective,
    )
    delta = craft(
        job.rows,
        [weights],
        train_cfg.arch,
        train_cfg.arch_options,
        job.clean.num_classes,
        pgd,
        batch_size=cfg.batch_size,
        actors=cfg.actors,
        desc="TAP crafting",
    )
    return perturb(job.rows.images, lambda rows: delta[rows], "linf", cfg.eps, job.device)


ATTACK = Attack(
    name="tap",
    description="targeted adversarial poisoning (Fowl et al. 2021), l_inf 8/255",
    norm="linf",
    config=TAPConfig,
    generate=generate,
)
