"""A stopped trial's placement groups are freed, and only once its process has stopped:
real Ray, real Tune (no sweep, no torch: the trials stand in for ones whose Ray Train runs
were cut off, leaving their groups reserved)."""

from __future__ import annotations

import ray
from ray.util import placement_group_table
from ray.util.placement_group import placement_group, remove_placement_group

from raypurify.sweeps.cleanup import (
    PLACEMENT_GROUPS,
    ReleasePlacementGroups,
    placement_group_log,
    release_stopped,
)


def test_logged_groups_wait_until_the_trials_own_group_is_removed(ray_session, tmp_path):
    """Tune reports a trial complete before it stops its process, and a Ray Train run whose
    group is removed under a live controller starts another: so a trial's logged groups are
    freed only once Tune has removed the group the trial process itself ran in."""
    trial = placement_group([{"memory": 1}])  # stands in for Tune's group of a trial process
    train = placement_group([{"CPU": 1}])  # what a cut-off Ray Train run leaves reserved
    ray.get([trial.ready(), train.ready()])
    log = tmp_path / PLACEMENT_GROUPS / f"{trial.id.hex()}.txt"
    log.parent.mkdir()
    log.write_text(train.id.hex() + "\n")

    assert release_stopped(tmp_path) == 0  # the trial process may still run
    assert placement_group_table(train)["state"] == "CREATED" and log.exists()

    remove_placement_group(trial)
    assert release_stopped(tmp_path) == 1
    assert placement_group_table(train)["state"] == "REMOVED"
    assert not log.exists()


def test_a_log_an_older_sweep_named_by_trial_id_counts_as_stopped(ray_session, tmp_path):
    """Sweeps before this scheme named a log by its trial id; resuming one frees its groups."""
    left = placement_group([{"CPU": 1}])
    ray.get(left.ready())
    log = tmp_path / PLACEMENT_GROUPS / "1530df9c.txt"
    log.parent.mkdir()
    log.write_text(left.id.hex() + "\n")
    assert release_stopped(tmp_path) == 1
    assert placement_group_table(left)["state"] == "REMOVED" and not log.exists()


def test_trials_stopped_with_groups_reserved_do_not_starve_the_next(ray_session, tmp_path):
    """Five trials one after another, each leaving a 1-CPU group behind as a trial whose Ray
    Train run was stopped does (the trial process made it, the job lives on, so Ray keeps
    it): the session's Ray has 4 CPUs, so without the callback the fifth trial's group
    would never be placed."""
    from ray import tune

    out = tmp_path / "sweep"

    def trial(config):
        from raypurify.sweeps.cleanup import placement_group_log as log_of

        left = placement_group([{"CPU": 1}])
        ray.get(left.ready(), timeout=60)
        log = log_of(out)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(left.id.hex() + "\n")
        for step in range(3):
            tune.report({"step": step})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0, "memory": 2**20}),
        param_space={"i": tune.grid_search(list(range(5)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"),
            stop={"training_iteration": 2},  # stopped mid-way, as ASHA stops a trial
            callbacks=[ReleasePlacementGroups(out, every_s=0.5)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    assert [r.error for r in grid] == [None] * 5
    assert [r.metrics["step"] for r in grid] == [1] * 5


def test_a_trial_process_outside_a_placement_group_is_refused(ray_session, tmp_path):
    @ray.remote(num_cpus=0)
    def outside():
        try:
            placement_group_log(tmp_path)
        except RuntimeError as e:
            return str(e)

    assert "outside a placement group" in ray.get(outside.remote())
