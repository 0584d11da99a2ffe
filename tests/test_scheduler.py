"""The Scheduler: which ready steps start, in what order, and how many at once (the CPUs
they hold, the warm groups that host them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import write_images
from raypurify.experiments import load_spec
from raypurify.experiments.actions import Context, dataset_result
from raypurify.experiments.runner import Scheduler, chain_heights
from raypurify.experiments.steps import Step, hosted, plan
from raypurify.experiments.store import Store


def scheduled(tmp_path, cpus: list[int], budget: float, action) -> list:
    """Run steps holding `cpus` each through the Scheduler (4 threads) under `budget`."""

    steps = [Step("probe", f"probe/{i}", {"i": i}, [], action, cpus=c) for i, c in enumerate(cpus)]
    ctx = Context(spec=load_spec("demo"), test=None, parent=None)
    Scheduler(steps, Store(tmp_path / "store"), ctx, [], 4, tmp_path, budget).run()
    return steps


def counting(result: dict) -> tuple[Callable, list[int]]:
    """A step action that returns `result` after 0.2 s, and (filled in as they run) the
    most of its calls that ran at once."""
    lock, running, peak = threading.Lock(), [0], [0]

    def action(step, directory, ctx):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return result

    return action, peak


def test_running_steps_hold_no_more_cpus_than_the_budget(tmp_path):
    """Two Ray Data passes whose actors held both of 2 CPUs waited for reads forever."""
    action, peak = counting({"ok": True})
    steps = scheduled(tmp_path, [1, 1, 1, 2], budget=1, action=action)
    assert all(s.result == {"ok": True} for s in steps)  # the 2-CPU step too, alone
    assert peak[0] == 1


def test_steps_within_the_budget_run_together(tmp_path):
    together = threading.Barrier(3, timeout=60)  # breaks unless all three run at once

    def action(step, directory, ctx):
        together.wait()
        return {"ok": True}

    steps = scheduled(tmp_path, [1, 1, 0], budget=2, action=action)
    assert [s.error for s in steps] == [None] * 3


def test_one_step_at_a_time_the_ready_steps_that_hold_no_cpus_go_first(tmp_path):
    """Data steps written in the driver run while a warm group starts, not after a step
    that waits for it."""

    order = []

    def action(step, directory, ctx):
        order.append(step.name)
        return {"ok": True}

    steps = [
        Step("probe", f"probe/{i}", {"i": i}, [], action, cpus=c)
        for i, c in enumerate([1, 0, 1, 0])
    ]
    ctx = Context(spec=load_spec("demo"), test=None, parent=None)
    Scheduler(steps, Store(tmp_path / "store"), ctx, [], 1, tmp_path).run()
    assert order == ["probe/1", "probe/3", "probe/0", "probe/2"]


def chain_order(tmp_path, parallel: int, budget: float = float("inf")) -> list[str]:
    """The order in which the Scheduler starts a clean classifier and two purifications of
    one poison, each followed by its classifier, with every step holding a CPU."""

    order = []

    def action(step, directory, ctx):
        order.append(step.name)
        return {"ok": True}

    def step(name, *inputs):
        return Step("probe", name, {"name": name}, list(inputs), action)

    train = step("train/clean")
    poison = step("poison")
    purify1, purify2 = step("purify1", poison), step("purify2", poison)
    steps = [train, poison, purify1, step("train/1", purify1), purify2, step("train/2", purify2)]
    assert [chain_heights(steps)[s] for s in steps] == [0, 2, 1, 0, 1, 0]
    ctx = Context(spec=load_spec("demo"), test=None, parent=None)
    Scheduler(steps, Store(tmp_path / "store"), ctx, [], parallel, tmp_path, budget).run()
    return order


def test_one_step_at_a_time_the_first_step_is_the_one_with_the_longest_chain_then_plan_order(
    tmp_path,
):
    """The first step that holds CPUs waits for the warm group's start: a poison or a
    purification takes it, not a classifier. After it, plan order fills the table row by
    row."""
    order = chain_order(tmp_path, parallel=1)
    assert order == ["poison", "train/clean", "purify1", "train/1", "purify2", "train/2"]


def test_steps_at_once_start_the_longest_chain_first(tmp_path):
    """With several slots the critical path goes first (one held step at a time here, as
    the budget allows one CPU, so the order is deterministic)."""
    order = chain_order(tmp_path, parallel=2, budget=1)
    assert order == ["poison", "purify1", "purify2", "train/clean", "train/1", "train/2"]


def test_the_plan_counts_the_cpus_each_step_holds():

    steps = {s.name: s for s in plan(load_spec("cifar10-mini"))}
    assert steps["data/clean"].cpus == steps["defend/ops/jpeg-10"].cpus == 0
    assert steps["poison/ops"].cpus == 0  # computed in the driver
    assert steps["poison/tap"].cpus >= 1 and steps["poison/em-class"].cpus >= 1
    assert steps["purify/ops/d-vae"].cpus >= 1
    assert steps["train/ops/d-vae/fast-resnet"].cpus == 1


@pytest.fixture
def data(tmp_path) -> Step:
    """A finished data step: 8 images of 4x4 on disk, as a classifier's input."""
    images = np.zeros((8, 4, 4, 3), np.uint8)
    info = write_images(
        ImageSet(images, np.arange(8) % 2, np.arange(8), ["a", "b"]), tmp_path / "d"
    )
    step = Step("data", "data/clean", {}, [], lambda *a: dataset_result(info), cpus=0)
    step.result = dataset_result(info)
    return step


