"""Ray Train glue shared by every trained model (classifiers, D-VAE stages).

Every loop's inputs are a `LoopJob` (a frozen dataclass built and checked in the driver);
`fit` adds a `LoopContext` (the driver's progress bar, the checkpoint to resume from).
Workers: `setup_worker` picks the device and threads, `resume` loads the last checkpoint,
`epoch_seed` and `per_worker_batch` are what every loop derives the same way, and
`end_epoch` logs, moves the bar, reports and checkpoints (report is a barrier). Driver:
`fit` runs a TorchTrainer whose storage path and name are fixed by the caller, so a rerun
resumes, and shows an epoch progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer

from raypurify.atomic import save_torch
from raypurify.errors import ConfigError, TrainingError, user_error
from raypurify.progress import Progress, advance
from raypurify.ray_private import report_logger
from raypurify.runtime import torch_threads
from raypurify.tracking import Run

if TYPE_CHECKING:
    from raypurify.worker_group import WarmGroup

STATE_FILE = "state.pt"
NODE_TAG = "raypurify.node.rank"  # + rank: the Ray node id a worker of the run ran on

# The warm worker group that hosts this driver's fits, if one is open (worker_group.py).
_warm_group: WarmGroup | None = None


@dataclasses.dataclass
class HostedJob:
    """In a worker of a warm group (worker_group.py): the fit it is running, whose
    checkpoints `report_and_checkpoint` writes to storage/name as the fit's own Ray
    Train run would."""

    storage: Path
    name: str
    keep: int | None
    last_metrics: dict[str, Any] | None = None


_hosted: HostedJob | None = None


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


# ---------------------------------------------------------------------------------------
# In the workers


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

    job.last_metrics = metrics
    if rank == 0 and state is not None:
        run_dir = job.storage / job.name
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        save_torch(run_dir / f"checkpoint_{stamp}" / STATE_FILE, state)
        for old in checkpoint_dirs(job.storage, job.name)[: -job.keep if job.keep else 0]:
            shutil.rmtree(old, ignore_errors=True)
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


# ---------------------------------------------------------------------------------------
# In the driver


@contextlib.contextmanager
def serving(group: WarmGroup) -> Iterator[None]:
    """Within this block `fit` hands the fits `group` can host to it (worker_group.py)."""
    global _warm_group
    previous, _warm_group = _warm_group, group
    try:
        yield
    finally:
        _warm_group = previous


def use_gpu(device: str) -> bool:
    """'auto' means: GPU when the cluster has one."""
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return device == "cuda"


def check_gpus(workers: int, gpu: bool) -> None:
    """On a local Ray, refuse more GPU workers than GPUs: Ray Train would wait for them
    forever. (A cluster from RAY_ADDRESS may autoscale GPU nodes in, so it is left to wait.)"""
    if not gpu or os.environ.get("RAY_ADDRESS"):
        return
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < workers:
        raise ConfigError(
            f"workers: {workers} GPU worker(s) need {workers} GPU(s), this machine has {have}; "
            f"set device=cpu or workers={max(have, 1)}"
        )


def check_cpus(workers: int, cpus: float) -> None:
    """On a local Ray, refuse more CPU than it has: Ray Train would retry starting the
    workers forever, silently. (A cluster from RAY_ADDRESS may autoscale, so it waits.)"""
    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources().get("CPU", 0)
    if workers * cpus > have:
        raise ConfigError(
            f"workers: {workers} worker(s) of {cpus:g} CPU need {workers * cpus:g} CPUs, "
            f"this Ray has {have:g}; set workers={max(int(have // cpus), 1)} or start Ray "
            "with more (--num-cpus)"
        )


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


def max_failures() -> int:
    """Restarts of a Ray Train job after a worker or node failure (RAYPURIFY_MAX_FAILURES,
    default 1): each resumes from the last checkpoint. An error in our own code fails the
    same way again, so more retries only delay its message."""
    value = os.environ.get("RAYPURIFY_MAX_FAILURES", "1")
    if not value.isdigit():
        raise ConfigError(f"RAYPURIFY_MAX_FAILURES: {value!r} is not a whole number >= 0")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a Ray Train run left: its last report, its last checkpoint's state, and where
    its wall time went (`split`)."""

    metrics: dict[str, Any]
    state: dict[str, Any]
    work_s: float  # the epochs this run trained (their `epoch_s`), evaluation included
    started_at: float  # perf_counter() when its first epoch began (its return if none ran)

    def split(self, since: float) -> dict[str, float]:
        """Seconds of a step that began at perf_counter() `since` (its data hand-off
        included): `startup_s` before the first epoch, `work_s` in epochs, `overhead_s`
        everything but the epochs (start-up, checkpoints, teardown)."""
        wall = time.perf_counter() - since
        return {
            "startup_s": self.started_at - since,
            "work_s": self.work_s,
            "overhead_s": wall - self.work_s,
        }


