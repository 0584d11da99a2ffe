"""AR, autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022).

Class c owns a 3-channel AR process: per channel a 3x3 causal kernel whose bottom-right
coefficient is 0 and whose coefficients sum to 1. A perturbation starts as N(0, 1) noise of
(H+4) x (W+4), each pixel after the first two rows and columns is replaced, in raster order,
by the kernel-weighted sum of the 8 pixels above and to its left; the first 4 rows and
columns are cropped, and the result is scaled to l2 = eps. The process's matching filter
(its kernel with -1 at the centre) answers its own signals with exactly 0 and other classes'
with large values, so a network can read the class off the perturbation.

Images are the last axis of the working array, so every raster step is one batched multiply-add
over all images and channels (1156 steps at 32 px), not a per-image Python loop.

Coefficients come from the original's random search, made fast by scoring a pool of
candidates at once: a candidate kernel is kept when TRIALS signals from it stay finite with a
raw norm <= max_norm (it does not diverge), and a set of K is built greedily so that every
chosen filter responds with at least min_response (sum of ReLU of its filter output) to the
last trial signal of every process chosen after it, the original's acceptance rule; the order
picks, among candidates that pass all filters chosen so far, the one whose filter passes the
most remaining candidates. The search is seeded and cached per (classes, seed, ...).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.errors import ConfigError

CROP = 4  # rows and columns of warm-up cut from the start of every signal
SEARCH_SIZE = 32  # side of the signals the coefficient search scores (the original's)
TRIALS = 3  # signals per candidate checked for divergence
DRAW = 4096  # candidates drawn per round of the search
TAPS = [(r, c) for r in range(3) for c in range(3) if (r, c) != (2, 2)]


class ARConfig(EpsConfig):
    eps: float = Field(1.0, gt=0, description="l2 norm of every perturbation, [0, 1] units")
    process_seed: int = Field(0, ge=0, description="seeds the coefficient search (which processes)")
    min_response: NonNegativeFloat = Field(10.0, description="least non-matching response")
    max_norm: PositiveFloat = Field(50.0, description="largest raw signal norm (divergence)")
    max_candidates: PositiveInt = Field(2**17, description="kernels the search may draw")


def sweep(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Run AR processes in place: x (S_h, S_w, N) noise, kernels (3, 3, N), one per column."""
    for i in range(x.shape[0] - 2):
        for j in range(x.shape[1] - 2):
            out = x[i + 2, j + 2]
            torch.mul(x[i, j], kernels[0, 0], out=out)
            for r, c in TAPS[1:]:
                out.addcmul_(x[i + r, j + c], kernels[r, c])
    return x


def ar_signals(
    kernels: torch.Tensor, height: int, width: int, gen: torch.Generator, dev: torch.device
) -> torch.Tensor:
    """(n, height, width, C) unscaled signals, one per kernel set in `kernels` (n, C, 3, 3).

    The noise is drawn on the CPU from `gen` (same seed, same signals on any device)."""
    n, channels = kernels.shape[:2]
    x = torch.randn((height + CROP, width + CROP, n * channels), generator=gen).to(dev)
    sweep(x, kernels.permute(2, 3, 0, 1).reshape(3, 3, -1).to(dev))
    return x[CROP:, CROP:].reshape(height, width, n, channels).permute(2, 0, 1, 3)


def matching_filters(kernels: torch.Tensor) -> torch.Tensor:
    """Each process's filter: its kernel with -1 at the centre, so it sums to 0 and answers
    its own (noise-free) signals with 0."""
    filters = kernels.clone()
    filters[..., 2, 2] = -1
    return filters


