"""UEraser (Qin et al. 2023): heavy augmentation with adversarial (max-loss) repeats.

Each image gets plasma-fractal brightness and contrast noise, a random channel shuffle
(p = 0.5) and TrivialAugmentWide. For the first `repeat_epochs` epochs every image is
augmented `repeats` times and the loss is the per-image maximum over the copies, which is
what stops the classifier from latching onto a perturbation that one augmentation keeps.
The plasma noise here is fractal noise from summed upsampled octaves, the same kind of
smooth random field as kornia's diamond-square plasma, without the kornia dependency.
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
    from raypurify.training.config import TrainConfig
    from raypurify.training.epoch import LossContext, LossFn


class UEraserOptions(Config):
    repeats: int = Field(5, ge=1)  # augmented copies per image while repeating
    repeat_epochs: int = Field(50, ge=0)  # epochs with max-over-copies loss (then 1 copy)
    roughness: tuple[float, float] = (0.3, 0.7)
    brightness: tuple[float, float] = (0.5, 1.0)  # plasma brightness intensity


def plasma(n: int, h: int, w: int, roughness: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, 1, H, W) fractal noise in [0, 1]; higher roughness keeps more fine detail."""
    field = torch.zeros(n, 1, h, w)
    amp = torch.ones(n, 1, 1, 1)
    size = 2
    while size <= max(h, w):
        octave = torch.rand(n, 1, size, size, generator=gen)
        field += amp * F.interpolate(octave, size=(h, w), mode="bilinear", align_corners=False)
        amp = amp * roughness.view(n, 1, 1, 1)
        size *= 2
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    return (field - lo) / (hi - lo).clamp_min(1e-6)


def augment(x: torch.Tensor, options: UEraserOptions, gen: torch.Generator) -> torch.Tensor:
    """One UEraser augmentation of a float (N, C, H, W) batch in [0, 1]."""
    n, c, h, w = x.shape

    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    bright = plasma(n, h, w, uniform(options.roughness), gen) - 0.5
    x = x + uniform(options.brightness).view(n, 1, 1, 1) * bright
    contrast = plasma(n, h, w, uniform(options.roughness), gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * (0.5 + contrast) + mean).clamp(0, 1)
    if c > 1:
        perms = torch.stack([torch.randperm(c, generator=gen) for _ in range(n)])
        shuffle = torch.rand(n, generator=gen) < 0.5
        perms[~shuffle] = torch.arange(c)
        x = torch.gather(x, 1, perms.view(n, c, 1, 1).expand(n, c, h, w))
    # Imported here: torchvision pulls in torch._dynamo (seconds), which every Ray worker
    # that imports the defence registry would otherwise pay.
    from torchvision.transforms import v2

    trivial = v2.TrivialAugmentWide()
    x8 = (x * 255).round().to(torch.uint8)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng():  # TrivialAugment draws from the global RNG
        torch.manual_seed(seed)
        x8 = torch.stack([trivial(img) for img in x8])
    return x8.float() / 255.0


def ueraser_loss(options: UEraserOptions, train_cfg: TrainConfig) -> LossFn:
    smoothing = train_cfg.optim.label_smoothing

    def loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: LossContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        repeats = options.repeats if ctx.epoch < options.repeat_epochs else 1
        dev = x.device
        copies = torch.cat([augment(x.cpu().float(), options, ctx.gen) for _ in range(repeats)])
        copies = copies.to(dev).contiguous(memory_format=torch.channels_last)
        with autocast(dev, ctx.amp):
            logits = model(copies).float()
        per_image = F.cross_entropy(
            logits, y.repeat(repeats), reduction="none", label_smoothing=smoothing
        )
        worst = per_image.view(repeats, len(y)).max(dim=0).values
        return worst.mean(), logits[: len(y)]

    return loss


UERASER = Defense(
    "ueraser",
    "UEraser: plasma, channel shuffle, TrivialAugment, max-loss repeats",
    "train",
    UEraserOptions,
    loss=ueraser_loss,
)
