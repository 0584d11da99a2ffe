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

A group serves one job at a time. An experiment opens one group per step it runs at once
(runner.run_experiment; each fit claims a free one, `distributed.claim`), and where
several share the machine their jobs default to an equal share of its cores. One group
serves a purification's two stages (pipeline.purify) and a sweep trial's stages and
classifier (sweeps/trial.py). A trial's classifier reports each epoch to Tune: a hosted
job sends its reports back through the board, and the fit hands them to its Ray Train
callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raypurify import distributed
from raypurify.errors import ConfigError, TrainingError
from raypurify.tracking import open_store, tracking_uri
from raypurify.workers import HostedJob, LoopCall, hosting, loop_entry

# What a hosted worker holds: no CPU (a bundle cannot be all zeros, hence one byte of
# memory), so the Ray Data passes between training steps find every CPU they need (even
# 0.01 CPU held kept a pass's read tasks from starting on 2 CPUs). A job computes with the
# threads `setup_worker` gives it; the runner runs one step per group at once, and its
# CPU budget counts none for the steps groups host (runner.Scheduler.holds).
# Groups are for CPU fits only: a GPU cannot be held at zero, and a worker holding the one
# GPU of a workstation would leave a purification pass's GPU actors (and TAP's, SEP's)
# waiting forever.
IDLE_RESOURCES = {"CPU": 0, "memory": 1}


@dataclasses.dataclass(frozen=True)
class Job:
    """One `fit` as the group runs it: the loop with its job, and where its run lives."""

    call: LoopCall
    storage: str
    name: str
    keep: int | None
    forward: bool = False  # send each report back to the fit (for its callbacks)


# A job as the board holds it: the object ref of the Job, in a list so that Ray hands the
# ref on instead of the Job. The board never unpickles a job, which would import its loop's
# modules (torch among them) into the board's process: 2.3 s of the first job's start on
# 2 cores.
Boxed = list[ray.ObjectRef]


@ray.remote(num_cpus=0)
class JobBoard:
    """Jobs in, outcomes out. A worker asks for the first unfinished job after the last
    one it ran; a restarted group asks from the start, and so gets the job in flight."""

    def __init__(self) -> None:
        self.jobs: dict[int, Boxed] = {}
        self.outcomes: dict[int, tuple[str, Any]] = {}
        self.reports: dict[int, list[dict[str, Any]]] = {}
        self.next_seq = 0
        self.closed = False
        self.up_at: float | None = None  # time.time() a worker first asked for a job
        self.changed = asyncio.Condition()

    async def submit(self, job: Boxed) -> int:
        async with self.changed:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            self.jobs[seq] = job
            self.changed.notify_all()
            return seq

    async def take(self, after: int) -> tuple[int, Boxed] | None:
        self.up_at = self.up_at or time.time()
        async with self.changed:
            while True:
                waiting = [s for s in sorted(self.jobs) if s > after]
                if waiting:
                    return waiting[0], self.jobs[waiting[0]]
                if self.closed:
                    return None
                await self.changed.wait()

    async def finish(self, seq: int, outcome: tuple[str, Any]) -> None:
        async with self.changed:
            if self.jobs.pop(seq, None) is not None:
                self.outcomes[seq] = outcome
            self.changed.notify_all()

    async def ready(self) -> float | None:
        """When the group came up (None: not yet)."""
        return self.up_at

    async def report(self, seq: int, metrics: dict[str, Any]) -> None:
        self.reports.setdefault(seq, []).append(metrics)

    async def new_reports(self, seq: int) -> list[dict[str, Any]]:
        """Job `seq`'s reports not yet asked for (the fit's thread is their one reader)."""
        return self.reports.pop(seq, [])

    async def outcome(self, seq: int) -> tuple[str, Any]:
        async with self.changed:
            await self.changed.wait_for(lambda: seq in self.outcomes)
            return self.outcomes.pop(seq)

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()


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
        job: Job = ray.get(ref)
        forward = _forwarder(board, seq) if job.forward and rank == 0 else None
        hosted = HostedJob(Path(job.storage), job.name, job.keep, forward=forward)
        try:
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


class WarmGroup:
    """The driver's side: a TorchTrainer run serving jobs, in a background thread. Its run
    lives at storage/name; `threads` is its jobs' default torch threads per worker (None:
    the machine's cores shared among the workers, as in a run of their own). With `after`,
    the run starts once that group is up (or has stopped)."""

    def __init__(
        self,
        workers: int,
        storage: Path,
        name: str = "warm-group",
        threads: int | None = None,
        after: WarmGroup | None = None,
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.workers = workers
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # ray.remote's stubs keep the class type; it is an ActorClass with .options.
        self.board = JobBoard.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
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
        self.up_at: float | None = None  # when it came up, once seen (`ready`)
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

    def ready(self) -> bool:
        """Whether the group's workers have started and wait for jobs."""
        self.up_at = self.up_at or ray.get(self.board.ready.remote())
        return self.up_at is not None

    def start_s(self) -> float | None:
        """Seconds from opening the group to its workers asking for a first job."""
        if not self.ready():
            return None
        return cast(float, self.up_at) - self.opened

    def alive(self) -> bool:
        """Whether its run goes on (a run out of restarts stops, and hosts nothing more)."""
        return not self.stopped.is_set()

    def hosts(self, workers: int, gpu: bool) -> bool:
        return self.alive() and not gpu and workers == self.workers

    def run(self, job: Job, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        """Run `job` on the group; return its last reported metrics (or raise its error).

        With `callbacks` (Ray Train UserCallbacks: a sweep trial's Tune report), each
        report of the job reaches their `after_report` in this thread, as a run of its own
        would hand it to them (here without a run context or a checkpoint object)."""
        boxed = [ray.put(job)]  # held here until the outcome, so the ref stays alive
        seq = ray.get(self.board.submit.remote(boxed))
        pending = self.board.outcome.remote(seq)
        while True:
            done = bool(ray.wait([pending], timeout=0.5 if job.forward else 1.0)[0])
            if job.forward:
                for metrics in ray.get(self.board.new_reports.remote(seq)):
                    for callback in callbacks:
                        callback.after_report(run_context=None, metrics=[metrics], checkpoint=None)
            if done:
                break
            if self.stopped.is_set():
                raise TrainingError(f"the warm worker group stopped: {self.error}")
        status, value = ray.get(pending)
        if status == "error":
            raise value
        return value

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
