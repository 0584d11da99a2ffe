"""Train and evaluate a classifier on Ray Train: the measurement behind every number.

`train_classifier` checks the inputs, ships the data to N workers (CPU or GPU, decided at
run time), runs `loop.train_worker` under a TorchTrainer whose storage path and name come
from the output directory (so a rerun resumes), then writes `metrics.json`, the final
weights and a confusion-matrix plot beside the checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raypurify.atomic import save_torch, write_json
from raypurify.data.imageset import ImageSet
from raypurify.data.spec import Stream
from raypurify.distributed import check_gpus, fit, use_gpu
from raypurify.errors import DatasetError
from raypurify.estimate import train_rate, warn_if_long_training
from raypurify.models import ARCHS, build_model
from raypurify.runtime import init_ray
from raypurify.tracking import Run
from raypurify.training import data as batches
from raypurify.training.config import TrainConfig
from raypurify.training.loop import ClassifierJob, EvalKey, train_worker
from raypurify.workers import check_one_batch

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"


def check_compatible(train: ImageSet | Stream, test: ImageSet) -> None:
    """The test set must have the train set's classes and image shape."""
    if train.classes != test.classes:
        raise DatasetError(
            f"test set {test.name}: classes {test.classes[:5]}... ({test.num_classes}) differ "
            f"from the train set's {train.classes[:5]}... ({len(train.classes)})"
        )
    if train.shape != test.shape:
        raise DatasetError(
            f"test set {test.name}: images are {'x'.join(map(str, test.shape))}, the train "
            f"set's are {'x'.join(map(str, train.shape))}"
        )


CPU_HINT = (
    "on a CPU use the CPU protocol's recipe `cpu` (ResNet-9, 14 epochs): --recipe cpu, or "
    "--set surrogate_recipe=cpu for a TAP or SEP surrogate"
)


def warn_if_slow_on_cpu(train: ImageSet | Stream, cfg: TrainConfig) -> None:
    """Say once, before it starts, when this training would take hours on this CPU."""

    def rate(classes: int, shape: tuple[int, int, int]) -> float:
        model = build_model(cfg.arch, classes, shape[1], **cfg.arch_options)
        return train_rate(model, classes, shape, 16)

    key = ("classifier", cfg.arch, repr(sorted(cfg.arch_options.items())))
    warn_if_long_training(f"train {cfg.arch}", train, cfg.epochs, rate, CPU_HINT, key)


def train_classifier(
    train: ImageSet | Stream,
    test: ImageSet,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    run: Run | None = None,
    eval_key: EvalKey = "test_acc",
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train `cfg` on `train`, evaluate on `test`; resumable; returns the metrics dict.

    An in-memory `train` set reaches the workers as uint8 tensors through the object store
    (unless `data_path: ray_data`); a `Stream` arrives through Ray Data shards. `eval_key`
    names the per-epoch accuracy on `test` in reports and MLflow: a sweep trial evaluates on
    clean validation rows and calls it `val_accuracy`. `callbacks` go to Ray Train.
    """
    ARCHS.get(cfg.arch, key="arch")
    check_compatible(train, test)
    if isinstance(train, ImageSet) and len(np.unique(train.labels)) < 2:
        raise DatasetError(f"{train.name}: training needs at least 2 classes with images")
    rows = len(train) if isinstance(train, ImageSet) else train.rows
    if rows is not None:
        check_one_batch(rows, cfg.batch_size, cfg.workers, train.name, "batch_size")
    init_ray()
    gpu = use_gpu(cfg.device)
    check_gpus(cfg.workers, gpu)
    if not gpu:
        warn_if_slow_on_cpu(train, cfg)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    eval_rows = None
    if cfg.eval_subset and cfg.eval_subset < len(test):
        eval_rows = np.sort(
            np.random.default_rng(cfg.seed).permutation(len(test))[: cfg.eval_subset]
        )
    shipped, datasets = batches.ship(train, cfg.data_path)
    job = ClassifierJob(
        train=cfg,
        num_classes=len(train.classes),
        image_size=train.shape[0],
        data=shipped,
        test_arrays=ray.put(batches.pack(test)),
        eval_rows=eval_rows,
        eval_key=eval_key,
        mlflow=run,
    )
    fitted = fit(
        train_worker,
        job,
        workers=cfg.workers,
        gpu=gpu,
        storage=out / "checkpoints",
        name="train",
        epochs=cfg.epochs,
        desc=f"train {cfg.arch}",
        datasets=datasets,
        keep=cfg.keep_checkpoints,
        callbacks=callbacks,
    )
    final, state = fitted.metrics, fitted.state
    history = state["history"]
    metrics = {
        "accuracy": final[eval_key],
        # the last epoch's accuracy on its own (augmented) training batches: far above the
        # test accuracy when the training set taught a shortcut
        "train_accuracy": history[-1]["train_acc"],
        "per_class": final["per_class"],
        "confusion": final["confusion"],
        "epochs": final["epoch"],
        "wall_s": time.perf_counter() - start,
        **fitted.split(start),
        "train_s": float(sum(h["epoch_s"] for h in history)),
        "images_per_s": float(np.mean([h["train_images_per_s"] for h in history])),
        "device": "cuda" if gpu else "cpu",
        "workers": cfg.workers,
        "train_rows": shipped.rows,
        "test_rows": len(test),
        "history": history,
        "config": cfg.to_dict(),
    }
    save_torch(out / MODEL_FILE, state["model"])
    write_json(out / METRICS_FILE, metrics)
    if run is not None:
        from raypurify.reports.plots import confusion_figure

        run.log_metrics({"accuracy": metrics["accuracy"], "wall_s": metrics["wall_s"]})
        run.log_figure(confusion_figure(metrics["confusion"], test.classes), "confusion.png")
        run.log_artifact(out / METRICS_FILE)
    return metrics
