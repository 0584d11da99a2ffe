"""Inside Ray Train workers: what every training loop calls (classifiers, D-VAE stages, EM).

Every loop's inputs are a `LoopJob` (a frozen dataclass built and checked in the driver),
and `distributed.fit` adds a `LoopContext` (the driver's progress bar, the checkpoint to
resume from); `loop_entry` is what Ray Train runs. In a loop: `setup_worker` picks the
device and threads, `resume` loads the last checkpoint, `epoch_seed` and
`per_worker_batch` are what every loop derives the same way, and `end_epoch` logs, moves
the bar, reports and checkpoints (report is a barrier). A fit hosted by a warm worker group
(worker_group.py) checkpoints where its own Ray Train run would (`hosting`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import ray
import ray.train
import ray.train.torch
import torch

from raypurify.atomic import save_torch
from raypurify.errors import ConfigError
from raypurify.progress import advance
from raypurify.ray_private import report_logger
from raypurify.runtime import torch_threads
from raypurify.tracking import Run

STATE_FILE = "state.pt"
NODE_TAG = "raypurify.node.rank"  # + rank: the Ray node id a worker of the run ran on


@dataclasses.dataclass
class HostedJob:
    """In a worker of a warm group (worker_group.py): the fit it is running, whose
    checkpoints `report_and_checkpoint` writes to storage/name as the fit's own Ray
    Train run would."""

    storage: Path
    name: str
    keep: int | None
    forward: Callable[[dict[str, Any]], None] | None = None  # rank 0: each report to the fit
    cancelled: Callable[[], bool] | None = None  # whether the fit no longer wants the job
    last_metrics: dict[str, Any] | None = None


_hosted: HostedJob | None = None


class JobCancelled(Exception):
    """A hosted job whose fit no longer wants it (its sweep trial ended) stops here."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopJob:
    """The inputs of one Ray Train loop, built (and so checked) in the driver: each loop
    subclasses it with its own fields, so a misspelt field fails at construction there,
    not inside a worker. `mlflow`: the step's run, which rank 0 logs each epoch to."""

    mlflow: Run | None = None


@dataclasses.dataclass(frozen=True)
class LoopContext:
    """What `fit` hands every loop besides its job: the driver's progress queue and the
    newest readable checkpoint the driver found (an object ref, or None; see `restore`)."""

    progress: Any
    resume_from: Any = None


J = TypeVar("J", bound=LoopJob)


@dataclasses.dataclass(frozen=True)
class LoopCall(Generic[J]):
    """A loop with its job and context: what a Ray Train worker (or a warm group's) runs."""

    loop: Callable[[J, LoopContext], None]
    job: J
    ctx: LoopContext


@contextlib.contextmanager
def hosting(job: HostedJob) -> Iterator[None]:
    global _hosted
    _hosted = job
    try:
        yield
    finally:
        _hosted = None


