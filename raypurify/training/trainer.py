"""Train and evaluate a classifier on Ray Train: the measurement behind every number.

`train_classifier` checks the inputs, ships the data to N workers (CPU or GPU, decided at
run time), runs `worker.train_worker` under a TorchTrainer whose storage path and name come
from the output directory (so a rerun resumes), then writes `metrics.json`, the final
weights and a confusion-matrix plot beside the checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.train.v2.api.config import LoggingConfig

from raypurify.atomic import save_torch, write_json
from raypurify.data.imageset import ImageSet
from raypurify.errors import DatasetError, TrainingError, user_error
from raypurify.models import ARCHS
from raypurify.progress import Progress
from raypurify.runtime import init_ray
from raypurify.tracking import Run
from raypurify.training import data as batches
from raypurify.training.config import TrainConfig
from raypurify.training.worker import CHECKPOINT_FILE, train_worker

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"


def check_compatible(train: ImageSet, test: ImageSet) -> None:
    """The test set must have the train set's classes and image shape."""
    if train.classes != test.classes:
        raise DatasetError(
            f"test set {test.name}: classes {test.classes[:5]}... ({test.num_classes}) differ "
            f"from the train set's {train.classes[:5]}... ({train.num_classes})"
        )
    if train.shape != test.shape:
        raise DatasetError(
            f"test set {test.name}: images are {'x'.join(map(str, test.shape))}, the train "
            f"set's are {'x'.join(map(str, train.shape))}"
        )


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _completed_epochs(out: Path) -> int:
    """Epochs already done by an earlier run in `out` (for the progress bar)."""
    latest = sorted(p for p in (out / "checkpoints" / "train").glob("checkpoint_*") if p.is_dir())
    if not latest:
        return 0
    return int(torch.load(latest[-1] / CHECKPOINT_FILE, weights_only=True)["epoch"])


def use_gpu(cfg: TrainConfig) -> bool:
    if cfg.device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.device == "cuda"


def train_classifier(
    train: ImageSet,
    test: ImageSet,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    run: Run | None = None,
) -> dict[str, Any]:
    """Train `cfg` on `train`, evaluate on `test`; resumable; returns the metrics dict."""
    ARCHS.get(cfg.arch, key="arch")
    check_compatible(train, test)
    if len(np.unique(train.labels)) < 2:
        raise DatasetError(f"{train.name}: training needs at least 2 classes with images")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    start = time.perf_counter()

    eval_rows = None
    if cfg.eval_subset and cfg.eval_subset < len(test):
        eval_rows = np.sort(
            np.random.default_rng(cfg.seed).permutation(len(test))[: cfg.eval_subset]
        )
    loop = {
        "train": cfg.to_dict(),
        "num_classes": train.num_classes,
        "image_size": train.shape[0],
        "train_arrays": ray.put(batches.pack(train)),
        "test_arrays": ray.put(batches.pack(test)),
        "eval_rows": eval_rows,
        "mlflow": None if run is None else {"uri": run.uri, "run_id": run.run_id},
    }
    gpu = use_gpu(cfg)
    done = _completed_epochs(out)
    resources = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(out / "checkpoints"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        with Progress(cfg.epochs, f"train {cfg.arch}", initial=done) as progress:
            loop["progress"] = progress.queue
            result = trainer.fit()
    except Exception as e:
        err = user_error(e)
        if err is not None:
            raise err from None
        raise TrainingError(f"classifier training in {out} failed: {e}") from e

    final = result.metrics
    state = _load_state(result.checkpoint)
    history = state["history"]
    metrics = {
        "accuracy": final["test_acc"],
        "per_class": final["per_class"],
        "confusion": final["confusion"],
        "epochs": final["epoch"],
        "wall_s": time.perf_counter() - start,
        "train_s": float(sum(h["epoch_s"] for h in history)),
        "images_per_s": float(np.mean([h["train_images_per_s"] for h in history])),
        "device": "cuda" if gpu else "cpu",
        "workers": cfg.workers,
        "train_rows": len(train),
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
