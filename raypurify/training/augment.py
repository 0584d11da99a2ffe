"""Batched augmentation on uint8 tensors (no per-image PIL work).

The standard CIFAR augmentation, random crop with 4-pixel zero padding and horizontal
flip, as whole-batch tensor ops driven by an explicit torch.Generator so every epoch's
augmentation is reproducible (and identical after a resume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Crop each (N, C, H, W) image at a random offset from its zero-padded copy."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    return random_flip(random_crop(x, pad, gen), gen)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) to float in [0, 1], channels_last (the layout fast conv kernels want)."""
    return (x.float() / 255.0).contiguous(memory_format=torch.channels_last)