def setup_worker(threads: int | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); on CPU, `threads` torch threads (default: cores/world)."""
    report_logger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = ray.train.torch.get_device()
    if dev.type == "cpu":
        torch.set_num_threads(torch_threads(threads, world))
    return rank, world, dev


def restore(device: torch.device, on_disk: Any) -> dict[str, Any] | None:
    """The state of the furthest checkpoint of this run, or None on a fresh start.

    A run killed after a checkpoint reached storage but before Ray Train registered it
    resumes from that checkpoint too (`on_disk`: an object ref to the newest readable
    state the driver found, passed by value because Ray Train may delete the unregistered
    directory as it starts), so no finished epoch is trained twice.
    """
    states = [] if on_disk is None else [ray.get(on_disk)]
    if _hosted is not None:  # a hosted job reads its newest checkpoint (also after a restart)
        found = saved_state(_hosted.storage, _hosted.name)
        states += [] if found is None else [found]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            states.append(torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True))
    return max(states, key=lambda s: s["epoch"], default=None)


def resume(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    ctx: LoopContext,
) -> tuple[int, list[dict]]:
    """Load the furthest checkpoint (if any) into the model, optimizer and scheduler.

    Returns (the first epoch still to run, the per-epoch metrics so far).
    """
    state = restore(device, ctx.resume_from)
    if state is None:
        return 0, []
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], list(state["history"])


def snapshot(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    history: list[dict],
) -> dict[str, Any]:
    """What a checkpoint holds: everything `resume` needs, after `epoch` epochs."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "history": history,
    }


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of `rank`'s random draws in `epoch`: different per epoch and rank, the same
    on a rerun, so a resumed run makes the draws the uninterrupted one would have."""
    return seed * 1_000_003 + epoch * 101 + rank


def per_worker_batch(batch_size: int, world: int) -> int:
    """Each worker's share of a global batch (at least 2 rows: BatchNorm needs 2)."""
    return max(2, batch_size // world)


def check_one_batch(rows: int, batch_size: int, workers: int, where: str, key: str) -> None:
    """Refuse, in one line, a training set with no full batch for each worker: the loops
    take full batches only (DDP needs every worker to take the same steps), so it would
    train nothing and still report a result. `key` is the config path of the batch size."""
    if rows // workers >= per_worker_batch(batch_size, workers):
        return
    split = f", split over {workers} workers" if workers > 1 else ""
    raise ConfigError(
        f"{key}: {where} has {rows} rows, fewer than one batch of {batch_size}{split}; "
        f"lower it (--set {key}=N)"
    )


def end_epoch(
    job: LoopJob,
    ctx: LoopContext,
    rank: int,
    step: int,
    metrics: dict[str, Any],
    state: dict[str, Any] | None,
    *,
    bar: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> None:
    """The end of epoch (or round) `step`, the same in every loop: rank 0 logs `metrics`
    to the job's MLflow run and moves the driver's bar (showing `bar`); every rank reports
    `metrics` (with `extra`, which MLflow does not take: lists) and rank 0 checkpoints
    `state` (None: no checkpoint this time)."""
    if rank == 0:
        if job.mlflow is not None:
            job.mlflow.log_metrics(metrics, step=step)
        advance(ctx.progress, step, **bar)
    report_and_checkpoint(metrics | (extra or {}), state, rank)


def report_and_checkpoint(metrics: dict[str, Any], state: dict[str, Any] | None, rank: int) -> None:
    """Report `metrics` from every rank; rank 0 also checkpoints `state` (if given)."""
    if _hosted is not None:
        _checkpoint_hosted(_hosted, metrics, state, rank)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0 and state is not None:
            torch.save(state, Path(tmp) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _checkpoint_hosted(job: HostedJob, metrics: dict, state: dict | None, rank: int) -> None:
    """`report_and_checkpoint` for a hosted job: rank 0 writes the checkpoint under the
    job's run (named and kept as Ray Train would), then every rank waits for it (a
    report is a barrier)."""
    import torch.distributed as dist

    if job.cancelled is not None and job.cancelled():
        raise JobCancelled(f"{job.name}: cancelled before its checkpoint of {metrics}")
    job.last_metrics = metrics
    if rank == 0 and state is not None:
        run_dir = job.storage / job.name
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        save_torch(run_dir / f"checkpoint_{stamp}" / STATE_FILE, state)
        for old in checkpoint_dirs(job.storage, job.name)[: -job.keep if job.keep else 0]:
            shutil.rmtree(old, ignore_errors=True)
    if job.forward is not None:
        job.forward(metrics)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (for saving and for evaluation)."""
    return cast(torch.nn.Module, model.module) if hasattr(model, "module") else model


def loop_entry(config: dict[str, LoopCall]) -> None:
    """Run the loop of `config["call"]` after tagging the step's MLflow run with the Ray
    node of this worker (`raypurify.node.rank<r>`), which shows on a cluster which nodes
    did the work and that each reached the tracking server."""
    call = config["call"]
    rank = ray.train.get_context().get_world_rank()
    if call.job.mlflow is not None:
        node = ray.get_runtime_context().get_node_id()
        call.job.mlflow.set_tags({f"{NODE_TAG}{rank}": node})
    call.loop(call.job, call.ctx)


def checkpoint_dirs(storage: Path, name: str) -> list[Path]:
    """The checkpoints of run `name` under `storage`, oldest first."""
    run_dir = Path(storage) / name
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.exists() else []


def saved_state(storage: Path, name: str) -> dict[str, Any] | None:
    """The newest readable checkpoint's state of run `name` under `storage`, or None.

    A run killed while persisting a checkpoint can leave its directory incomplete; that
    one is skipped.
    """
    for directory in reversed(checkpoint_dirs(storage, name)):
        try:
            return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            continue
    return None
