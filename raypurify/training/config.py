"""Classifier training configs and the recipes (`paper`, `cpu`) as presets.

A recipe fixes everything about how a classifier is trained, so every cell of an
attack x defence table is trained the same way; only the data changes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from raypurify import config
from raypurify.config import Config
from raypurify.errors import ConfigError
from raypurify.runtime import Precision


class OptimConfig(Config):
    lr: float = Field(0.1, gt=0)  # peak learning rate of SGD
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)  # at most a quarter of the run (epoch.lr_factor)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)


class DefenseRef(Config):
    """A defence by name with its options (validated by the defence's own config)."""

    name: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Config):
    arch: str = "resnet18"
    arch_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {width: 32}
    epochs: PositiveInt = 60
    batch_size: PositiveInt = 128  # global batch, split across workers
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: bool = True  # random crop (pad 4) + horizontal flip
    precision: Precision = "auto"  # bf16 autocast where it is faster (runtime.use_bf16)
    workers: PositiveInt = 1  # Ray Train workers (DDP)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPU when the cluster has one
    threads: PositiveInt | None = None  # torch threads per CPU worker (default: cores/workers)
    data_path: Literal["auto", "memory", "ray_data"] = "auto"  # how batches reach workers
    eval_subset: PositiveInt | None = None  # test rows evaluated each epoch (all at the end)
    tta: bool = False  # average logits with the mirrored image at test time
    keep_checkpoints: PositiveInt | None = 2  # epoch checkpoints kept (None: all, for SEP)
    seed: NonNegativeInt = 0
    defense: DefenseRef = Field(default_factory=DefenseRef)


RECIPES: dict[str, dict[str, Any]] = {
    # The paper's protocol (Yu et al. 2024, Tables 2-9): CIFAR ResNet-18, SGD 0.1,
    # momentum 0.9, weight decay 5e-4, cosine over 60 epochs, batch 128, crop + flip.
    "paper": {
        "arch": "resnet18",
        "epochs": 60,
        "batch_size": 128,
        "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"},
    },
    # The CPU protocol's fixed recipe (docs/cpu-protocol.md, with how it was chosen on
    # held-out CIFAR-10 training images, never on the test set): ResNet-9 width 24, 14
    # epochs of 10k images (a run under 5 minutes on 2 cores), label smoothing 0.2, linear
    # decay after a 2-epoch warm-up, and a 2,000-image test subset per epoch (all of it at
    # the end).
    "cpu": {
        "arch": "fast-resnet",
        "arch_options": {"width": 24},
        "epochs": 14,
        "batch_size": 256,
        "optim": {
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "schedule": "linear",
            "warmup_epochs": 2,
            "label_smoothing": 0.2,
        },
        "eval_subset": 2000,
    },
}


def recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The named recipe as a TrainConfig, with `--set` overrides applied."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return config.load(TrainConfig, RECIPES[name], overrides)