def responses(filters: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
    """(len(signals), len(filters)) sum of ReLU of each filter over each NHWC signal."""
    outputs_per_signal = max(1, len(filters)) * signals.shape[1] * signals.shape[2]
    chunk = max(1, 2**24 // outputs_per_signal)  # bounds the conv output to 64 MB
    out = [
        F.relu(F.conv2d(signals[i : i + chunk].permute(0, 3, 1, 2), filters)).sum((-1, -2))
        for i in range(0, len(signals), chunk)
    ]
    return torch.cat(out) if out else torch.empty(0, len(filters))


def stable_candidates(
    channels: int, max_norm: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw DRAW random kernels and keep those whose TRIALS signals all stay bounded.

    Returns the kernels (m, C, 3, 3) and each one's last signal scaled to unit l2
    (m, size, size, C), the signal the original scores responses on."""
    kernels = torch.randn((DRAW, channels, 3, 3), generator=gen)
    kernels[..., 2, 2] = 0
    kernels /= kernels.sum((-1, -2), keepdim=True)
    cpu = torch.device("cpu")
    for _ in range(TRIALS):  # most kernels diverge on the first trial, so later ones are cheap
        signals = ar_signals(kernels, SEARCH_SIZE, SEARCH_SIZE, gen, cpu)
        norms = signals.flatten(1).norm(dim=1)
        keep = torch.isfinite(norms) & (norms <= max_norm)
        kernels, signals, norms = kernels[keep], signals[keep], norms[keep]
    return kernels, signals / norms.view(-1, 1, 1, 1)


def greedy_order(passes: np.ndarray, k: int) -> list[int]:
    """Up to k candidates such that each chosen filter passes all later ones.

    passes[i, j]: candidate j's filter responds enough to candidate i's signal."""
    alive = np.ones(len(passes), dtype=bool)
    chosen: list[int] = []
    while len(chosen) < k and alive.any():
        reach = np.where(alive, passes[alive].sum(0), -1)
        j = int(np.argmax(reach))
        chosen.append(j)
        alive &= passes[:, j]
        alive[j] = False
    return chosen


@functools.lru_cache(maxsize=16)
def coefficients(
    num_classes: int,
    seed: int,
    channels: int = 3,
    min_response: float = 10.0,
    max_norm: float = 50.0,
    max_candidates: int = 2**17,
) -> torch.Tensor:
    """(num_classes, channels, 3, 3) AR kernels from the seeded search (cached; read only)."""
    gen = torch.Generator().manual_seed(seed)
    kernels = torch.empty(0, channels, 3, 3)
    signals = torch.empty(0, SEARCH_SIZE, SEARCH_SIZE, channels)
    passes = np.zeros((0, 0), dtype=bool)
    for _ in range(0, max_candidates, DRAW):
        new_k, new_s = stable_candidates(channels, max_norm, gen)
        old_by_new = responses(matching_filters(new_k), signals) >= min_response
        kernels, signals = torch.cat([kernels, new_k]), torch.cat([signals, new_s])
        new_by_all = responses(matching_filters(kernels), new_s) >= min_response
        passes = np.concatenate([np.hstack([passes, old_by_new.numpy()]), new_by_all.numpy()])
        np.fill_diagonal(passes, False)  # a process does not count against itself
        chosen = greedy_order(passes, num_classes)
        if len(chosen) == num_classes:
            return kernels[chosen]
    raise ConfigError(
        f"ar: found fewer than {num_classes} processes with min_response={min_response} in "
        f"{max_candidates} candidates; lower min_response or raise max_candidates"
    )


def generate(job: AttackJob, cfg: ARConfig) -> np.ndarray:
    h, w, channels = job.rows.shape
    kernels = coefficients(
        job.clean.num_classes,
        cfg.process_seed,
        channels,
        cfg.min_response,
        cfg.max_norm,
        cfg.max_candidates,
    )
    if job.run is not None:
        job.run.log_dict({"coefficients": kernels.tolist()}, "ar_coefficients.json")
    labels = torch.from_numpy(job.rows.labels)
    gen = torch.Generator().manual_seed(cfg.seed)

    def delta_for(rows: slice) -> torch.Tensor:
        x = ar_signals(kernels[labels[rows]], h, w, gen, job.device)
        norms = x.flatten(1).norm(dim=1)
        if not torch.isfinite(norms).all():  # kept at 32 px, a process may still blow up
            raise ConfigError(
                f"ar: a class's process diverges on {h}x{w} images; try another process_seed"
            )
        return x * (cfg.eps / norms).view(-1, 1, 1, 1)

    return perturb(job.rows.images, delta_for, "l2", cfg.eps, job.device)


ATTACK = Attack(
    name="ar",
    description="class-wise autoregressive processes, sample-wise signals (l2 = 1.0)",
    norm="l2",
    config=ARConfig,
    generate=generate,
)
