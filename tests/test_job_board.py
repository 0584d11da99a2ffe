"""The job board a warm group serves from (job_board.py): claims, cancellation, closing
and a stopped group, on a real board actor (no Ray Train run: a test takes and finishes
jobs as a group's worker would)."""

from __future__ import annotations

import ray

from raypurify.errors import TrainingError
from raypurify.job_board import GroupClient, JobBoard
from raypurify.sweeps.groups import claimed


def job() -> list:
    return [ray.put("a job")]


def failed_with(outcome: tuple, text: str) -> bool:
    status, error = outcome
    return status == "error" and isinstance(error, TrainingError) and text in str(error)


def test_a_group_is_held_by_one_trial_at_a_time(ray_session):
    board = JobBoard.remote()
    assert ray.get(board.claim.remote("a"))
    assert ray.get(board.claim.remote("a"))  # a restarted trial finds its own claim
    assert not ray.get(board.claim.remote("b"))
    ray.get(board.release.remote("b"))  # not b's to release
    assert not ray.get(board.claim.remote("b"))
    ray.get(board.release.remote("a"))
    assert ray.get(board.claim.remote("b"))


def test_releasing_a_trial_cancels_its_jobs_and_no_one_elses(ray_session):
    """Its queued job never runs; the one in flight is flagged for its next report, and
    its outcome, whatever the worker reports, is the cancellation."""
    board = JobBoard.remote()
    running = ray.get(board.submit.remote(job(), "a"))
    queued = ray.get(board.submit.remote(job(), "a"))
    other = ray.get(board.submit.remote(job(), "b"))
    taken, _ = ray.get(board.take.remote(-1))
    assert taken == running

    ray.get(board.release.remote("a"))
    assert ray.get(board.is_cancelled.remote(running))
    assert not ray.get(board.is_cancelled.remote(other))
    assert failed_with(ray.get(board.outcome.remote(queued)), "cancelled")
    ray.get(board.finish.remote(running, ("ok", {"epoch": 1})))
    assert failed_with(ray.get(board.outcome.remote(running)), "cancelled")
    following, _ = ray.get(board.take.remote(running))
    assert following == other  # the cancelled queued job is skipped


def test_closing_cancels_the_job_in_flight_and_ends_the_workers(ray_session):
    board = JobBoard.remote()
    seq = ray.get(board.submit.remote(job()))
    ray.get(board.take.remote(-1))
    ray.get(board.close.remote())
    assert ray.get(board.is_cancelled.remote(seq))
    ray.get(board.finish.remote(seq, ("ok", {})))
    assert ray.get(board.take.remote(seq)) is None


def test_a_stopped_group_fails_what_waits_and_what_comes_and_cannot_be_claimed(ray_session):
    board = JobBoard.remote()
    waiting = ray.get(board.submit.remote(job()))
    ray.get(board.stop.remote("the warm worker group stopped: out of restarts"))
    assert failed_with(ray.get(board.outcome.remote(waiting)), "out of restarts")
    later = ray.get(board.submit.remote(job()))
    assert failed_with(ray.get(board.outcome.remote(later)), "out of restarts")
    assert not ray.get(board.alive.remote())
    assert not ray.get(board.claim.remote("a"))


def test_a_trial_claims_a_free_group_for_its_steps_and_gives_it_back(ray_session):
    groups = [GroupClient(JobBoard.remote(), 1) for _ in range(2)]
    with claimed(groups, "a") as first, claimed(groups, "b") as second:
        assert (first, second) == (groups[0], groups[1])
        with claimed(groups, "c") as third:
            assert third is None  # both held: its fits start runs of their own
    with claimed(groups, "c") as again:
        assert again is groups[0]
