"""A Ray Train worker group kept warm across the steps of one run.

Each TorchTrainer run starts a controller and N worker processes, which import torch and
this package and join a process group before their first batch: seconds per step on 2
cores, as long as a demo-scale step's whole training (bench/demo.py measures it). Inside
`warm_group(...)`, every `distributed.fit` the group can host runs as a *job* of one
long-lived TorchTrainer run instead. Its workers take jobs from a board actor and call
the same loop with the same job; `workers.report_and_checkpoint` and `restore` see the
job and write each epoch's checkpoint where the step's own run would keep it, so a step
resumes the same way whichever path trained it. A worker or node that dies restarts the
group (Ray Train's failure config) and the job in flight resumes from its last checkpoint.

A group serves one job at a time, taken from its board (job_board.py), which any process
may hand jobs to through the group's client. An experiment opens one group per step it
runs at once (runner.run_experiment; each fit claims a free one, `distributed.claim`),
and where several share the machine their jobs default to an equal share of its cores.
One group serves a purification's two stages (pipeline.purify); a sweep opens one per
trial at once, which its trials claim for their stages and classifier (sweeps/groups.py).
A trial's classifier reports each epoch to Tune: a hosted job sends its reports back
through the board, and the fit hands them to its Ray Train callbacks.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raypurify import distributed
from raypurify.errors import ConfigError, TrainingError
from raypurify.job_board import GroupClient, Job, JobBoard
from raypurify.tracking import open_store, tracking_uri
from raypurify.workers import HostedJob, hosting, loop_entry

# What a hosted worker holds: no CPU (a bundle cannot be all zeros, hence one byte of
# memory), so the Ray Data passes between training steps find every CPU they need (even
# 0.01 CPU held kept a pass's read tasks from starting on 2 CPUs). A job computes with the
# threads `setup_worker` gives it; the runner runs one step per group at once, and its
# CPU budget counts none for the steps groups host (runner.Scheduler.holds).
# Groups are for CPU fits only: a GPU cannot be held at zero, and a worker holding the one
# GPU of a workstation would leave a purification pass's GPU actors (and TAP's, SEP's)
# waiting forever.
IDLE_RESOURCES = {"CPU": 0, "memory": 1}


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (to reach the driver), else a TrainingError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return TrainingError(f"{type(error).__name__}: {error}")


def _forwarder(board: Any, seq: int) -> Callable[[dict[str, Any]], None]:
    """Rank 0's hand-off of job `seq`'s reports to the board; each waits for the board, so
    every report is there before the job's outcome."""

    def forward(metrics: dict[str, Any]) -> None:
        ray.get(board.report.remote(seq, metrics))

    return forward


def _cancelled(board: Any, seq: int) -> Callable[[], bool]:
    """Whether job `seq` has been cancelled, asked at each of its reports."""

    def cancelled() -> bool:
        return bool(ray.get(board.is_cancelled.remote(seq)))

    return cancelled


# What a fresh worker's first job would import and open before its first epoch: the jobs'
# loops (unpickling a job imports its loop's module), the defences a classifier's loss
# reads, torch._dynamo (which an optimizer's first construction imports) and MLflow's
# store (each job tags its run with the worker's node). Done while the group waits for its
# first job, they were 3.5 s of a first classifier job's 6 s of start-up on 2 cores.
PRELOAD = (
    "raypurify.training.loop",
    "raypurify.defenses",
    "raypurify.defenses.dvae.stage",
    "raypurify.attacks.em",
    "torch._dynamo",
)


