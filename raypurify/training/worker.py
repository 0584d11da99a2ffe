"""The Ray Train worker loop for classifiers: DDP, bf16 autocast, checkpoint every epoch.

Runs on each of N workers (CPU or GPU, chosen at run time). Resuming is automatic: a rerun
with the same storage path and name finds the last checkpoint through
`ray.train.get_checkpoint()` and continues at the next epoch with the same data order.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raypurify.errors import TrainingError
from raypurify.models import build_model
from raypurify.progress import advance
from raypurify.tracking import Run
from raypurify.training import data as batches
from raypurify.training.config import TrainConfig
from raypurify.training.engine import Step, accuracy_report, lr_factor, predict, train_epoch

CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def evaluate(model, images, labels, num_classes, rank, world, cfg) -> dict:
    """Each worker predicts a slice of the test set; confusion matrices are summed."""
    rows = slice(rank, None, world)
    logits = predict(unwrap(model), images[rows], amp=cfg.precision == "bf16", tta=cfg.tta)
    report = accuracy_report(logits, labels[rows], num_classes)
    confusion = torch.tensor(report["confusion"], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(confusion)
    c = confusion.numpy()
    per_class = c.diagonal() / np.maximum(c.sum(1), 1)
    return {
        "accuracy": float(c.diagonal().sum() / c.sum()),
        "per_class": per_class.tolist(),
        "confusion": c.tolist(),
    }


def quiet_train_logs() -> None:
    """Ray Train logs every report (metrics included) at INFO under a logger named by file
    path, which RunConfig's logging level does not reach; raise that logger's level."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(loop: dict) -> None:
    quiet_train_logs()
    cfg = TrainConfig.model_validate(loop["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = ray.train.torch.get_device()
    if dev.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    run = Run(**loop["mlflow"]) if loop.get("mlflow") and rank == 0 else None

    torch.manual_seed(cfg.seed)
    num_classes, image_size = loop["num_classes"], loop["image_size"]
    model = build_model(cfg.arch, num_classes, image_size, **cfg.arch_options)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    per_worker_batch = max(2, cfg.batch_size // world)

    if loop.get("train_arrays") is not None:
        images, labels = batches.unpack(ray.get(loop["train_arrays"]))
        steps_per_epoch = max(1, (len(labels) // world) // per_worker_batch)
    else:
        shard = ray.train.get_dataset_shard("train")
        steps_per_epoch = max(1, (loop["train_rows"] // world) // per_worker_batch)
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
    total, warmup = cfg.epochs * steps_per_epoch, int(o.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(o.schedule, s, total, warmup)
    )
    from raypurify.defenses import training_loss

    loss_fn = training_loss(cfg)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=dev, weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state["history"])

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        if loop.get("train_arrays") is not None:
            rows = batches.epoch_order(len(labels), cfg.seed, epoch, rank, world)
            it = batches.memory_batches(images, labels, rows, per_worker_batch, dev)
        else:
            it = batches.ray_batches(shard, per_worker_batch, cfg.seed, epoch, dev)
        step = Step(epoch=epoch, epochs=cfg.epochs, gen=gen, amp=cfg.precision == "bf16")
        try:
            stats = train_epoch(
                model,
                optimizer,
                scheduler,
                it,
                loss_fn,
                step,
                augment=cfg.augment,
                grad_clip=o.grad_clip,
            )
        except FloatingPointError as e:
            raise TrainingError(f"classifier training: {e} at epoch {epoch + 1}") from None
        last = epoch + 1 == cfg.epochs
        rows = slice(None) if (last or eval_rows is None) else eval_rows
        report = evaluate(
            model, test_images[rows], test_labels[rows], num_classes, rank, world, cfg
        )
        metrics = {
            "epoch": epoch + 1,
            **stats,
            "train_images_per_s": stats["train_images_per_s"] * world,
            "test_acc": report["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_s": time.perf_counter() - t0,
        }
        history.append(metrics)
        if run is not None:
            run.log_metrics(metrics, step=epoch + 1)
        if rank == 0:
            advance(
                loop.get("progress"), epoch + 1, loss=stats["train_loss"], acc=report["accuracy"]
            )
        if last:
            metrics = metrics | {"per_class": report["per_class"], "confusion": report["confusion"]}
        saved = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                state = {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                }
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)

    if start_epoch == cfg.epochs:  # resumed a finished run: report its final evaluation
        report = evaluate(model, test_images, test_labels, num_classes, rank, world, cfg)
        final = history[-1] | {"test_acc": report["accuracy"]}
        final |= {"per_class": report["per_class"], "confusion": report["confusion"]}
        ray.train.report(final, checkpoint=None)
