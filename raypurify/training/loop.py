"""The Ray Train worker loop for classifiers: DDP, bf16 autocast, checkpoint every epoch.

Runs on each of N workers (CPU or GPU, chosen at run time). Resuming is automatic: a rerun
with the same storage path and name finds the last checkpoint and continues at the next
epoch with the same data order and augmentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raypurify.errors import TrainingError
from raypurify.models import build_model
from raypurify.runtime import use_bf16
from raypurify.training import data as batches
from raypurify.training.config import TrainConfig
from raypurify.training.data import Shipped
from raypurify.training.epoch import (
    LossContext,
    accuracy_breakdown,
    lr_schedule,
    predict,
    train_epoch,
)
from raypurify.workers import (
    LoopContext,
    LoopJob,
    end_epoch,
    epoch_seed,
    per_worker_batch,
    report_and_checkpoint,
    resume,
    setup_worker,
    snapshot,
    unwrap,
)


def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    rank: int,
    world: int,
    cfg: TrainConfig,
) -> dict:
    """Each worker predicts a slice of the test set; confusion matrices are summed."""
    rows = slice(rank, None, world)
    amp = use_bf16(cfg.precision, next(model.parameters()).device)
    logits = predict(unwrap(model), images[rows], amp=amp, tta=cfg.tta)
    confusion = torch.tensor(accuracy_breakdown(logits, labels[rows], num_classes)["confusion"])
    if world > 1:
        dist.all_reduce(confusion)
    c = confusion.numpy()
    return {
        "accuracy": float(c.diagonal().sum() / c.sum()),
        "per_class": (c.diagonal() / np.maximum(c.sum(1), 1)).tolist(),
        "confusion": c.tolist(),
    }


# What a classifier's per-epoch accuracy is called: on test rows, or (a sweep trial) on
# clean validation rows.
EvalKey = Literal["test_acc", "val_accuracy"]


@dataclass(frozen=True, kw_only=True)
class ClassifierJob(LoopJob):
    """A classifier's inputs: its recipe, the training rows and the evaluation set."""

    train: TrainConfig
    num_classes: int
    image_size: int
    data: Shipped
    test_arrays: Any  # object ref to `pack`'s arrays of the evaluation set
    eval_rows: np.ndarray | None  # the rows evaluated before the last epoch (None: all)
    eval_key: EvalKey = "test_acc"


def train_worker(job: ClassifierJob, ctx: LoopContext) -> None:
    cfg = job.train
    rank, world, dev = setup_worker(cfg.threads)
    amp = use_bf16(cfg.precision, dev)

    torch.manual_seed(cfg.seed)
    num_classes = job.num_classes
    model = build_model(cfg.arch, num_classes, job.image_size, **cfg.arch_options)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    data = batches.EpochBatches(
        job.data, per_worker_batch(cfg.batch_size, world), cfg.seed, rank, world, dev
    )
    test_images, test_labels = batches.unpack(ray.get(job.test_arrays))
    eval_rows = None if job.eval_rows is None else torch.tensor(job.eval_rows, dtype=torch.int64)

    o = cfg.optim
    # Linear scaling: `lr` is per 128 images of global batch (the paper's batch).
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=o.lr * cfg.batch_size / 128,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    scheduler = lr_schedule(
        optimizer, o.schedule, cfg.epochs * data.steps, int(o.warmup_epochs * data.steps)
    )
    from raypurify.defenses import training_loss

    loss_fn = training_loss(cfg)

    start_epoch, history = resume(model, optimizer, scheduler, dev, ctx)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, rank))
        loss_ctx = LossContext(epoch=epoch, epochs=cfg.epochs, gen=gen, amp=amp)
        try:
            stats = train_epoch(
                model,
                optimizer,
                scheduler,
                data(epoch),
                loss_fn,
                loss_ctx,
                augment=cfg.augment,
                grad_clip=o.grad_clip,
            )
        except FloatingPointError as e:
            raise TrainingError(f"classifier training: {e} at epoch {epoch + 1}") from None
        last = epoch + 1 == cfg.epochs
        subset = slice(None) if (last or eval_rows is None) else eval_rows
        result = evaluate(
            model, test_images[subset], test_labels[subset], num_classes, rank, world, cfg
        )
        metrics = {
            "epoch": epoch + 1,
            **stats,
            "train_images_per_s": stats["train_images_per_s"] * world,
            job.eval_key: result["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_s": time.perf_counter() - t0,
        }
        history.append(metrics)
        end_epoch(
            job,
            ctx,
            rank,
            epoch + 1,
            metrics,
            snapshot(model, optimizer, scheduler, epoch + 1, history),
            bar={"loss": stats["train_loss"], "acc": result["accuracy"]},
            extra={"per_class": result["per_class"], "confusion": result["confusion"]}
            if last
            else None,
        )

    if start_epoch == cfg.epochs:  # resumed a finished run: report its final evaluation
        result = evaluate(model, test_images, test_labels, num_classes, rank, world, cfg)
        final = history[-1] | {job.eval_key: result["accuracy"]}
        report_and_checkpoint(
            final | {"per_class": result["per_class"], "confusion": result["confusion"]}, None, rank
        )
