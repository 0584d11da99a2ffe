"""A stopped trial's placement groups are freed, and only once the actor that made them has
died: real Ray, real Tune (no sweep, no torch: an actor stands in for a Ray Train run's
controller, which makes the run's group and dies with its trial, leaving the group)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import ray
from ray.util import placement_group_table
from ray.util.placement_group import placement_group, remove_placement_group

from raypurify.ray_private import placement_group_records
from raypurify.sweeps.cleanup import (
    Before,
    ReleasePlacementGroups,
    groups_made_by_actors,
    release_after_trials,
    release_orphaned,
)


@ray.remote(num_cpus=0)
class TrainController:
    """Makes a 1-CPU group, as a Ray Train controller makes its run's (named as Ray Train's
    is, which the cleanup after the trials waits for)."""

    def make_group(self) -> str:
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=60)
        return group.id.hex()


def state(group_hex: str) -> str:
    from ray.util.placement_group import PlacementGroup

    return placement_group_table(PlacementGroup(ray.PlacementGroupID.from_hex(group_hex)))["state"]


def test_only_a_group_whose_creating_actor_died_is_released(ray_session):
    """A live controller's group is never touched (a Ray Train run whose group is removed
    under it starts another), nor a group the driver made (Tune's own)."""
    release_orphaned()  # what earlier tests' killed runs left
    driver_made = placement_group([{"memory": 1}])
    controller = TrainController.remote()
    made = ray.get(controller.make_group.remote())
    ray.get(driver_made.ready())
    try:
        records = {g.group_id: g for g in placement_group_records()}
        assert records[made].creator_actor is not None and not records[made].creator_dead
        assert records[driver_made.id.hex()].creator_actor is None

        assert release_orphaned() == 0
        assert state(made) == "CREATED"

        now = Before.now()
        ray.kill(controller)
        # Ray marks the creator dead a moment after the kill: this waits for it
        assert release_after_trials(replace(now, groups=now.groups - {made}), timeout_s=30) == 1
        assert state(made) == "REMOVED"
        assert placement_group_table(driver_made)["state"] == "CREATED"
    finally:
        remove_placement_group(driver_made)


def test_trials_stopped_with_groups_reserved_do_not_starve_the_next(ray_session, tmp_path):
    """Five trials one after another, each leaving a 1-CPU group behind as a trial whose Ray
    Train run was stopped does (an actor the trial process owned made it, the job lives on,
    so Ray keeps it): the session's Ray has 4 CPUs, so without the callback the fifth
    trial's group would never be placed. After the last trial, none is left."""
    from ray import tune

    def trial(config):
        controller = TrainController.remote()
        ray.get(controller.make_group.remote())
        for step in range(3):
            tune.report({"step": step})

    before = Before.now()
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0, "memory": 2**20}),
        param_space={"i": tune.grid_search(list(range(5)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"),
            stop={"training_iteration": 2},  # stopped mid-way, as ASHA stops a trial
            callbacks=[ReleasePlacementGroups(every_s=0.5)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    release_after_trials(before)
    assert [r.error for r in grid] == [None] * 5
    assert [r.metrics["step"] for r in grid] == [1] * 5
    assert groups_made_by_actors() <= before.groups


def test_a_group_a_controller_makes_after_the_trials_ended_is_released(ray_session):
    """A trial's controller can still make its group as the trial's process dies. Once the
    trials have ended, the cleanup waits for every controller started since `before` to
    die and frees what it made, not only the groups in place when it began."""
    release_orphaned()
    before = Before.now()
    controller = TrainController.remote()
    ray.get(controller.__ray_ready__.remote())

    def make_late_then_die():
        time.sleep(3.0)  # longer than the cleanup's settle_s
        ray.get(controller.make_group.remote())
        ray.kill(controller)

    late = threading.Thread(target=make_late_then_die)
    late.start()
    try:
        assert release_after_trials(before, timeout_s=30) == 1
    finally:
        late.join()
    assert groups_made_by_actors() <= before.groups
