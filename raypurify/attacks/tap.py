"""TAP, targeted adversarial poisoning (Fowl et al., NeurIPS 2021).

A surrogate is trained on the clean set (with the project's classifier trainer, on Ray
Train); then every image is pushed by targeted PGD towards the class (y + shift) mod K:

    min_{||delta||_inf <= eps}  CE(f(A(x + delta)), (y + shift) mod K)

with A a random crop/flip drawn at every step (the authors' differentiable augmentation,
so the features survive the victim's augmentation), over `restarts` random starts keeping
the one with the lowest target loss. The crafting runs as Ray Data `map_batches` on an
actor pool holding the surrogate (GPUs when the cluster has them). The authors use 250
steps and 8 restarts on a 40-epoch ResNet-18; the CPU protocol passes fewer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.data.interchange import imageset_to_ray
from raypurify.distributed import use_gpu
from raypurify.models import build_model
from raypurify.progress import Progress, add
from raypurify.runtime import Precision, autocast, use_bf16
from raypurify.training.augment import crop_flip


class TAPConfig(EpsConfig):
    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound, [0, 1] units")
    steps: PositiveInt = 250
    restarts: PositiveInt = 8
    step_size: float | None = Field(None, gt=0, description="default: eps * max(0.05, 2.5/steps)")
    shift: PositiveInt = Field(1, description="target class (y + shift) mod K")
    augment: bool = True
    surrogate_recipe: str = "paper"  # trained on the clean set with this classifier recipe
    surrogate_overrides: list[str] = Field(default_factory=lambda: ["epochs=40"])
    batch_size: PositiveInt = 256
    actors: PositiveInt = 1
    precision: Precision = "auto"


class Crafter:
    """Ray Data actor: targeted PGD against one surrogate, batch by batch."""

    def __init__(
        self,
        weights: dict,
        arch: str,
        options: dict,
        classes: int,
        size: int,
        tap: dict,
        progress=None,
    ):
        self.cfg = TAPConfig.model_validate(tap)
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(arch, classes, size, **options)
        model.load_state_dict(ray.get(weights))  # an object ref: one copy for all actors
        self.model = model.to(self.dev, memory_format=torch.channels_last).eval()
        self.model.requires_grad_(False)
        self.classes, self.progress = classes, progress
        self.amp = use_bf16(self.cfg.precision, self.dev)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        x = torch.from_numpy(np.array(batch["image"])).to(self.dev)
        x = x.permute(0, 3, 1, 2).float() / 255
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64)).to(self.dev)
        target = (labels + cfg.shift) % self.classes
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch["index"].min()))
        step = cfg.step_size or cfg.eps * max(0.05, 2.5 / cfg.steps)
        best = torch.zeros_like(x)
        best_loss = torch.full((len(x),), float("inf"), device=self.dev)
        for _ in range(cfg.restarts):
            delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps).to(self.dev)
            for _ in range(cfg.steps):
                delta.requires_grad_(True)
                adv = torch.clamp(x + delta, 0, 1)
                if cfg.augment:
                    adv = crop_flip(adv, gen)
                with autocast(self.dev, self.amp):
                    logits = self.model(adv.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), target)
                (g,) = torch.autograd.grad(loss, delta)
                delta = torch.clamp(delta.detach() - step * g.sign(), -cfg.eps, cfg.eps)
                delta = torch.clamp(x + delta, 0, 1) - x
            with torch.no_grad(), autocast(self.dev, self.amp):
                adv = torch.clamp(x + delta, 0, 1).contiguous(memory_format=torch.channels_last)
                final = F.cross_entropy(self.model(adv).float(), target, reduction="none")
            better = final < best_loss
            best[better], best_loss[better] = delta[better], final[better]
        add(self.progress, len(x))
        return {"index": batch["index"], "delta": best.permute(0, 2, 3, 1).cpu().numpy()}


def train_surrogate(job: AttackJob, cfg: TAPConfig, out: Path) -> tuple[Any, dict]:
    """The clean-set surrogate, trained with the classifier trainer (Ray Train)."""
    from raypurify.training.config import recipe
    from raypurify.training.trainer import MODEL_FILE, train_classifier

    train_cfg = recipe(cfg.surrogate_recipe, [*cfg.surrogate_overrides, f"seed={cfg.seed}"])
    check = job.clean.take(np.arange(min(len(job.clean), 1000)))  # a progress readout only
    metrics = train_classifier(job.clean, check, train_cfg, out, run=None)
    if job.run is not None:
        job.run.log_metrics({"surrogate_train_acc": metrics["accuracy"]})
    weights = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)
    return train_cfg, weights


def generate(job: AttackJob, cfg: TAPConfig) -> np.ndarray:
    from raypurify.runtime import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        train_cfg, weights = train_surrogate(job, cfg, Path(tmp))
    gpu = use_gpu("auto")
    ds = imageset_to_ray(job.rows)
    with Progress(len(job.rows), "TAP crafting", unit="img") as progress:
        crafted = ds.map_batches(
            Crafter,
            fn_constructor_kwargs={
                "weights": ray.put(weights),
                "arch": train_cfg.arch,
                "options": train_cfg.arch_options,
                "classes": job.clean.num_classes,
                "size": job.rows.shape[0],
                "tap": cfg.to_dict(),
                "progress": progress.queue,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            **({"num_gpus": 1} if gpu else {"num_cpus": 1}),
        )
        parts = list(crafted.iter_batches(batch_size=None, batch_format="numpy"))
    index = np.concatenate([p["index"] for p in parts])
    delta = np.concatenate([p["delta"] for p in parts])
    position = {int(i): r for r, i in enumerate(index)}
    delta = torch.from_numpy(delta[[position[int(i)] for i in job.rows.index]])
    return perturb(job.rows.images, lambda rows: delta[rows], "linf", cfg.eps, job.device)


ATTACK = Attack(
    name="tap",
    description="targeted adversarial poisoning (Fowl et al. 2021), l_inf 8/255",
    norm="linf",
    config=TAPConfig,
    generate=generate,
)
