"""One training stage of Algorithm 1 as a Ray Train job: a fresh D-VAE fitted to one set.

Workers train with DDP, bf16 autocast and channels_last, Adam with a cosine schedule,
checkpointing every epoch; a rerun with the same storage path resumes. A non-finite loss
stops the stage with an error naming it and the epoch, before the bad weights can reach a
checkpoint, so the last good one is kept. At the end, rank 0 logs image grids of x, x_hat,
p_hat (rescaled) and the stage's output to the stage's MLflow run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
import ray.train.torch
import torch
import torch.distributed as dist

from raypurify.atomic import load_user_torch
from raypurify.data.imageset import ImageSet
from raypurify.data.spec import Stream
from raypurify.distributed import fit, use_gpu
from raypurify.errors import DatasetError, TrainingError, unreadable_file
from raypurify.estimate import rate_of, warn_if_long_training
from raypurify.reports.images import amplify, class_rows, grid, to_uint8
from raypurify.runtime import autocast, use_bf16
from raypurify.tracking import Run
from raypurify.training import data as batches
from raypurify.training.data import Shipped
from raypurify.workers import (
    LoopContext,
    LoopJob,
    check_one_batch,
    end_epoch,
    epoch_seed,
    per_worker_batch,
    resume,
    setup_worker,
    snapshot,
    unwrap,
)

from .config import PurifyConfig, StageConfig
from .loss import dvae_loss, psnr, stage_loss
from .model import DVAE

GRID_PER_CLASS = 4


def build(cfg: PurifyConfig, num_classes: int, image_size: int) -> DVAE:
    return DVAE(
        num_classes,
        image_size,
        width=cfg.model.width,
        latent=cfg.model.latent,
        perturbation_decoder=cfg.method == "dvae",
        phat_zero_init=cfg.model.phat_zero_init,
        decoder_norm=cfg.model.decoder_norm,
        latent_grid=cfg.model.latent_grid,
    )


def check_weights(path: Path, cfg: PurifyConfig, num_classes: int, image_size: int) -> None:
    """Refuse, in one line naming `path`, stage weights that are not a state dict of the
    network `cfg` builds for this data (read with weights_only: nothing is unpickled)."""
    what = "not weights of this purification's network"
    try:
        state = load_user_torch(path)
    except Exception as e:  # torch raises many types for a bad file
        raise unreadable_file(path, e, what) from None
    if not isinstance(state, dict):
        raise DatasetError(f"{path}: {what} (holds a {type(state).__name__}, not a state dict)")
    try:
        build(cfg, num_classes, image_size).load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise DatasetError(f"{path}: {what} ({str(e).splitlines()[0][:200]})") from None


@dataclass(frozen=True, kw_only=True)
class StageJob(LoopJob):
    """One stage's inputs: the purification config, which stage, and the data."""

    purify: PurifyConfig
    stage: StageConfig
    name: str  # "stage1" or "stage2" (the last stage logs the purified grid too)
    num_classes: int
    image_size: int
    data: Shipped
    grid_arrays: Any  # object ref: a few images per class for the end-of-stage grids
    storage: str  # where the checkpoints live (named in the non-finite loss error)


