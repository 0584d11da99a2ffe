"""The driver's side of Ray Train, shared by every trained model (classifiers, D-VAE
stages, EM): `fit` runs a loop (workers.py) as a TorchTrainer whose storage path and name
are fixed by the caller, so a rerun resumes, and shows an epoch progress bar; inside
`serving(groups)` it hands each fit it can to a free warm worker group instead. The
resource checks refuse, in one line, what a local Ray would wait for forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raypurify.errors import ConfigError, TrainingError, user_error
from raypurify.progress import Progress
from raypurify.workers import J, LoopCall, LoopContext, loop_entry, saved_state

if TYPE_CHECKING:
    from raypurify.job_board import GroupClient

# The warm worker groups that host this driver's fits, if any are open (worker_group.py);
# each hosts one fit at a time, claimed by the step thread that runs it.
_warm_groups: tuple[GroupClient, ...] = ()
_busy: set[GroupClient] = set()  # the groups hosting a fit now
_claims = threading.Lock()
T = TypeVar("T")


@contextlib.contextmanager
def serving(*groups: GroupClient) -> Iterator[None]:
    """Within this block `fit` hands the fits `groups` can host to a free one of them."""
    global _warm_groups
    previous, _warm_groups = _warm_groups, groups
    try:
        yield
    finally:
        _warm_groups = previous


def serving_groups() -> tuple[GroupClient, ...]:
    """The warm groups this process's fits are handed to (none if none is open)."""
    return _warm_groups


@contextlib.contextmanager
def claim(workers: int, gpu: bool) -> Iterator[GroupClient | None]:
    """A free warm group that hosts a fit of `workers` workers, held for this block, one
    that is up before one still starting; None if none does (the fit starts its own run)."""
    with _claims:
        free = [g for g in _warm_groups if g not in _busy and g.hosts(workers, gpu)]
        group = next((g for g in free if g.ready()), free[0] if free else None)
        if group is not None:
            _busy.add(group)
    try:
        yield group
    finally:
        if group is not None:
            with _claims:
                _busy.discard(group)


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


def off_main_thread(run: Callable[[], T]) -> T:
    """`run()` in a helper thread while this one waits, so that Ctrl-C reaches the caller as
    KeyboardInterrupt. Called from the main thread, a TorchTrainer's fit installs Ray
    Train's own SIGINT handler, which aborts the run and exits with status 0 or 1 and no
    message (or was seen to let the run go on to its end), and stays installed after the
    fit; called from another thread (a Tune trial, a warm group) it installs none. An
    interrupted run's workers stop with the driver; a rerun resumes from its last
    checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        return run()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run()
        except BaseException as e:  # raised again in the waiting thread
            outcome["error"] = e

    helper = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])


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
    callbacks (a sweep trial passes Tune's report callback, so each epoch reaches Tune); a
    fit hosted by a warm group hands them each report too (job_board.GroupClient.run).
    Errors the user can act on come back as themselves, not as Ray wrappers.
    """
    check_gpus(workers, gpu)
    previous = saved_state(storage, name)
    cpus = 1.0
    if datasets:  # leave Ray Data a CPU to feed the workers (or it waits forever)
        cpus = min(1.0, max(0.25, (ray.cluster_resources().get("CPU", 1) - 1) / workers))
    check_cpus(workers, cpus)
    resources = {"CPU": cpus, "GPU": 1} if gpu else {"CPU": cpus}
    # A fit that streams Ray Data datasets starts its own run: its data needs Ray Train.
    host = contextlib.nullcontext(None) if datasets else claim(workers, gpu)
    try:
        initial = previous["epoch"] if previous else 0
        with host as group, Progress(epochs, desc, initial=initial) as progress:
            # A hosted job's worker reads its newest checkpoint from storage itself (see
            # `restore`: also right after a group restart); an own run gets it by value.
            resume_from = None if group is not None else previous and ray.put(previous)
            call = LoopCall(loop, job, LoopContext(progress.queue, resume_from))
            if group is not None:
                from raypurify.job_board import Job

                job = Job(call, str(storage), name, keep, forward=bool(callbacks))
                metrics = group.run(job, callbacks or ())
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
                metrics = cast(dict[str, Any], off_main_thread(trainer.fit).metrics)
    except Exception as e:
        err = user_error(e)
        if err is not None:
            raise err from None
        raise TrainingError(f"{desc}: training failed ({type(e).__name__}: {e})") from e
    state = saved_state(storage, name)
    if state is None:
        raise TrainingError(f"{desc}: finished without a checkpoint in {storage / name}")
    # Loops that keep a per-epoch history (classifiers, D-VAE stages) say where time went.
    ran = state.get("history", [])[initial:]
    first = progress.first_update_at
    started = time.perf_counter() if not ran or first is None else first - ran[0]["epoch_s"]
    work = float(sum(h["epoch_s"] for h in ran))
    return Fitted(metrics, state, work, started)
