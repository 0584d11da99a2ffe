"""Warm worker groups: fits run as jobs of long-lived Ray Train runs (real Ray). The tests
of a group's serving share the session's group (conftest's `warm_fits`), as a table's steps
share the runner's; the tests of a group's own start, restart and sizing open their own."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import ray.train

from raypurify import distributed
from raypurify.distributed import fit
from raypurify.errors import TrainingError
from raypurify.worker_group import warm_group
from raypurify.workers import LoopContext, LoopJob, checkpoint_dirs, saved_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpochsJob(LoopJob):
    epochs: int
    fail: str | None = None
    kill_after: int | None = None
    marker: str | None = None
    sleep_s: float = 0.0  # per epoch


def epochs_loop(job: EpochsJob, ctx: LoopContext) -> None:
    """A loop of `epochs` empty epochs that reports the worker's pid; it raises `fail`, and
    kills its own process after epoch `kill_after` once (leaving its pid in `marker`)."""
    import os
    import signal
    import time

    import ray.train

    from raypurify.errors import TrainingError
    from raypurify.workers import report_and_checkpoint, restore

    if job.fail:
        raise TrainingError(job.fail)
    rank = ray.train.get_context().get_world_rank()
    state = restore(None, ctx.resume_from)
    start, history = (state["epoch"], state["history"]) if state else (0, [])
    for epoch in range(start, job.epochs):
        t0 = time.perf_counter()
        time.sleep(job.sleep_s)
        history = [*history, {"epoch": epoch + 1, "epoch_s": time.perf_counter() - t0}]
        metrics = {"epoch": epoch + 1, "pid": os.getpid()}
        report_and_checkpoint(metrics, {"epoch": epoch + 1, "history": history}, rank)
        marker = job.marker
        if epoch + 1 == job.kill_after and marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeetJob(LoopJob):
    meet: str  # a folder where two jobs each leave a file and wait for the other's


def meet_loop(job: MeetJob, ctx: LoopContext) -> None:
    """One epoch that reports whether another job reached the same point while this one
    waited (up to 2 minutes), its pid and its torch threads."""
    import os
    import time
    from pathlib import Path

    from raypurify.runtime import torch_threads
    from raypurify.workers import report_and_checkpoint

    here = Path(job.meet)
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(here.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    met = len(list(here.iterdir())) == 2
    metrics = {"epoch": 1, "pid": os.getpid(), "met": met, "threads": torch_threads()}
    report_and_checkpoint(metrics, {"epoch": 1, "history": []}, 0)


# Pickled by value: the workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(tmp_path, name: str, epochs: int, callbacks=None, loop=epochs_loop, **extra):
    return fit(
        loop,
        EpochsJob(epochs=epochs, **extra),
        workers=1,
        gpu=False,
        storage=tmp_path,
        name=name,
        epochs=epochs,
        desc=name,
        callbacks=callbacks,
    )


def test_fits_in_a_warm_group_share_one_worker_and_keep_their_checkpoints(warm_fits, tmp_path):
    first = run(tmp_path, "first", epochs=3)
    second = run(tmp_path, "second", epochs=2)
    # Another worker count than the group's: the fit starts its own Ray Train run.
    assert not warm_fits.hosts(2, False)
    assert first.metrics["epoch"] == 3 and second.metrics["epoch"] == 2
    assert first.metrics["pid"] == second.metrics["pid"] != os.getpid()
    # Checkpoints land where each fit's own run would keep them, the newest `keep` (2).
    assert len(checkpoint_dirs(tmp_path, "first")) == 2
    assert saved_state(tmp_path, "first")["epoch"] == 3
    assert [h["epoch"] for h in first.state["history"]] == [1, 2, 3]
    # Outside the group the same fit resumes from those checkpoints: nothing left to train.
    with distributed.serving():
        again = run(tmp_path, "first", epochs=3)
    assert again.state["epoch"] == 3 and again.work_s == 0


@ray.remote(num_cpus=0)
def fit_elsewhere(client, tmp_path, name: str, epochs: int, owner: str, sleep_s: float = 0.0):
    """In another process (as a sweep trial's): claim the group through its client and
    fit on it."""
    from raypurify import distributed

    assert client.claim(owner)
    with distributed.serving(client):
        return run(tmp_path, name, epochs, sleep_s=sleep_s).metrics


def test_a_process_that_holds_a_groups_client_fits_on_it(warm_fits, tmp_path):
    """A sweep trial's process gets the driver's groups as clients: its fits are jobs of
    the driver's group, checkpointed where their own runs would be."""
    client = warm_fits.client()
    try:
        metrics = ray.get(fit_elsewhere.remote(client, tmp_path, "elsewhere", 2, "t1"))
        here = run(tmp_path, "here", epochs=1)
    finally:
        warm_fits.release("t1")
    assert metrics["epoch"] == 2 and metrics["pid"] == here.metrics["pid"]
    assert saved_state(tmp_path, "elsewhere")["epoch"] == 2
    assert not (tmp_path / "elsewhere" / "checkpoint_manager_snapshot.json").exists()


def test_a_released_claim_stops_its_job_before_the_next_checkpoint(warm_fits, tmp_path):
    """What the sweep's driver does when ASHA stops a trial: the trial's job in flight
    stops at its next report without writing it, its fit fails as cancelled, and the
    group serves the next job."""
    slow = fit_elsewhere.remote(warm_fits.client(), tmp_path, "slow", 200, "t1", sleep_s=0.2)
    try:
        deadline = time.monotonic() + 120
        while (saved_state(tmp_path, "slow") or {"epoch": 0})["epoch"] < 2:
            assert time.monotonic() < deadline, "the job never reached its second epoch"
            time.sleep(0.1)
    finally:
        warm_fits.release("t1")
    at_release = saved_state(tmp_path, "slow")["epoch"]
    with pytest.raises(ray.exceptions.RayTaskError, match="cancelled"):
        ray.get(slow)
    last = saved_state(tmp_path, "slow")["epoch"]
    after = run(tmp_path, "after", epochs=1)
    assert at_release <= last <= at_release + 1 < 200  # + 1: a checkpoint being written
    assert after.metrics["epoch"] == 1
    assert saved_state(tmp_path, "slow")["epoch"] == last  # nothing written since


def test_a_failed_job_raises_in_its_fit_and_the_group_serves_the_next(warm_fits, tmp_path):
    with pytest.raises(TrainingError, match="loss became nan"):
        run(tmp_path, "bad", epochs=1, fail="loss became nan")
    after = run(tmp_path, "good", epochs=1)
    assert after.metrics["epoch"] == 1


def test_a_group_whose_worker_dies_resumes_the_job_in_flight(ray_session, tmp_path, monkeypatch):
    """The worker process is killed after the job's first checkpoint; Ray Train restarts the
    group and the job continues from that checkpoint to its last epoch."""
    monkeypatch.setenv("RAYPURIFY_MAX_FAILURES", "1")
    marker = tmp_path / "killed"
    with warm_group(1, tmp_path / "group"):
        done = run(tmp_path, "job", epochs=3, kill_after=1, marker=str(marker))
    assert marker.exists()  # the kill happened
    assert done.state["epoch"] == 3
    assert [h["epoch"] for h in done.state["history"]] == [1, 2, 3]
    assert done.metrics["pid"] != int(marker.read_text())


class Recorder(ray.train.UserCallback):
    """Keeps the epochs of the reports a run hands its callbacks."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.epochs.append(metrics[0]["epoch"])


def test_a_hosted_fit_hands_each_report_to_its_callbacks(warm_fits, tmp_path):
    """A sweep trial's classifier reports each epoch to Tune through a callback: hosted on
    a warm group, its fit hands the callback every report, in order."""
    recorder = Recorder()
    fitted = run(tmp_path, "reported", epochs=3, callbacks=[recorder])
    assert recorder.epochs == [1, 2, 3]
    assert fitted.metrics["epoch"] == 3
    # Trained by the group's worker, not by a Ray Train run of its own.
    assert not (tmp_path / "reported" / "checkpoint_manager_snapshot.json").exists()
    assert [saved_state(tmp_path, "reported")["epoch"]] == [3]


def modules_loop(job: EpochsJob, ctx: LoopContext) -> None:
    """One epoch that reports which of the group's preloaded modules its worker had
    imported when the job began (this loop, pickled by value, imports none of them)."""
    import sys

    import ray.train

    from raypurify.worker_group import PRELOAD
    from raypurify.workers import report_and_checkpoint

    loaded = [m for m in PRELOAD if m in sys.modules]
    rank = ray.train.get_context().get_world_rank()
    history = [{"epoch": 1, "epoch_s": 0.0}]
    report_and_checkpoint({"epoch": 1, "loaded": loaded}, {"epoch": 1, "history": history}, rank)


def test_a_warm_worker_imports_what_jobs_need_before_its_first_job(ray_session, tmp_path):
    """A fresh worker's first classifier job spent 3.5 of its 6 s of start-up importing
    its loop's modules, torch._dynamo and MLflow's store; the group does that while it
    waits."""
    from raypurify.worker_group import PRELOAD

    with warm_group(1, tmp_path / "group"):
        fitted = run(tmp_path, "modules", epochs=1, loop=modules_loop)
    assert fitted.metrics["loaded"] == list(PRELOAD)


def test_two_groups_run_two_fits_at_once_each_on_its_share_of_the_cores(ray_session, tmp_path):
    """A runner with two steps at once opens two groups: each fit claims a free one, and
    their jobs default to half the cores each (two fits on all the threads each would
    oversubscribe them). Starting one at a time, the second group's run begins once the
    first is up."""
    meet = tmp_path / "meet"
    meet.mkdir()

    def one(i: int):
        job = MeetJob(meet=str(meet))
        return fit(
            meet_loop,
            job,
            workers=1,
            gpu=False,
            storage=tmp_path,
            name=f"fit{i}",
            epochs=1,
            desc=f"fit{i}",
        )

    with (
        warm_group(1, tmp_path / "groups", count=2, at_once=1) as groups,
        ThreadPoolExecutor(2) as pool,
    ):
        fitted = list(pool.map(one, range(2)))
    first, second = groups
    assert first.up_at is not None and second.started_at is not None
    assert second.started_at >= first.up_at
    assert [f.metrics["met"] for f in fitted] == [True, True]
    assert len({f.metrics["pid"] for f in fitted}) == 2
    threads = int(os.environ.get("RAYPURIFY_THREADS") or max(1, (os.cpu_count() or 1) // 2))
    assert [f.metrics["threads"] for f in fitted] == [threads, threads]
    assert sorted(p.name for p in (tmp_path / "groups").iterdir()) == [
        "warm-group-0",
        "warm-group-1",
    ]
    # Hosted: the checkpoints are the jobs', not those of runs of their own.
    assert all(saved_state(tmp_path, f"fit{i}")["epoch"] == 1 for i in range(2))
    assert not (tmp_path / "fit0" / "checkpoint_manager_snapshot.json").exists()
