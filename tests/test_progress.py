"""Progress bars fed by workers through a Ray queue actor, handed from bar to bar."""

from __future__ import annotations

import time

from raypurify.progress import Progress, add, advance


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_finished_bar_hands_its_queue_on_and_its_late_updates_move_no_other(ray_session):
    with Progress(3, "first") as first:
        advance(first.queue, 2, loss=0.5)
        assert wait_for(lambda: first._bar.n == 2)
        earlier = first.queue
    assert first.first_count == 2 and first.first_update_at is not None
    with Progress(100, "second", unit="img") as second:
        assert second.queue.queue is earlier.queue  # no new actor to start
        add(earlier, 50)  # a straggler of the first bar
        add(second.queue, 7)
        assert wait_for(lambda: second._bar.n == 7)
        time.sleep(0.5)
        assert second._bar.n == 7 and second.first_count == 7
