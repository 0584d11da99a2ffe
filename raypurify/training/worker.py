"""The Ray Train worker loop for classifiers: DDP, bf16 autocast, checkpoint every epoch.

Runs on each of N workers (CPU or GPU, chosen at run time). Resuming is automatic: a rerun
with the same storage path and name finds the last checkpoint and continues at the next
epoch with the same data order and augmentation.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raypurify.distributed import report, resume, setup_worker, snapshot, unwrap
from raypurify.errors import TrainingError
from raypurify.models import build_model
from raypurify.progress import advance
from raypurify.runtime import use_bf16
from raypurify.tracking import Run
from raypurify.training import data as batches
from raypurify.training.config import TrainConfig
from raypurify.training.engine import Step, accuracy_report, lr_factor, predict, train_epoch


def evaluate(model, images, labels, num_classes, rank, world, cfg) -> dict:
    """Each worker predicts a slice of the test set; confusion matrices are summed."""
    rows = slice(rank, None, world)
    amp = use_bf16(cfg.precision, next(model.parameters()).device)
    logits = predict(unwrap(model), images[rows], amp=amp, tta=cfg.tta)
    confusion = torch.tensor(accuracy_report(logits, labels[rows], num_classes)["confusion"])
    if world > 1:
        dist.all_reduce(confusion)
    c = confusion.numpy()
    return {
        "accuracy": float(c.diagonal().sum() / c.sum()),
        "per_class": (c.diagonal() / np.maximum(c.sum(1), 1)).tolist(),
        "confusion": c.tolist(),
    }


def train_worker(loop: dict) -> None:
    cfg = TrainConfig.model_validate(loop["train"])
    rank, world, dev = setup_worker(cfg.threads)
    run = Run(**loop["mlflow"]) if loop.get("mlflow") and rank == 0 else None
    amp = use_bf16(cfg.precision, dev)

    torch.manual_seed(cfg.seed)
    num_classes = loop["num_classes"]
    model = build_model(cfg.arch, num_classes, loop["image_size"], **cfg.arch_options)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    data = batches.EpochBatches(
        loop["arrays"], loop["rows"], max(2, cfg.batch_size // world), cfg.seed, rank, world, dev
    )
    test_images, test_labels = batches.unpack(ray.get(loop["test_arrays"]))
    eval_rows = loop.get("eval_rows")
    if eval_rows is not None:
        eval_rows = torch.tensor(eval_rows, dtype=torch.int64)

    o = cfg.optim
    # Linear scaling: `lr` is per 128 images of global batch (the paper's batch).
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=o.lr * cfg.batch_size / 128,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    total, warmup = cfg.epochs * data.steps, int(o.warmup_epochs * data.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(o.schedule, s, total, warmup)
    )
    from raypurify.defenses import training_loss

    loss_fn = training_loss(cfg)

    start_epoch, history = resume(model, optimizer, scheduler, dev, loop)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        step = Step(epoch=epoch, epochs=cfg.epochs, gen=gen, amp=amp)
        try:
            stats = train_epoch(
                model,
                optimizer,
                scheduler,
                data(epoch),
                loss_fn,
                step,
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
            loop["eval_key"]: result["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_s": time.perf_counter() - t0,
        }
        history.append(metrics)
        if run is not None:
            run.log_metrics(metrics, step=epoch + 1)
        if rank == 0:
            advance(loop["progress"], epoch + 1, loss=stats["train_loss"], acc=result["accuracy"])
        if last:
            metrics = metrics | {"per_class": result["per_class"], "confusion": result["confusion"]}
        report(metrics, snapshot(model, optimizer, scheduler, epoch + 1, history), rank)

    if start_epoch == cfg.epochs:  # resumed a finished run: report its final evaluation
        result = evaluate(model, test_images, test_labels, num_classes, rank, world, cfg)
        final = history[-1] | {loop["eval_key"]: result["accuracy"]}
        report(
            final | {"per_class": result["per_class"], "confusion": result["confusion"]}, None, rank
        )
