"""Training-time augmentation defences: cutout, mixup and cutmix (batched tensor ops).

They weaken shortcut features by occluding or blending images while the classifier trains;
each is a LossFn for the training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from raypurify.config import Config
from raypurify.defenses.base import Defense
from raypurify.runtime import autocast

if TYPE_CHECKING:
    from raypurify.training.config import TrainConfig
    from raypurify.training.epoch import LossContext, LossFn


class CutoutOptions(Config):
    size: int = Field(16, ge=1)  # side of the zeroed square, pixels (DeVries & Taylor)


class MixOptions(Config):
    alpha: float = Field(1.0, gt=0)  # Beta(alpha, alpha) mixing weights


def _logits(model: torch.nn.Module, x: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    with autocast(x.device, ctx.amp):
        return model(x).float()


def cutout_mask(n: int, h: int, w: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(N, 1, H, W) masks, 0 inside a size x size square centred at a random pixel (rows
    cy - size // 2 up to, not including, cy - size // 2 + size, as DeVries & Taylor's code;
    clipped at the edges)."""
    cy = torch.randint(0, h, (n, 1, 1), generator=gen)
    cx = torch.randint(0, w, (n, 1, 1), generator=gen)
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    dy, dx, half = ys - cy, xs - cx, size // 2
    inside = (dy >= -half) & (dy < size - half) & (dx >= -half) & (dx < size - half)
    return (~inside).float()[:, None]


def cutout_loss(options: CutoutOptions, train_cfg: TrainConfig) -> LossFn:
    smoothing = train_cfg.optim.label_smoothing

    def loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = cutout_mask(len(x), x.shape[2], x.shape[3], options.size, ctx.gen).to(x.device)
        logits = _logits(model, x * mask, ctx)
        return F.cross_entropy(logits, y, label_smoothing=smoothing), logits

    return loss


def _mix_weight(alpha: float, gen: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), drawn reproducibly from the loss context's generator."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup_loss(options: MixOptions, train_cfg: TrainConfig) -> LossFn:
    smoothing = train_cfg.optim.label_smoothing

    def loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = _mix_weight(options.alpha, ctx.gen)
        perm = torch.randperm(len(x), generator=ctx.gen).to(x.device)
        logits = _logits(model, lam * x + (1 - lam) * x[perm], ctx)
        ce = lam * F.cross_entropy(logits, y, label_smoothing=smoothing)
        ce = ce + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=smoothing)
        return ce, logits

    return loss


def cutmix_loss(options: MixOptions, train_cfg: TrainConfig) -> LossFn:
    smoothing = train_cfg.optim.label_smoothing

    def loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = _mix_weight(options.alpha, ctx.gen)
        n, _, h, w = x.shape
        bh, bw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        top = int(torch.randint(0, h - bh + 1, (1,), generator=ctx.gen))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=ctx.gen))
        perm = torch.randperm(n, generator=ctx.gen).to(x.device)
        mixed = x.clone()
        mixed[:, :, top : top + bh, left : left + bw] = x[perm, :, top : top + bh, left : left + bw]
        lam = 1 - (bh * bw) / (h * w)  # the pasted area decides the label weights
        logits = _logits(model, mixed, ctx)
        ce = lam * F.cross_entropy(logits, y, label_smoothing=smoothing)
        ce = ce + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=smoothing)
        return ce, logits

    return loss


CUTOUT = Defense(
    "cutout",
    "cutout: zero a random 16x16 square per image",
    "train",
    CutoutOptions,
    loss=cutout_loss,
)
MIXUP = Defense(
    "mixup", "mixup: train on convex mixtures of image pairs", "train", MixOptions, loss=mixup_loss
)
CUTMIX = Defense(
    "cutmix",
    "cutmix: paste a box from another image, mix labels by area",
    "train",
    MixOptions,
    loss=cutmix_loss,
)
