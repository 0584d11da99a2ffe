"""The ways of forming P3 that bench/p3_passes.py compares with the pipeline's x_hat(x2):
averaged over pixel phases, decoded from a latent that is rounded, dead-zoned or sampled,
or with the input's large values put back (issue 17; docs/RESULTS.md has what each did)."""

from __future__ import annotations

from collections.abc import Callable

import in_process as ip
import numpy as np
import torch

from raypurify.defenses.dvae.model import DVAE


def phase_average(model: DVAE, x: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Mean of x_hat over the stride-2 encoder's four pixel phases (1-pixel rolls, undone
    after reconstruction) and a horizontal flip. Image content is (nearly) equivariant to
    these; a perturbation that the encoder keeps through its alignment with the grid is
    not, so averaging should cancel more of it than of the image."""
    total = torch.zeros_like(x)
    for flip in (False, True):
        for dy in (0, 1):
            for dx in (0, 1):
                xs = torch.roll(x.flip(3) if flip else x, (dy, dx), (2, 3))
                out = torch.roll(ip.apply(model, xs, labels, ip.reconstruct), (-dy, -dx), (2, 3))
                total += out.flip(3) if flip else out
    return total / 8


LatentMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (mu, posterior std) -> z


def from_latent(z_of: LatentMap) -> Callable[[DVAE, torch.Tensor, torch.Tensor], torch.Tensor]:
    """x_hat decoded from z = z_of(mu, posterior std) instead of z = mu."""

    def fn(model: DVAE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encode(x)
        return model.reconstruct(z_of(mu.float(), torch.exp(0.5 * logvar.float()))).float()

    return fn


def quantized(step: float) -> LatentMap:
    """mu rounded to a grid of `step` posterior standard deviations, per latent value: a
    locally constant map, as JPEG's quantiser is, so a perturbation that moves mu by less
    than the grid leaves the output unchanged."""
    return lambda mu, std: torch.round(mu / (step * std)) * (step * std)


def dead_zoned(width: float) -> LatentMap:
    """mu with every value within `width` posterior standard deviations of the prior's mean
    set to it (zero), the rest left as they are: JPEG's dead zone without its grid, so a
    perturbation that moves a small value stays unseen while large values pass exactly."""
    return lambda mu, std: torch.where(mu.abs() < width * std, torch.zeros_like(mu), mu)


class PosteriorSample:
    """z drawn from the posterior, mu + std * eps, as the authors purify (the pipeline's
    `sample: true`): whether latent noise in P3 breaks an adversarial poison's shortcut
    even where it leaves the poison's linear share as it was. `reset()` before each set of
    rows, so a row and its clean original (same order, same batches) get the same eps."""

    def __init__(self, seed: int):
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return mu + std * torch.randn(mu.shape, generator=self.gen).to(mu.device)


def restored(x_hat: torch.Tensor, x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """x_hat with the input's own values put back wherever the reconstruction misses them by
    at least `threshold` (per value): a rate-capped x_hat loses small perturbations and the
    image's large details alike, and a poison's budget bounds its size per value (8/255 in
    l_inf), so the large misses might be image alone (on TAP they are not: it sits at the
    image's details)."""
    residual = x2 - x_hat
    return x_hat + residual * (residual.abs() >= threshold)