def fit(
    loop: Callable[[J, LoopContext], None],
    job: J,
    *,
    workers: int,
    gpu: bool,
    storage: Path,
    name: str,
    epochs: int,
    desc: str,
    datasets: dict[str, Any] | None = None,
    keep: int | None = 2,
    callbacks: list | None = None,
) -> Fitted:
    """Run `loop(job, ctx)` on `workers` Ray Train workers; return its last metrics and state.

    The run lives at storage/name: rerunning with the same pair resumes from its last
    checkpoint; `keep` checkpoints are kept (None: all of them). `callbacks` are Ray Train
    callbacks (a sweep trial passes Tune's report callback, so each epoch reaches Tune).
    Errors the user can act on come back as themselves, not as Ray wrappers.
    """
    check_gpus(workers, gpu)
    previous = saved_state(storage, name)
    cpus = 1.0
    if datasets:  # leave Ray Data a CPU to feed the workers (or it waits forever)
        cpus = min(1.0, max(0.25, (ray.cluster_resources().get("CPU", 1) - 1) / workers))
    check_cpus(workers, cpus)
    resources = {"CPU": cpus, "GPU": 1} if gpu else {"CPU": cpus}
    group = _warm_group
    hosted = not datasets and not callbacks and group is not None and group.hosts(workers, gpu)
    try:
        with Progress(epochs, desc, initial=previous["epoch"] if previous else 0) as progress:
            # A hosted job's worker reads its newest checkpoint from storage itself (see
            # `restore`: also right after a group restart); an own run gets it by value.
            resume_from = None if hosted else previous and ray.put(previous)
            call = LoopCall(loop, job, LoopContext(progress.queue, resume_from))
            if hosted:
                from raypurify.worker_group import Job

                # hosted: group is not None
                metrics = cast("WarmGroup", group).run(Job(call, str(storage), name, keep))
            else:
                trainer = TorchTrainer(
                    loop_entry,
                    train_loop_config={"call": call},
                    datasets=datasets,
                    scaling_config=ray.train.ScalingConfig(
                        num_workers=workers, use_gpu=gpu, resources_per_worker=resources
                    ),
                    # ray.train exports v2's RunConfig at run time; mypy sees v1's.
                    run_config=ray.train.RunConfig(  # type: ignore[call-arg]
                        name=name,
                        storage_path=str(storage),
                        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
                        # A worker or node that dies restarts the run from the last
                        # checkpoint.
                        failure_config=ray.train.FailureConfig(max_failures=max_failures()),
                        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                        callbacks=callbacks,
                    ),
                )
                # Typed Optional; a run that ends with a checkpoint has reported.
                metrics = cast(dict[str, Any], trainer.fit().metrics)
    except Exception as e:
        err = user_error(e)
        if err is not None:
            raise err from None
        raise TrainingError(f"{desc}: training failed ({type(e).__name__}: {e})") from e
    state = saved_state(storage, name)
    if state is None:
        raise TrainingError(f"{desc}: finished without a checkpoint in {storage / name}")
    # Loops that keep a per-epoch history (classifiers, D-VAE stages) say where time went.
    ran = state.get("history", [])[previous["epoch"] if previous else 0 :]
    first = progress.first_update_at
    started = time.perf_counter() if not ran or first is None else first - ran[0]["epoch_s"]
    work = float(sum(h["epoch_s"] for h in ran))
    return Fitted(metrics, state, work, started)
