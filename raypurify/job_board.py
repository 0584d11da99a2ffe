"""How fits reach a warm worker group (worker_group.py): a job board actor, and the client
any process hands its jobs to it through.

The board holds the group's jobs in order, their outcomes and the reports a fit wants
back. A `GroupClient` is only the board's handle and the group's size, so it travels:
the process that opened the group uses it, and so can a sweep trial's process, to which
the sweep's driver hands its groups (sweeps/groups.py). A trial *claims* a group for its
steps; when the trial ends (ASHA's stop, its process lost), the driver releases its claim,
which cancels its jobs: one still queued never runs, the one in flight stops at its next
epoch's report, before writing a checkpoint (the group then serves the next job).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray

from raypurify.errors import TrainingError

if TYPE_CHECKING:  # the board's process imports this module: not torch with it
    from raypurify.workers import LoopCall


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


# The outcome of a job cancelled before it finished (nobody may be waiting for it).
CANCELLED = ("error", TrainingError("cancelled: its trial ended or its group closed"))


@ray.remote(num_cpus=0)
class JobBoard:
    """Jobs in, outcomes out. A worker asks for the first unfinished job after the last
    one it ran; a restarted group asks from the start, and so gets the job in flight."""

    def __init__(self) -> None:
        self.jobs: dict[int, tuple[str | None, Boxed]] = {}  # seq: (owner, job)
        self.outcomes: dict[int, tuple[str, Any]] = {}
        self.reports: dict[int, list[dict[str, Any]]] = {}
        self.next_seq = 0
        self.running: int | None = None  # the job a worker took last
        self.cancelled: set[int] = set()
        self.owner: str | None = None  # who has claimed the group, if anyone
        self.closed = False
        self.stopped: str | None = None  # why the group's run ended, once it has
        self.up_at: float | None = None  # time.time() a worker first asked for a job
        self.changed = asyncio.Condition()

    async def submit(self, job: Boxed, owner: str | None = None) -> int:
        async with self.changed:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            self.jobs[seq] = (owner, job)
            if self.stopped is not None:
                self.outcomes[seq] = ("error", TrainingError(self.stopped))
            self.changed.notify_all()
            return seq

    async def take(self, after: int) -> tuple[int, Boxed] | None:
        self.up_at = self.up_at or time.time()
        async with self.changed:
            while True:
                waiting = [s for s in sorted(self.jobs) if s > after]
                if waiting:
                    self.running = waiting[0]
                    return waiting[0], self.jobs[waiting[0]][1]
                if self.closed:
                    return None
                await self.changed.wait()

    async def finish(self, seq: int, outcome: tuple[str, Any]) -> None:
        async with self.changed:
            if self.jobs.pop(seq, None) is not None:
                self.outcomes[seq] = CANCELLED if seq in self.cancelled else outcome
            self.cancelled.discard(seq)
            self.changed.notify_all()

    async def is_cancelled(self, seq: int) -> bool:
        return seq in self.cancelled

    async def ready(self) -> float | None:
        """When the group came up (None: not yet)."""
        return self.up_at

    async def alive(self) -> bool:
        return self.stopped is None

    async def report(self, seq: int, metrics: dict[str, Any]) -> None:
        if seq not in self.cancelled:
            self.reports.setdefault(seq, []).append(metrics)

    async def new_reports(self, seq: int) -> list[dict[str, Any]]:
        """Job `seq`'s reports not yet asked for (the fit's thread is their one reader)."""
        return self.reports.pop(seq, [])

    async def outcome(self, seq: int) -> tuple[str, Any]:
        async with self.changed:
            await self.changed.wait_for(lambda: seq in self.outcomes)
            return self.outcomes.pop(seq)

    async def claim(self, owner: str) -> bool:
        """Hold the group for `owner` if no one holds it (or `owner` does already)."""
        if self.owner in (None, owner) and self.stopped is None:
            self.owner = owner
            return True
        return False

    async def release(self, owner: str) -> None:
        """End `owner`'s claim and cancel its jobs (see the module's docstring)."""
        async with self.changed:
            if self.owner == owner:
                self.owner = None
            for seq in [s for s, (o, _) in self.jobs.items() if o == owner]:
                if seq == self.running:
                    self.cancelled.add(seq)
                else:
                    del self.jobs[seq]
                    self.outcomes[seq] = CANCELLED
                self.reports.pop(seq, None)
            self.changed.notify_all()

    async def close(self) -> None:
        """Serve no more: workers end once the job in flight is done (or cancelled)."""
        async with self.changed:
            self.closed = True
            if self.running in self.jobs:
                self.cancelled.add(self.running)
            self.changed.notify_all()

    async def stop(self, reason: str) -> None:
        """The group's run has ended: every job not finished fails with `reason`."""
        async with self.changed:
            self.stopped = reason
            for seq in self.jobs:
                self.outcomes.setdefault(seq, ("error", TrainingError(reason)))
            self.changed.notify_all()


class GroupClient:
    """A warm group as a fit sees it, in any process: hand it jobs (`run`), ask whether it
    is up and hosts a fit's size, and claim it for a sweep trial."""

    def __init__(self, board: Any, workers: int) -> None:
        self.board = board
        self.workers = workers
        self.owner: str | None = None  # the trial that claimed it through this client
        self.up_at: float | None = None  # when it came up, once seen (`ready`)

    def __reduce__(self) -> tuple[Any, ...]:  # what it learnt stays with this process
        return (GroupClient, (self.board, self.workers))

    def ready(self) -> bool:
        """Whether the group's workers have started and wait for jobs."""
        self.up_at = self.up_at or ray.get(self.board.ready.remote())
        return self.up_at is not None

    def alive(self) -> bool:
        """Whether its run goes on (a run out of restarts stops, and hosts nothing more)."""
        return bool(ray.get(self.board.alive.remote()))

    def hosts(self, workers: int, gpu: bool) -> bool:
        return not gpu and workers == self.workers and self.alive()

    def claim(self, owner: str) -> bool:
        if ray.get(self.board.claim.remote(owner)):
            self.owner = owner
            return True
        return False

    def release(self, owner: str) -> None:
        ray.get(self.board.release.remote(owner))

    def run(self, job: Job, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        """Run `job` on the group; return its last reported metrics (or raise its error).

        With `callbacks` (Ray Train UserCallbacks: a sweep trial's Tune report), each
        report of the job reaches their `after_report` in this thread, as a run of its own
        would hand it to them (here without a run context or a checkpoint object)."""
        boxed = [ray.put(job)]  # held here until the outcome, so the ref stays alive
        seq = ray.get(self.board.submit.remote(boxed, self.owner))
        pending = self.board.outcome.remote(seq)
        while True:
            done = bool(ray.wait([pending], timeout=0.5 if job.forward else 1.0)[0])
            if job.forward:
                for metrics in ray.get(self.board.new_reports.remote(seq)):
                    for callback in callbacks:
                        callback.after_report(run_context=None, metrics=[metrics], checkpoint=None)
            if done:
                break
        status, value = ray.get(pending)
        if status == "error":
            raise value
        return value
