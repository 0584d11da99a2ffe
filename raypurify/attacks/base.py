"""What an attack is, and everything around its generator: rows, budget, quantisation, logging.

An attack is one module holding `ATTACK = Attack(...)`: a name, the norm its budget is in, a
config class (a subclass of `AttackConfig`, so `ratio` and `seed` are always there) and a
`generate(job, cfg)` function that turns the clean rows `job.rows` into poisoned uint8 images.
`poison` does the rest the same way for every attack: it validates the config, picks a
class-balanced fraction of rows, calls the generator, and measures the budget on the uint8
result, the only form that is ever trained on. A generator that breaks its own budget is a
bug, so `poison` raises rather than writing an over-budget poison.

Generators that build a float perturbation hand it to `perturb`, which adds it chunk by chunk
on the run-time device and quantises with the bound kept exact (`quantise`). A surrogate-based
attack (EM, TAP, ...) is one more module of the same shape: its generator trains on
`job.clean`, computes on `job.device`, logs progress to `job.run`, and ends with
``perturb(job.rows.images, delta_for, "linf", cfg.eps, job.device)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from raypurify import config
from raypurify.config import Config
from raypurify.data.imageset import ImageSet
from raypurify.errors import ConfigError
from raypurify.reports.images import amplify, class_rows, grid, to_uint8
from raypurify.runtime import device
from raypurify.tracking import Run

Norm = Literal["linf", "l2", "l0"]
CHUNK_VALUES = 2**25  # pixel values handled at once: 128 MB per float copy (10,922 CIFAR rows)
PROBES = 9  # l2: scales tried per over-budget image (a safe one, then 8 bisections)
GRID_PER_CLASS = 8


class AttackConfig(Config):
    """Settings every attack has: how much of each class to poison, and the seed."""

    ratio: float = Field(1.0, gt=0, le=1, description="fraction of each class to poison")
    seed: int = Field(0, ge=0, description="picks the rows and seeds the attack's own randomness")

    def limit(self) -> float:
        """The budget in the attack's norm: [0, 1] pixel units (l_inf, l2) or pixels (l0)."""
        raise NotImplementedError(f"{type(self).__name__} must define limit()")


class EpsConfig(AttackConfig):
    """An attack bounded by `eps` in its norm (subclasses give the default)."""

    eps: float = Field(gt=0, description="budget in [0, 1] pixel units")

    def limit(self) -> float:
        return self.eps


@dataclass(frozen=True)
class AttackJob:
    """What a generator gets besides its config."""

    rows: ImageSet  # the clean rows to poison, in order; the output matches them row by row
    clean: ImageSet  # the whole clean set: class statistics (OPS), surrogate training (EM...)
    device: torch.device  # where to compute, chosen at run time
    run: Run | None = None  # where a long attack logs its progress


Generator = Callable[[AttackJob, Any], np.ndarray]


@dataclass(frozen=True)
class Attack:
    """One entry of the attack registry."""

    name: str
    description: str
    norm: Norm
    config: type[AttackConfig]
    generate: Generator  # (job, cfg) -> uint8 (n, H, W, C), the poisoned `job.rows`


# ---------------------------------------------------------------------------------------
# Rows and budgets


def select_rows(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Sorted positions of round(ratio * n_c) random rows of every class c (reproducible)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(rows)[: int(np.floor(ratio * len(rows) + 0.5))])
    return np.sort(np.concatenate(chosen))


def chunks(images: np.ndarray) -> Iterator[slice]:
    """Row ranges of `images` small enough that float copies of them stay bounded."""
    size = max(1, CHUNK_VALUES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), size):
        yield slice(start, min(start + size, len(images)))


def linf_steps(eps: float) -> int:
    """The largest whole number of grey levels k with k / 255 <= eps (the uint8 l_inf bound)."""
    k = int(np.floor(eps * 255))
    while (k + 1) / 255 <= eps:
        k += 1
    while k > 0 and k / 255 > eps:
        k -= 1
    return k


