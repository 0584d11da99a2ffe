"""Progress bars in the driver for work that runs in Ray workers.

A worker cannot draw on the user's terminal, so rank 0 puts a small update on a Ray queue
after each unit of work (an epoch, a batch of images) and a driver thread moves a tqdm bar.
The queue is an actor, so this works across the nodes of a cluster as it does locally.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any

from tqdm import tqdm

# Which terminal line a thread's bars use (the experiment runner gives each step a slot).
_SLOT: contextvars.ContextVar[int | None] = contextvars.ContextVar("bar_slot", default=None)


@contextlib.contextmanager
def bar_slot(slot: int):
    token = _SLOT.set(slot)
    try:
        yield
    finally:
        _SLOT.reset(token)


class Progress:
    """`with Progress(total, desc) as p:` pass `p.queue` to workers, which call `advance`."""

    def __init__(self, total: int, desc: str, unit: str = "epoch", initial: int = 0):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.queue = None

    def __enter__(self) -> Progress:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: the queue must outlive a worker node that dies mid-job.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except Exception:  # queue.Empty on timeout, or the actor is gone
                if self.queue is None:
                    return
                continue
            if item is None:
                return
            n, postfix, relative = item
            if relative:  # several actors each add what they did
                self._bar.n += n
            else:  # absolute position (a resumed run starts where it left off)
                self._bar.n = n
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def __exit__(self, *exc) -> None:
        try:
            self.queue.put(None)
            self._thread.join(timeout=5)
        finally:
            self._bar.close()
            self.queue.shutdown()
            self.queue = None


def advance(queue, position: int, **postfix: Any) -> None:
    """Called in a worker: move the driver's bar to `position` (no-op without a queue)."""
    if queue is not None:
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
        queue.put_nowait((position, shown, False))


def add(queue, count: int) -> None:
    """Called in a worker or actor: add `count` units to the driver's bar."""
    if queue is not None:
        queue.put_nowait((count, None, True))
