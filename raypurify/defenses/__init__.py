"""Defences by name. Adding one: a module with a `Defense` entry and a line in DEFENSES."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from raypurify import config
from raypurify.defenses import adversarial, mixing, purifiers, squeeze, ueraser
from raypurify.defenses.base import Defense
from raypurify.registry import Registry

if TYPE_CHECKING:
    from raypurify.training.config import TrainConfig
    from raypurify.training.epoch import LossFn

NONE = Defense("none", "no defence: the undefended baseline", "none")

DEFENSES = Registry(
    "defense",
    [
        NONE,
        squeeze.JPEG,
        squeeze.GRAYSCALE,
        squeeze.BDR,
        squeeze.ISS,
        mixing.CUTOUT,
        mixing.MIXUP,
        mixing.CUTMIX,
        adversarial.ADVERSARIAL,
        ueraser.UERASER,
        purifiers.VAE,
        purifiers.DVAE,
    ],
)


def options(
    name: str,
    raw: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    *,
    key: str = "defense",
) -> tuple[Defense, Any]:  # Any: the options model depends on the defence
    """The defence `name` and its validated options (errors quote `key`)."""
    defense = DEFENSES.get(name, key=f"{key}.name")
    return defense, config.load(defense.options, raw or {}, overrides, source=f"{key}.options")


def training_loss(train_cfg: TrainConfig) -> LossFn:
    """The classifier's LossFn: the training-time defence's, or plain cross-entropy."""
    from raypurify.training.epoch import cross_entropy

    defense, opts = options(train_cfg.defense.name, train_cfg.defense.options)
    if defense.kind == "train":
        # Every training-time defence has a loss.
        return cast("Callable[..., LossFn]", defense.loss)(opts, train_cfg)
    return cross_entropy(train_cfg.optim.label_smoothing)