def _preload(uri: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    open_store(uri)


def _serve(config: dict[str, Any]) -> None:
    """A hosted worker's loop: run jobs from the board until it closes."""
    if config["threads"]:  # a job's own `threads`, or RAYPURIFY_THREADS, still wins
        os.environ.setdefault("RAYPURIFY_THREADS", str(config["threads"]))
    _preload(config["tracking_uri"])
    board = config["board"]
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    after = -1
    while (taken := ray.get(board.take.remote(after))) is not None:
        seq, (ref,) = taken
        try:
            job: Job = ray.get(ref)  # lost if the process that submitted it died
            forward = _forwarder(board, seq) if job.forward and rank == 0 else None
            hosted = HostedJob(
                Path(job.storage),
                job.name,
                job.keep,
                forward=forward,
                cancelled=_cancelled(board, seq),
            )
            with hosting(hosted):
                loop_entry({"call": job.call})
        except Exception as e:
            ray.get(board.finish.remote(seq, ("error", _portable(e))))
            if world > 1:  # the other ranks may wait in a collective: restart the group
                raise
        else:
            if rank == 0:
                ray.get(board.finish.remote(seq, ("ok", hosted.last_metrics)))
        after = seq


class WarmGroup(GroupClient):
    """The owner's side: a TorchTrainer run serving jobs, in a background thread. Its run
    lives at storage/name; `threads` is its jobs' default torch threads per worker (None:
    the machine's cores shared among the workers, as in a run of their own). With `after`,
    the run starts once that group is up (or has stopped). `client()` is what another
    process (a sweep trial) uses it through."""

    def __init__(
        self,
        workers: int,
        storage: Path,
        name: str = "warm-group",
        threads: int | None = None,
        after: WarmGroup | None = None,
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # ray.remote's stubs keep the class type; it is an ActorClass with .options.
        super().__init__(JobBoard.options(scheduling_strategy=here).remote(), workers)  # type: ignore[attr-defined]
        self.trainer = TorchTrainer(
            _serve,
            train_loop_config={
                "board": self.board,
                "tracking_uri": tracking_uri(),
                "threads": threads,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker=IDLE_RESOURCES
            ),
            # ray.train exports v2's RunConfig at run time, mypy sees v1's (no logging_config).
            run_config=ray.train.RunConfig(  # type: ignore[call-arg]
                name=name,
                storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=distributed.max_failures()),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        self.error: BaseException | None = None
        self.opened = time.time()
        self.started_at: float | None = None  # its run began (after `after` came up)
        self.after = after
        self.stopped = threading.Event()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._fit, daemon=True, name="warm-group")
        self.thread.start()

    def _fit(self) -> None:
        try:
            while self.after is not None and self.after.alive() and not self.after.ready():
                if self.closing.wait(0.2):
                    return
            self.started_at = time.time()
            self.trainer.fit()
        except BaseException as e:  # reported to the job that waits, and to later fits
            self.error = e
        finally:
            self.stopped.set()
            with contextlib.suppress(Exception):  # the board is gone once closed
                ray.get(self.board.stop.remote(f"the warm worker group stopped: {self.error}"))

    def client(self) -> GroupClient:
        return GroupClient(self.board, self.workers)

    def start_s(self) -> float | None:
        """Seconds from opening the group to its workers asking for a first job."""
        if not self.ready():
            return None
        return cast(float, self.up_at) - self.opened

    def alive(self) -> bool:
        return not self.stopped.is_set()

    def close(self) -> None:
        self.closing.set()
        ray.get(self.board.close.remote())
        self.thread.join(timeout=60)
        ray.kill(self.board)


@contextlib.contextmanager
def warm_group(
    workers: int, storage: Path, count: int = 1, at_once: int | None = None
) -> Iterator[list[WarmGroup]]:
    """Within this block, `distributed.fit` runs the CPU fits of `workers` workers on `count`
    warm groups, each fit on a free one; the others start their own Ray Train run. Groups
    that share the machine give their jobs an equal share of its cores.

    At most `at_once` groups start at a time, the next as soon as one is up (default: one
    per two cores). A start keeps about a core busy for seconds (Ray Train starts its
    controller and workers one after another, each importing torch); on 2 cores two starts
    side by side took twice as long as one (docs/RESULTS.md), so the first step waited for
    both. One after another, the first group serves the longest step while the next starts.
    """
    if count == 1:
        groups = [WarmGroup(workers, storage)]
    else:
        threads = max(1, (os.cpu_count() or 1) // (count * workers))
        at_once = at_once or max(1, (os.cpu_count() or 1) // 2)
        groups = []
        for i in range(count):
            after = groups[i - at_once] if i >= at_once else None
            groups.append(WarmGroup(workers, storage, f"warm-group-{i}", threads, after))
    with distributed.serving(*groups):
        try:
            yield groups
        finally:
            for group in reversed(groups):  # one still waiting for another stops waiting first
                group.close()


def groups_allowed(device: str) -> bool:
    """Whether fits on `device` may run on warm groups here: on CPUs (`device` does not
    resolve to a GPU; see IDLE_RESOURCES) of a local Ray (a cluster's fits start their own
    runs, as they are sized for it), unless RAYPURIFY_WARM_GROUP=0 turns groups off (to
    compare, or to rule them out)."""
    switch = os.environ.get("RAYPURIFY_WARM_GROUP", "1")
    if switch not in ("0", "1"):
        raise ConfigError(f"RAYPURIFY_WARM_GROUP: {switch!r} is not 0 or 1")
    return switch == "1" and not os.environ.get("RAY_ADDRESS") and not distributed.use_gpu(device)


def warm_workers(
    workers: int, device: str, storage: Path, wanted: bool = True, count: int = 1
) -> contextlib.AbstractContextManager[list[WarmGroup] | None]:
    """`count` warm groups for the fits that follow, where they pay: `wanted` by the caller,
    `groups_allowed`, none already open in this process, in the main thread of a driver
    (not a step running in a runner's thread; a sweep trial opens its group itself, as its
    driver decided)."""
    if (
        not wanted
        or not groups_allowed(device)
        or distributed.serving_groups()
        or threading.current_thread() is not threading.main_thread()
        or ray.get_runtime_context().get_actor_id() is not None
    ):
        return contextlib.nullcontext()
    return warm_group(workers, storage, count)
