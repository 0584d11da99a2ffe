"""The training and evaluation steps, in plain PyTorch (the Ray Train loop is `loop.py`).

A training-time defence changes how a batch's loss is computed (mixup mixes, adversarial
training attacks first, UEraser augments heavily), so the loop takes a `LossFn`; the
undefended loss is plain cross-entropy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raypurify.runtime import autocast
from raypurify.training.augment import crop_flip, to_input


@dataclass
class LossContext:
    """What a LossFn may need beyond the batch: where training is, and a seeded generator."""

    epoch: int
    epochs: int
    gen: torch.Generator
    amp: bool


Schedule = Literal["cosine", "linear", "constant"]
LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, LossContext], tuple[torch.Tensor, torch.Tensor]
]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(x.device, ctx.amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits

    return loss


def lr_schedule(
    optimizer: torch.optim.Optimizer, schedule: Schedule, total: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate over `total` optimizer steps, per step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(schedule, s, total, warmup)
    )


def lr_factor(schedule: Schedule, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at `step` of `total` (linear warm-up first).

    The warm-up takes at most a quarter of the run: a short run of a recipe (the `cpu`
    recipe's 2 warm-up epochs at `--set epochs=2`) would otherwise end at its peak rate
    and never decay, and be judged on its noisiest weights.
    """
    warmup = min(warmup, total // 4)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    return 1.0  # constant


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    ctx: LossContext,
    *,
    augment: bool = True,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One pass over `batches` of uint8 (N, C, H, W) images; returns mean loss/accuracy."""
    model.train()
    correct: float  # Tensor.item() is typed int | float
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for x8, y in batches:
        if augment:
            x8 = crop_flip(x8, ctx.gen)
        x = to_input(x8)
        loss, logits = loss_fn(model, x, y, ctx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        n = len(y)
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "train_images_per_s": seen / max(seconds, 1e-9),
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    amp: bool = True,
    tta: bool = False,
) -> torch.Tensor:
    """Logits for uint8 (N, C, H, W) images; with `tta`, averaged with the mirrored image."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size].to(dev, non_blocking=True))
        with autocast(dev, amp):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(3)).float())
        out.append(logits.cpu())
    return torch.cat(out)


def accuracy_breakdown(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 accuracy (a fraction), per-class accuracy and the confusion matrix."""
    pred = logits.argmax(1).numpy()
    true = labels.cpu().numpy()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {
        "accuracy": float((pred == true).mean()),
        "per_class": [float(a) for a in per_class],
        "confusion": confusion.tolist(),
    }
