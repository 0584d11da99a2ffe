"""Progress bars in the driver for work that runs in Ray workers.

A worker cannot draw on the user's terminal, so rank 0 puts a small update on a Ray queue
after each unit of work (an epoch, a batch of images) and a driver thread moves a tqdm bar.
The queue is an actor, so this works across the nodes of a cluster as it does locally.
Finished bars hand their queue actor to the next bar (an actor is a process to start, on
the path of a step's first update); each bar reads only the updates stamped with its own
token, so a late update of an earlier bar cannot move it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from tqdm import tqdm

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ray.util.queue import Queue

# Which terminal line a thread's bars use (the experiment runner gives each step a slot).
_SLOT: contextvars.ContextVar[int | None] = contextvars.ContextVar("bar_slot", default=None)


@contextlib.contextmanager
def bar_slot(slot: int) -> Iterator[None]:
    token = _SLOT.set(slot)
    try:
        yield
    finally:
        _SLOT.reset(token)


@dataclasses.dataclass(frozen=True)
class BarQueue:
    """What workers get: the queue actor and the bar's token for their updates."""

    queue: Any  # ray.util.queue.Queue
    token: int


_tokens = itertools.count()
_idle_queues: dict[str, list] = {}  # per Ray job: queue actors of finished bars
_idle_lock = threading.Lock()


def _queue() -> Queue:
    """A queue actor on the driver's node (it must outlive a worker node that dies mid-job):
    a finished bar's, or a new one."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = ray.get_runtime_context().get_job_id()
    with _idle_lock:
        idle = _idle_queues.setdefault(job, [])
        if idle:
            return idle.pop()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _release(queue: Queue) -> None:
    import ray

    with _idle_lock:
        _idle_queues.setdefault(ray.get_runtime_context().get_job_id(), []).append(queue)


class Progress:
    """`with Progress(total, desc) as p:` pass `p.queue` to workers, which call `advance`."""

    def __init__(self, total: int, desc: str, unit: str = "epoch", initial: int = 0):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.queue: BarQueue | None = None
        # When the first update arrived (perf_counter(), None before) and what it counted:
        # where a step's start-up ends, for the start-up vs work split in its summary.
        self.first_update_at: float | None = None
        self.first_count = 0

    def __enter__(self) -> Progress:
        self.queue = BarQueue(_queue(), next(_tokens))
        slot = _SLOT.get()
        self._bar = tqdm(
            total=self.total,
            desc=self.desc,
            unit=self.unit,
            initial=self.initial,
            position=slot,
            leave=slot is None,
        )
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        mine = cast(BarQueue, self.queue)  # set in __enter__; self.queue is None once closed
        while True:
            try:
                token, update = mine.queue.get(timeout=1.0)
            except Exception:  # queue.Empty on timeout, or the actor is gone
                if self.queue is None:
                    return
                continue
            if token != mine.token:  # a late update of an earlier bar on this queue
                continue
            if update is None:
                return
            n, postfix, relative = update
            if self.first_update_at is None:
                self.first_update_at, self.first_count = time.perf_counter(), n
            if relative:  # several actors each add what they did
                self._bar.n += n
            else:  # absolute position (a resumed run starts where it left off)
                self._bar.n = n
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        mine = cast(BarQueue, self.queue)  # set in __enter__
        try:
            mine.queue.put((mine.token, None))
            self._thread.join(timeout=5)
        finally:
            self._bar.close()
            self.queue = None
            if self._thread.is_alive():  # still reading: not safe to hand on
                mine.queue.shutdown()
            else:
                _release(mine.queue)


def advance(queue: BarQueue | None, position: int, **postfix: Any) -> None:
    """Called in a worker: move the driver's bar to `position` (no-op without a queue)."""
    if queue is not None:
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
        queue.queue.put_nowait((queue.token, (position, shown, False)))


def add(queue: BarQueue | None, count: int) -> None:
    """Called in a worker or actor: add `count` units to the driver's bar."""
    if queue is not None:
        queue.queue.put_nowait((queue.token, (count, None, True)))