def train(data: Step, i: int, **options) -> Step:
    config = {"train": {"workers": 1, "device": "auto", "data_path": "auto", "i": i} | options}
    return Step(
        "train", f"train/{i}", config, [data], lambda *a: {}, cpus=options.get("workers", 1)
    )


def test_warm_groups_host_one_worker_cpu_fits_of_data_in_memory(data):
    assert hosted(train(data, 0))
    assert hosted(train(data, 0, data_path="memory"))
    assert not hosted(train(data, 0, data_path="ray_data"))  # Ray Train streams it: own run
    assert not hosted(train(data, 0, workers=2))  # a one-worker group cannot host DDP
    assert not hosted(train(data, 0, device="cuda"))
    purify = Step(
        "purify", "purify/x", {"resolved": {"workers": 1, "device": "auto"}}, [data], None
    )
    assert hosted(purify)
    assert not hosted(Step("poison", "poison/x", {}, [data], None))  # EM, TAP: their own Ray work


class Group:
    """A warm group as the Scheduler sees it: up once `up` is set, unless its run stopped."""

    def __init__(self, up: threading.Event, stopped: bool = False):
        self.up, self.stopped = up, stopped

    def ready(self) -> bool:
        return self.up.is_set()

    def alive(self) -> bool:
        return not self.stopped


def up() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def run_classifiers(tmp_path, data: Step, groups: list, action) -> list[Step]:
    """Two classifier steps through a 2-slot Scheduler within a budget of one CPU."""
    steps = [train(data, i) for i in range(2)]
    for step in steps:
        step.action = action
    ctx = Context(spec=load_spec("demo"), test=None, parent=None)
    Scheduler([data, *steps], Store(tmp_path / "store"), ctx, [], 2, tmp_path, 1, groups).run()
    return steps


def test_steps_warm_groups_host_hold_no_cpus_of_the_budget(tmp_path, data):
    """The groups' workers hold no CPU, so two hosted classifiers run at once even where
    the budget leaves one CPU to the steps."""
    together = threading.Barrier(2, timeout=60)  # breaks unless both run at once

    def action(step, directory, ctx):
        together.wait()
        return {"accuracy": 0.5}

    steps = run_classifiers(tmp_path, data, [Group(up()), Group(up())], action)
    assert [s.error for s in steps] == [None, None]


def test_without_warm_groups_each_classifier_holds_its_cpu(tmp_path, data):
    action, peak = counting({"accuracy": 0.5})
    steps = run_classifiers(tmp_path, data, [], action)
    assert [s.result for s in steps] == [{"accuracy": 0.5}] * 2
    assert peak[0] == 1


def test_a_hosted_step_starts_once_a_group_is_up_and_free_for_it(tmp_path, data):
    """No step starts before a group is up: the groups' start is not any step's start-up.
    The first step takes the first group up; the second waits for the other group (not
    for the first step to end)."""
    first, second, started = threading.Event(), threading.Event(), []

    def action(step, directory, ctx):
        started.append(step.name)
        if len(started) == 1:
            time.sleep(1.0)
            assert len(started) == 1  # the other group is not up: the other step waits
            second.set()
            deadline = time.monotonic() + 60
            while len(started) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(started) == 2  # started while this one still runs
        return {"accuracy": 0.5}

    threading.Timer(1.0, first.set).start()
    t0 = time.monotonic()
    steps = run_classifiers(tmp_path, data, [Group(first), Group(second)], action)
    assert [s.error for s in steps] == [None, None]
    assert time.monotonic() - t0 >= 2.0  # neither started before the first group was up


def test_steps_do_not_wait_for_groups_whose_runs_stopped(tmp_path, data):
    """A group out of restarts hosts nothing more; its fits start their own runs."""
    action, _ = counting({"accuracy": 0.5})
    steps = run_classifiers(tmp_path, data, [Group(threading.Event(), stopped=True)], action)
    assert [s.result for s in steps] == [{"accuracy": 0.5}] * 2


def test_a_step_whose_input_cannot_be_read_runs_to_report_its_own_error(tmp_path, data):
    """Asking whether the groups host a step reads its input's manifest; a missing one is
    the step's error (recorded, the table goes on), not the scheduler's."""
    (Path(data.result["path"]) / "manifest.json").unlink()
    ran = []

    def action(step, directory, ctx):
        ran.append(step.name)
        return {"accuracy": 0.5}

    steps = run_classifiers(tmp_path, data, [Group(up())], action)
    assert sorted(ran) == ["train/0", "train/1"]
    assert [s.error for s in steps] == [None, None]
