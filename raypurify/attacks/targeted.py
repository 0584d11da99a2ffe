"""PGD against a surrogate, or an ensemble of surrogates: TAP and SEP's crafting.

Every image is pushed towards the class (y + shift) mod K (targeted, as TAP and SEP are
published):

    min_{||delta||_inf <= eps}  mean_k CE(f_k(A(x + delta)), (y + shift) mod K)

or, untargeted (TAP's other recipe in its authors' code, and APBench's default), away
from its own label: min -mean_k CE(f_k(A(x + delta)), y). A is an optional random
crop/flip drawn at every step (so the features survive the victim's augmentation); of
`restarts` random starts, each image keeps the one with the lowest final objective. It
runs as Ray Data `map_batches` on an actor pool holding the surrogates (GPUs when the
cluster has them), and returns the float perturbations, which the attack then quantises
within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import ray
import ray.data
import torch
import torch.nn.functional as F

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange_ray import imageset_to_ray
from raypurify.distributed import use_gpu
from raypurify.models import build_model
from raypurify.progress import BarQueue, Progress, add
from raypurify.runtime import Precision, autocast, torch_threads, use_bf16
from raypurify.training.augment import crop_flip

Objective = Literal["targeted", "untargeted"]


@dataclass(frozen=True)
class PGD:
    """How each image is attacked (TAP's and SEP's settings)."""

    eps: float  # l_inf bound, [0, 1] units
    steps: int
    step_size: float
    restarts: int  # random starts; the one with the lowest final target loss is kept
    shift: int  # target class (y + shift) mod K
    augment: bool  # a random crop/flip at every step
    precision: Precision
    seed: int
    objective: Objective = "targeted"


@dataclass(frozen=True)
class Surrogates:
    """The networks every crafting actor attacks: one architecture, several weights."""

    states: Any  # object ref to the list of state dicts: one copy for all actors
    arch: str
    options: dict[str, Any]
    classes: int
    size: int  # image side


class Crafter:
    """Ray Data actor: targeted PGD against the surrogates, batch by batch."""

    def __init__(self, surrogates: Surrogates, pgd: PGD, progress: BarQueue | None = None):
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.dev.type == "cpu":
            torch.set_num_threads(torch_threads())
        self.models = []
        s = surrogates
        for state in ray.get(s.states):
            model = build_model(s.arch, s.classes, s.size, **s.options)
            model.load_state_dict(state)
            # torch's overloads of Module.to lack (device, memory_format=), which it accepts.
            model = model.to(self.dev, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
            self.models.append(model.requires_grad_(False))
        self.pgd, self.classes, self.progress = pgd, s.classes, progress
        self.amp = use_bf16(pgd.precision, self.dev)

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The objective PGD lowers: CE to the target class, or minus CE to the own label."""
        x = x.contiguous(memory_format=torch.channels_last)
        total: torch.Tensor | float = 0.0
        for model in self.models:
            with autocast(self.dev, self.amp):
                logits = model(x)
            total = total + F.cross_entropy(logits.float(), target, reduction=reduction)
        # There is at least one surrogate, so the sum is a tensor.
        sign = -1.0 if self.pgd.objective == "untargeted" else 1.0
        return sign * cast(torch.Tensor, total) / len(self.models)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.pgd
        x = torch.from_numpy(np.array(batch["image"])).to(self.dev).permute(0, 3, 1, 2) / 255.0
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64)).to(self.dev)
        target = labels if p.objective == "untargeted" else (labels + p.shift) % self.classes
        gen = torch.Generator().manual_seed(p.seed * 1_000_003 + int(batch["index"].min()))
        best = torch.zeros_like(x)
        best_loss = torch.full((len(x),), float("inf"), device=self.dev)
        for _ in range(p.restarts):
            delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * p.eps).to(self.dev)
            for _ in range(p.steps):
                delta.requires_grad_(True)
                adv = torch.clamp(x + delta, 0, 1)
                (g,) = torch.autograd.grad(
                    self.loss(crop_flip(adv, gen) if p.augment else adv, target), delta
                )
                delta = torch.clamp(delta.detach() - p.step_size * g.sign(), -p.eps, p.eps)
                delta = torch.clamp(x + delta, 0, 1) - x
            with torch.no_grad():
                final = self.loss(torch.clamp(x + delta, 0, 1), target, reduction="none")
            better = final < best_loss
            best[better], best_loss[better] = delta[better], final[better]
        add(self.progress, len(x))
        return {"index": batch["index"], "delta": best.permute(0, 2, 3, 1).cpu().numpy()}


def craft(
    rows: ImageSet,
    states: list[dict],
    arch: str,
    options: dict,
    classes: int,
    pgd: PGD,
    *,
    batch_size: int,
    actors: int,
    desc: str,
) -> torch.Tensor:
    """Float perturbations (n, H, W, C) for `rows`, in their order."""
    gpu = use_gpu("auto")
    with Progress(len(rows), desc, unit="img") as progress:
        crafted = imageset_to_ray(rows).map_batches(
            Crafter,
            fn_constructor_kwargs={
                "surrogates": Surrogates(ray.put(states), arch, options, classes, rows.shape[0]),
                "pgd": pgd,
                "progress": progress.queue,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="numpy",
            **cast(dict[str, Any], {"num_gpus": 1} if gpu else {"num_cpus": 1}),
        )
        parts = list(crafted.iter_batches(batch_size=None, batch_format="numpy"))
    index = np.concatenate([p["index"] for p in parts])
    delta = np.concatenate([p["delta"] for p in parts])
    position = {int(i): r for r, i in enumerate(index)}
    return torch.from_numpy(delta[[position[int(i)] for i in rows.index]])