def cosine(total: int) -> Callable[[int], float]:
    """A stage's learning-rate factor at step s of `total`. The classifier's cosine
    (training.epoch.lr_factor) in another float association: sharing it would change every
    D-VAE result in its last bits, so each keeps its own."""
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def stage_worker(job: StageJob, ctx: LoopContext) -> None:
    cfg, stage, name = job.purify, job.stage, job.name
    rank, world, dev = setup_worker(cfg.threads)
    amp = use_bf16(cfg.precision, dev)
    torch.manual_seed(cfg.seed)
    model = build(cfg, job.num_classes, job.image_size)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    groups = cast(DVAE, unwrap(model)).param_groups(
        stage.lr, stage.phat_lr_scale, stage.embedding_lr_scale
    )
    per_worker = per_worker_batch(stage.batch_size, world)
    data = batches.EpochBatches(job.data, per_worker, cfg.seed, rank, world, dev)
    optimizer = torch.optim.Adam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(stage.epochs * data.steps))
    start_epoch, history = resume(model, optimizer, scheduler, dev, ctx)

    for epoch in range(start_epoch, stage.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))  # z ~ q(z|x) draws
        sums = torch.zeros(7, dtype=torch.float64)  # loss rec rec_p kl p_energy psnr psnr_p
        model.train()
        for x8, y in data(epoch):
            x = (x8.float() / 255.0).contiguous(memory_format=torch.channels_last)
            with autocast(dev, amp):
                out = model(x, y, sample=True)
            # Only p_hat is ever None (a plain VAE has no perturbation decoder).
            x_hat: torch.Tensor
            p_hat: torch.Tensor | None
            mu: torch.Tensor
            logvar: torch.Tensor
            x_hat, p_hat, mu, logvar = cast(
                "Iterator[Any]", (None if t is None else t.float() for t in out)
            )
            loss, terms = stage_loss(stage, epoch, x, x_hat, p_hat, mu, logvar)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{name}: loss became {loss.item()} at epoch {epoch + 1}; the last good "
                    f"checkpoint (epoch {epoch}) is kept in {job.storage}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x_p = x_hat if p_hat is None else torch.clamp(x_hat + p_hat, 0, 1)
                sums += torch.tensor(
                    [
                        loss.item(),
                        terms["rec"].item(),
                        terms.get("rec_p", loss * 0).item(),
                        terms["kl"].item(),
                        terms.get("p_energy", loss * 0).item(),
                        psnr(x_hat, x).item(),
                        psnr(x_p, x).item(),
                    ],
                    dtype=torch.float64,
                ) * len(y)
        count = torch.tensor([data.steps * per_worker], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(count)
        means = (sums / count).tolist()
        keys = ["loss", "rec", "rec_p", "kl", "p_energy", "psnr_xhat", "psnr_xhat_phat"]
        metrics = dict(zip(keys, means, strict=True))
        if p_hat is None:
            for k in ("rec_p", "p_energy", "psnr_xhat_phat"):
                metrics.pop(k)
        seconds = time.perf_counter() - t0
        metrics |= {
            "epoch": epoch + 1,
            "epoch_s": seconds,
            "images_per_s": float(count.item()) / seconds,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(metrics)
        state = snapshot(model, optimizer, scheduler, epoch + 1, history)
        end_epoch(
            job,
            ctx,
            rank,
            epoch + 1,
            metrics,
            state,
            bar={"loss": metrics["loss"], "kl": metrics["kl"]},
        )

    if rank == 0 and job.mlflow is not None and start_epoch < stage.epochs:
        images, labels = batches.unpack(ray.get(job.grid_arrays))
        final = cfg.pass_mode(name) == "subtract_reconstruct"  # the stage that forms x3
        log_grids(job.mlflow, cast(DVAE, unwrap(model)), images, labels, cfg, dev, final)


@torch.no_grad()
def log_grids(
    run: Run,
    model: DVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: PurifyConfig,
    dev: torch.device,
    final: bool,
) -> None:
    """Grids of x, x_hat, p_hat (rescaled) and the stage output for a few images per class."""
    x = images.to(dev).float() / 255.0
    y = labels.to(dev)
    model.eval()
    mu, logvar = model.encode(x)
    z = model.sample(mu, logvar) if cfg.sample else mu
    x_hat = model.reconstruct(z)
    tiles = {"x": x, "x_hat": x_hat}
    if model.perturbation_decoder is not None:
        p_hat = model.perturbation(z, y)
        tiles["p_hat"] = torch.from_numpy(amplify(p_hat.cpu().numpy()))
        tiles["x_minus_p_hat"] = torch.clamp(x - p_hat, 0, 1)
        if final:  # stage 2: the purified image x3 = x_hat(x2)
            mu2, logvar2 = model.encode(tiles["x_minus_p_hat"])
            tiles["x3"] = model.reconstruct(model.sample(mu2, logvar2) if cfg.sample else mu2)
    for key, t in tiles.items():
        run.log_png(grid(to_uint8(t.cpu().numpy()), ncol=GRID_PER_CLASS * 2), f"grids/{key}.png")


def grid_sample(data: ImageSet | Stream) -> ImageSet:
    """A few training images per class for the end-of-stage grids."""
    if not isinstance(data, ImageSet):
        rows = data.ds.take_batch(50 * GRID_PER_CLASS * len(data.classes), batch_format="numpy")
        data = ImageSet(rows["image"], rows["label"], rows["index"], data.classes)
    return data.take(class_rows(data.labels, data.num_classes, GRID_PER_CLASS))


CPU_HINT = "on a CPU use the CPU protocol's preset (--preset cpu: width 32, 5 epochs a stage)"


def warn_if_slow_on_cpu(
    data: ImageSet | Stream, cfg: PurifyConfig, stage: StageConfig, name: str
) -> None:
    """Say once, before it starts, when this stage would take hours on this CPU."""

    def rate(classes: int, shape: tuple[int, int, int]) -> float:
        model = build(cfg, classes, shape[1]).to(memory_format=torch.channels_last)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x_hat, p_hat, mu, logvar = model(x, y)
            terms = {"kld_limit": stage.kld_limit, "kl_weight": stage.kl_weight}
            return dvae_loss(x, x_hat, p_hat, mu, logvar, **terms)[0]

        return rate_of(loss, classes, shape)

    key = ("dvae", cfg.method, repr(cfg.model.to_dict()))
    warn_if_long_training(f"D-VAE {name}", data, stage.epochs, rate, CPU_HINT, key)


def train_stage(
    name: str,
    data: ImageSet | Stream,
    cfg: PurifyConfig,
    stage: StageConfig,
    storage: Path,
    run: Run | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train a fresh D-VAE on `data` for `stage` (resuming from storage/name if present).

    Returns the final state (weights under "model", per-epoch metrics under "history") and
    the stage's start-up vs work split (`Fitted.split`).
    """
    rows = len(data) if isinstance(data, ImageSet) else data.rows
    if rows is not None:
        check_one_batch(rows, stage.batch_size, cfg.workers, data.name, f"{name}.batch_size")
    start = time.perf_counter()
    gpu = use_gpu(cfg.device)
    if not gpu:
        warn_if_slow_on_cpu(data, cfg, stage, name)
    shipped, datasets = batches.ship(data)
    job = StageJob(
        purify=cfg,
        stage=stage,
        name=name,
        num_classes=len(data.classes),
        image_size=data.shape[0],
        data=shipped,
        grid_arrays=ray.put(batches.pack(grid_sample(data))),
        storage=str(storage / name),
        mlflow=run,
    )
    fitted = fit(
        stage_worker,
        job,
        workers=cfg.workers,
        gpu=gpu,
        storage=storage,
        name=name,
        epochs=stage.epochs,
        desc=f"{name} (kld {stage.kld_limit:g})",
        datasets=datasets,
    )
    return fitted.state, fitted.split(start)


def images_per_s(history: list[dict]) -> float:
    return float(np.mean([h["images_per_s"] for h in history])) if history else 0.0
