"""What a defence is: a transform of the training set before training, a change to how the
classifier computes its loss during training, or a learned purifier (VAE, D-VAE).

- `transform` defences (JPEG, grayscale, BDR, ISS) map a uint8 NHWC batch to a uint8 batch;
  applied once to the whole training set, they write a new dataset.
- `train` defences (cutout, mixup, cutmix, adversarial training, UEraser) give a LossFn for
  the classifier's training loop.
- `purify` defences train a model on the poisoned set and write the purified set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raypurify.config import Config


class NoOptions(Config):
    """For defences without options."""


@dataclass(frozen=True)
class Defense:
    name: str
    description: str
    kind: Literal["none", "transform", "train", "purify"]
    options: type[Config] = NoOptions
    transform: Callable[[np.ndarray, Any], np.ndarray] | None = None  # (images, options)
    loss: Callable[..., Any] | None = None  # (options, train_cfg) -> LossFn
    purify: Callable[..., Any] | None = None  # (input_dir, out_dir, options, ...) -> info
