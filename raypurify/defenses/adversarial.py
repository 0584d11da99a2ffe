"""Adversarial training (Madry et al. 2018) as a defence against unlearnable examples.

Training on PGD adversarial examples of radius at least the poison's budget makes the
error-minimising shortcut useless (which is why REM exists). The attack runs with the
model in eval mode so its batches do not disturb BatchNorm statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from raypurify.config import Config
from raypurify.defenses.base import Defense
from raypurify.runtime import autocast

if TYPE_CHECKING:
    from torch import nn

    from raypurify.training.config import TrainConfig
    from raypurify.training.epoch import LossContext, LossFn


class AdversarialOptions(Config):
    eps: float = Field(8 / 255, gt=0)  # l_inf radius, in [0, 1] pixel units
    step_size: float = Field(2 / 255, gt=0)
    steps: int = Field(10, ge=1)
    random_start: bool = True


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    options: AdversarialOptions,
    gen: torch.Generator,
    amp: bool,
) -> torch.Tensor:
    """Untargeted l_inf PGD: maximise the loss within eps of x, staying in [0, 1]."""
    delta = torch.zeros_like(x)
    if options.random_start:
        noise = torch.rand(x.shape, generator=gen).to(x.device)
        delta = (2 * noise - 1) * options.eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(options.steps):
        delta.requires_grad_(True)
        with autocast(x.device, amp):
            loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + options.step_size * grad.sign()).clamp(-options.eps, options.eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def adversarial_loss(options: AdversarialOptions, train_cfg: TrainConfig) -> LossFn:
    smoothing = train_cfg.optim.label_smoothing

    def loss(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        x_adv = pgd(model, x, y, options, ctx.gen, ctx.amp)
        model.train()
        with autocast(x.device, ctx.amp):
            logits = model(x_adv).float()
        return F.cross_entropy(logits, y, label_smoothing=smoothing), logits

    return loss


ADVERSARIAL = Defense(
    "adversarial",
    "adversarial training, PGD l_inf 8/255, 10 steps of 2/255",
    "train",
    AdversarialOptions,
    loss=adversarial_loss,
)