def measure_budget(clean: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """The perturbation `poisoned - clean` of uint8 images, in every norm.

    l_inf is in [0, 1] units (`linf`) and in grey levels (`linf_255`); l2 is per image in
    [0, 1] units; l0 counts changed pixel locations (any channel). Means are over the changed
    rows, so they describe the poison, not how much of the set was poisoned.
    """
    if clean.shape != poisoned.shape:
        raise ValueError(f"clean {clean.shape} and poisoned {poisoned.shape} differ in shape")
    linf, l2, l0 = 0.0, [], []
    for rows in chunks(clean):
        diff = torch.from_numpy(poisoned[rows]).float() - torch.from_numpy(clean[rows]).float()
        linf = max(linf, float(diff.abs().max()))
        l2.append(l2_norms(diff))
        l0.append((diff != 0).any(-1).flatten(1).sum(1))
    l2, l0 = torch.cat(l2).numpy(), torch.cat(l0).numpy()
    changed = l0 > 0
    return {
        "linf": linf / 255,
        "linf_255": linf,
        "l2_mean": float(l2[changed].mean()) if changed.any() else 0.0,
        "l2_max": float(l2.max()),
        "l0_mean": float(l0[changed].mean()) if changed.any() else 0.0,
        "l0_max": float(l0.max()),
        "changed_rows": float(changed.sum()),
    }


def l2_norms(diff: torch.Tensor) -> torch.Tensor:
    """Per-image l2 norm in [0, 1] units of grey-level differences, the one formula `quantise`
    and `measure_budget` share. Squares of whole grey levels are exact in float32, and so are
    their sums below 2^24; larger sums are redone in float64. No rounding error, so the bound
    is checked exactly."""
    squares = diff.float().square().flatten(1)
    sums = squares.sum(1).double()
    large = sums >= 2**24
    if large.any():
        sums[large] = squares[large].sum(1, dtype=torch.float64)
    return sums.sqrt() / 255


def within_budget(norm: Norm, limit: float, budget: Mapping[str, float]) -> bool:
    measured = {"linf": budget["linf"], "l2": budget["l2_max"], "l0": budget["l0_max"]}[norm]
    return measured <= limit


# ---------------------------------------------------------------------------------------
# Adding a float perturbation with the bound exact after rounding


def quantise(clean: torch.Tensor, delta: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """uint8 clean + delta ([0, 1] units), clipped and rounded, with `norm` <= eps exactly.

    l_inf: the rounded step is clamped to the grey levels the bound allows. l2: rounding can
    lengthen a perturbation a little (clipping only shortens it), so the images it pushes over
    the bound are redone by `shrink_to_l2`.
    """
    base = clean.float()
    step = delta.float() * 255
    if norm == "linf":
        k = linf_steps(eps)
        moved = ((base + step).clamp(0, 255).round() - base).clamp(-k, k)
        return (base + moved).to(torch.uint8)
    if norm != "l2":
        raise ValueError(f"quantise: norm {norm!r} is not linf or l2")
    out = (base + step).clamp(0, 255).round()
    over = l2_norms(out - base) > eps
    if over.any():
        out[over] = shrink_to_l2(base[over], step[over], eps)
    return out.to(torch.uint8)


def shrink_to_l2(base: torch.Tensor, step: torch.Tensor, eps: float) -> torch.Tensor:
    """round(clip(base + s * step)) for nearly the largest s in [0, 1] within l2 <= eps.

    Rounding moves each value by at most half a grey level, so the scale
    (255 eps - sqrt(d) / 2) / |step| always fits; it is probed first, then the gap up to 1 is
    bisected. The lower end only ever moves to a scale that fitted (or stays at 0, the clean
    image), so the result always fits.
    """
    shape = (-1,) + (1,) * (step.dim() - 1)

    def rounded(scale: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(base, step, scale.float().view(shape)).clamp_(0, 255).round_()

    length = step.flatten(1).norm(dim=1).double()
    low = torch.zeros_like(length)
    high = torch.ones_like(length)
    mid = ((255 * eps - 0.5 * step[0].numel() ** 0.5) / length).clamp(0, 1)
    for _ in range(PROBES):
        fits = l2_norms(rounded(mid) - base) <= eps
        low, high = torch.where(fits, mid, low), torch.where(fits, high, mid)
        mid = (low + high) / 2
    return rounded(low)


def perturb(
    images: np.ndarray,
    delta_for: Callable[[slice], torch.Tensor],
    norm: Norm,
    eps: float,
    dev: torch.device,
) -> np.ndarray:
    """Poison `images` chunk by chunk: delta_for(rows) gives the float (n, H, W, C) perturbation
    in [0, 1] units of images[rows]; the result is quantised within `eps` on `dev`."""
    out = np.empty_like(images)
    for rows in chunks(images):
        clean = torch.from_numpy(images[rows]).to(dev)
        delta = delta_for(rows).to(dev)
        if not torch.isfinite(delta).all():
            raise RuntimeError(f"perturb: non-finite perturbation for rows {rows.start}..")
        out[rows] = quantise(clean, delta, norm, eps).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------
# The driver


def configure(
    name: str, settings: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()
) -> tuple[Attack, AttackConfig]:
    """The attack called `name` and its validated config (`--set` overrides applied)."""
    from raypurify.attacks import ATTACKS  # the registry imports the attack modules

    attack = ATTACKS.get(name, key="attack")
    return attack, config.load(attack.config, settings, overrides, source=f"attack {name}")


def poison(
    data: ImageSet,
    attack_name: str,
    overrides: Iterable[str] = (),
    run: Run | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
) -> tuple[ImageSet, dict[str, float]]:
    """Poison a class-balanced `ratio` of `data` with one attack; return it and its budget.

    The result has a `poisoned` column marking the selected rows. With a run, the config,
    the budget and a grid of poisoned images and perturbations are logged to it.
    """
    attack, cfg = configure(attack_name, settings, overrides)
    rows = select_rows(data.labels, cfg.ratio, cfg.seed)
    if len(rows) == 0:
        raise ConfigError(f"attack {attack.name}: ratio {cfg.ratio} selects none of the rows")
    job = AttackJob(rows=data.take(rows), clean=data, device=device(), run=run)
    out = attack.generate(job, cfg)
    if out.dtype != np.uint8 or out.shape != job.rows.images.shape:
        raise RuntimeError(
            f"attack {attack.name}: generated {out.dtype} {out.shape}, "
            f"expected uint8 {job.rows.images.shape}"
        )
    images = data.images.copy()
    images[rows] = out
    flags = np.zeros(len(data), dtype=bool)
    flags[rows] = True
    budget = measure_budget(data.images, images)
    if not within_budget(attack.norm, cfg.limit(), budget):
        raise RuntimeError(
            f"attack {attack.name}: bug: {attack.norm} budget {cfg.limit():g} broken after "
            f"quantisation (measured {budget})"
        )
    poisoned = data.replace(images, poisoned=flags)
    if run is not None:
        log_poisoning(run, {"attack": attack.name, **cfg.to_dict()}, data, poisoned, budget)
    return poisoned, budget


def log_poisoning(
    run: Run,
    params: Mapping[str, Any],
    clean: ImageSet,
    poisoned: ImageSet,
    budget: Mapping[str, float],
) -> None:
    """Log what made a poison, its budget, and a class-by-class grid (poisoned images on the
    left, their perturbations amplified to full contrast on the right)."""
    run.log_params(params)
    run.log_metrics(budget)
    # No flags (None) flatten to no rows: nothing to log.
    flagged = np.flatnonzero(poisoned.poisoned)  # type: ignore[arg-type]
    if len(flagged) == 0:
        return
    shown = flagged[class_rows(poisoned.labels[flagged], poisoned.num_classes, GRID_PER_CLASS)]
    delta = poisoned.images[shown].astype(np.float32) - clean.images[shown].astype(np.float32)
    left = grid(poisoned.images[shown], ncol=GRID_PER_CLASS, scale=2)
    right = grid(to_uint8(amplify(delta)), ncol=GRID_PER_CLASS, scale=2)
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    run.log_png(np.concatenate([left, gap, right], axis=1), "poison_grid.png")
