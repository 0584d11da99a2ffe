"""EM, error-minimising noise (Huang et al., ICLR 2021): unlearnable examples by min-min.

    min_theta  min_{||delta||_inf <= eps}  CE(f_theta(x + delta), y)

Alternate rounds of (1) `train_steps` SGD steps of a surrogate on x + delta and (2) PGD that
*descends* the loss in delta over the poisoned rows, until the surrogate's error on x + delta
falls below `stop_error`. The noise makes the data trivially easy, so a model trained on it
learns the noise and not the images. Sample-wise: one delta per image, `pgd_steps` steps per
round. Class-wise: one delta per class, one step per batch, each class moved by the mean of
its images' signed-gradient steps, over a `portion` of the rows (the authors' 20 %).

The surrogate is built from the project's model registry and trained inside a Ray Train job
(N workers, CPU or GPU; DDP for the surrogate, rows sharded for the noise, deltas
all-reduced each round). Defaults are the authors' CIFAR-10 settings (ResNet-18, batch 512,
SGD 0.1); the CPU protocol passes a smaller surrogate.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.distributed import fit, use_gpu
from raypurify.estimate import train_rate, warn_if_long
from raypurify.models import ARCHS, build_model
from raypurify.runtime import Precision, autocast, use_bf16
from raypurify.storage import scratch
from raypurify.workers import (
    LoopContext,
    LoopJob,
    end_epoch,
    per_worker_batch,
    setup_worker,
    unwrap,
)

# What to use instead of the authors' GPU settings on a CPU (the CPU protocol's EM rows).
CPU_HINT = (
    "on a CPU use the CPU protocol's settings (preset cifar10-mini, `raypurify presets`): "
    "--set surrogate=fast-resnet --set surrogate_options.width=16 --set batch_size=256 "
    "--set max_rounds=15"
)


class EMConfig(EpsConfig):
    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound, [0, 1] units")
    granularity: Literal["sample", "class"] = "sample"
    step_size: float = Field(0.8 / 255, gt=0, description="PGD step, [0, 1] units")
    pgd_steps: PositiveInt = Field(20, description="noise steps per round (sample-wise)")
    train_steps: PositiveInt = Field(10, description="surrogate SGD steps per round")
    stop_error: float = Field(0.01, ge=0, lt=1, description="stop below this train error")
    max_rounds: PositiveInt = 100
    portion: float = Field(1.0, gt=0, le=1, description="rows used for class-wise updates")
    batch_size: PositiveInt = 512
    lr: float = Field(0.1, gt=0)
    surrogate: str = "resnet18"
    surrogate_options: dict[str, Any] = Field(default_factory=dict)
    precision: Precision = "auto"
    workers: PositiveInt = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _input_grad(
    model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, amp: bool
) -> torch.Tensor:
    """d CE(f(clip(x + delta)), y) / d delta."""
    delta = delta.detach().requires_grad_(True)
    adv = torch.clamp(x + delta, 0, 1).contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp):
        loss = F.cross_entropy(model(adv).float(), y)
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


class MinMin:
    """One worker's state: the data, its share of rows, the surrogate and the noise."""

    @staticmethod
    def worst_case_passes(cfg: EMConfig, rows: int) -> float:
        """Surrogate forward-backward image passes if no round stops early."""
        noise = cfg.pgd_steps * rows if cfg.granularity == "sample" else cfg.portion * rows
        return cfg.max_rounds * (cfg.train_steps * cfg.batch_size + noise)

    def __init__(self, job: MinMinJob, rank: int, world: int, dev: torch.device):
        cfg = job.config
        self.cfg, self.rank, self.world, self.dev = cfg, rank, world, dev
        self.amp = use_bf16(cfg.precision, dev)
        arrays = ray.get(job.arrays)
        self.x = torch.from_numpy(arrays["images"].copy()).to(dev).float() / 255  # N C H W
        self.y = torch.from_numpy(arrays["labels"].copy()).to(dev)
        n, self.classes = len(self.y), job.num_classes
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.surrogate, self.classes, self.x.shape[-1], **cfg.surrogate_options)
        self.model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        shape = (self.classes if cfg.granularity == "class" else n, *self.x.shape[1:])
        self.delta = ((torch.rand(shape, generator=self.gen) * 2 - 1) * cfg.eps).to(dev)
        self.mine = torch.arange(rank, n, world, device=dev)  # rows this worker updates
        self.bs = per_worker_batch(cfg.batch_size, world)
        self.order, self.cursor = torch.randperm(n, generator=self.gen).to(dev), 0

    def noise(self, idx: torch.Tensor) -> torch.Tensor:
        return self.delta[self.y[idx]] if self.cfg.granularity == "class" else self.delta[idx]

    def noisy(self, idx: torch.Tensor) -> torch.Tensor:
        """x + delta for rows `idx`, as the network takes it."""
        out = torch.clamp(self.x[idx] + self.noise(idx), 0, 1)
        return out.contiguous(memory_format=torch.channels_last)

    def train_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """What the surrogate trains on (REM: adversarial examples of it)."""
        return self.noisy(idx)

    def train_surrogate(self) -> float:
        """`train_steps` SGD steps on x + delta (DDP: each worker its slice of a batch)."""
        self.model.train()
        n, span = len(self.y), self.bs * self.world
        for _ in range(self.cfg.train_steps):
            if self.cursor + span > n:
                self.order, self.cursor = torch.randperm(n, generator=self.gen).to(self.dev), 0
            start = self.cursor + self.rank * self.bs
            idx = self.order[start : start + self.bs]
            self.cursor += span
            with autocast(self.dev, self.amp):
                loss = F.cross_entropy(self.model(self.train_batch(idx)).float(), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
            self.opt.step()
        return float(loss)

    def sample_update(self, net: torch.nn.Module) -> torch.Tensor:
        """PGD descent, `pgd_steps` steps, on the delta of each of this worker's rows."""
        cfg, update = self.cfg, torch.zeros_like(self.delta)
        for i in range(0, len(self.mine), self.bs):
            idx = self.mine[i : i + self.bs]
            x, d = self.x[idx], self.delta[idx]
            for _ in range(cfg.pgd_steps):
                g = _input_grad(net, x, d, self.y[idx], self.amp)
                d = torch.clamp(d - cfg.step_size * g.sign(), -cfg.eps, cfg.eps)
                d = torch.clamp(x + d, 0, 1) - x
            update[idx] = d - self.delta[idx]
        return update

    def class_update(self, net: torch.nn.Module) -> torch.Tensor:
        """One step per batch: each class moves by the mean of its images' signed steps."""
        cfg, update = self.cfg, torch.zeros_like(self.delta)
        keep = max(1, int(cfg.portion * len(self.mine)))
        used = self.mine[torch.randperm(len(self.mine), generator=self.gen)[:keep].to(self.dev)]
        for i in range(0, len(used), self.bs):
            idx = used[i : i + self.bs]
            step = (
                -cfg.step_size
                * _input_grad(net, self.x[idx], self.noise(idx), self.y[idx], self.amp).sign()
            )
            sums = torch.zeros_like(self.delta).index_add_(0, self.y[idx], step)
            counts = torch.bincount(self.y[idx], minlength=self.classes).clamp_min(1)
            update += sums / counts.view(-1, 1, 1, 1).float()
        return update / self.world  # all-reduced below: the mean over workers

    @torch.no_grad()
    def error(self, net: torch.nn.Module) -> float:
        """The surrogate's error on x + delta, over all rows."""
        counts = torch.zeros(2, device=self.dev)
        for i in range(0, len(self.mine), 2 * self.bs):
            idx = self.mine[i : i + 2 * self.bs]
            with autocast(self.dev, self.amp):
                pred = net(self.noisy(idx)).argmax(1)
            counts += torch.tensor(
                [float((pred != self.y[idx]).sum()), float(len(idx))], device=self.dev
            )
        if self.world > 1:
            dist.all_reduce(counts)
        return float(counts[0] / counts[1])

    def round(self) -> tuple[float, float]:
        loss = self.train_surrogate()
        net = unwrap(self.model).eval().requires_grad_(False)
        update = (
            self.sample_update(net) if self.cfg.granularity == "sample" else self.class_update(net)
        )
        if self.world > 1:
            dist.all_reduce(update)
        self.delta = torch.clamp(self.delta + update, -self.cfg.eps, self.cfg.eps)
        error = self.error(net)
        net.requires_grad_(True)
        return loss, error


@dataclass(frozen=True, kw_only=True)
class MinMinJob(LoopJob):
    """The min-min loop's inputs: the engine (MinMin or a subclass), its config, and the
    rows to poison."""

    engine: type[MinMin]
    config: EMConfig  # the engine's own config (REM's is a REMConfig)
    arrays: Any  # object ref to `pack`'s arrays of the rows
    num_classes: int


def minmin_worker(job: MinMinJob, ctx: LoopContext) -> None:
    """Rounds of `job.engine` until its stop rule; the last report carries the noise."""
    cfg = job.config
    rank, world, dev = setup_worker(None)
    em = job.engine(job, rank, world, dev)
    for rnd in range(cfg.max_rounds):
        t0 = time.perf_counter()
        loss, error = em.round()
        metrics = {
            "round": rnd + 1,
            "error": error,
            "loss": loss,
            "round_s": time.perf_counter() - t0,
        }
        done = error < cfg.stop_error or rnd + 1 == cfg.max_rounds
        state = {"epoch": rnd + 1, "delta": em.delta.cpu()} if done else None
        end_epoch(job, ctx, rank, rnd + 1, metrics, state, bar={"error": error})
        if done:
            return


def run_minmin(job: AttackJob, cfg: EMConfig, engine: type[MinMin], desc: str) -> np.ndarray:
    """Run `engine` on Ray Train over the rows to poison; return them poisoned."""
    ARCHS.get(cfg.surrogate, key="surrogate")
    from raypurify.runtime import init_ray
    from raypurify.training.data import pack

    init_ray()
    gpu = use_gpu(cfg.device)
    if not gpu:
        (h, w, c), classes = job.rows.shape, job.clean.num_classes
        passes = engine.worst_case_passes(cfg, len(job.rows))
        surrogate = functools.partial(
            build_model, cfg.surrogate, classes, h, **cfg.surrogate_options
        )

        def rate() -> float:
            return train_rate(surrogate(), classes, (c, h, w), 16)

        warn_if_long(desc, passes, rate, hint=CPU_HINT)
    minmin = MinMinJob(
        engine=engine,
        config=cfg,
        arrays=ray.put(pack(job.rows)),
        num_classes=job.clean.num_classes,
        mlflow=job.run,
    )
    with scratch() as tmp:
        state = fit(
            minmin_worker,
            minmin,
            workers=cfg.workers,
            gpu=gpu,
            storage=Path(tmp),
            name="minmin",
            epochs=cfg.max_rounds,
            desc=desc,
        ).state
    delta = state["delta"].permute(0, 2, 3, 1)  # N/K H W C
    labels = torch.from_numpy(job.rows.labels)

    def delta_for(rows: slice) -> torch.Tensor:
        return delta[labels[rows]] if cfg.granularity == "class" else delta[rows]

    return perturb(job.rows.images, delta_for, "linf", cfg.eps, job.device)


def generate(job: AttackJob, cfg: EMConfig) -> np.ndarray:
    return run_minmin(job, cfg, MinMin, f"EM {cfg.granularity}-wise (rounds)")


ATTACK = Attack(
    name="em",
    description="error-minimising noise (Huang et al. 2021), sample- or class-wise, l_inf 8/255",
    norm="linf",
    config=EMConfig,
    generate=generate,
)
