"""Ray Train glue: the placement group log, the node tags, the refusals before Ray waits
forever, the loops' imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray
import ray.train

from raypurify.distributed import (
    LoopJob,
    check_cpus,
    fit,
    placement_groups,
    release_placement_groups,
)


def test_a_bad_max_failures_is_refused_naming_the_variable(monkeypatch):
    import pytest

    from raypurify.distributed import max_failures
    from raypurify.errors import ConfigError

    monkeypatch.setenv("RAYPURIFY_MAX_FAILURES", "2")
    assert max_failures() == 2
    monkeypatch.setenv("RAYPURIFY_MAX_FAILURES", "two")
    with pytest.raises(ConfigError, match="RAYPURIFY_MAX_FAILURES"):
        max_failures()


def test_the_loops_ray_workers_import_do_not_pull_in_torchvision():
    """Every Ray Train worker and controller imports its loop's module; torchvision (and the
    torch._dynamo it drags in) would add seconds of start-up to each of them."""
    loops = ["raypurify.defenses.dvae.stage", "raypurify.training.loop"]
    code = f"import sys; [__import__(m) for m in {loops}]; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_run_logs_its_placement_group_and_node_and_a_leftover_group_is_released(
    ray_session, tmp_path, mlflow_uri
):
    """A sweep trial stopped mid-run leaves its Ray Train placement group reserved (Ray's
    own cleaner needs the dashboard); the trial logs it and the driver releases it. Each
    worker tags the run's MLflow run with its node (on a cluster: who did the work)."""
    from ray.util import placement_group, placement_group_table

    from raypurify.distributed import NODE_TAG
    from raypurify.tracking import start_run

    def one_epoch(job: LoopJob, ctx) -> None:  # nested: pickled by value for the workers
        from raypurify.distributed import report_and_checkpoint

        report_and_checkpoint({"epoch": 1}, {"epoch": 1}, ray.train.get_context().get_world_rank())

    log = tmp_path / "groups" / "trial.txt"
    run = start_run("nodes", "run")
    with placement_groups(log):
        fit(
            one_epoch,
            LoopJob(mlflow=run),
            workers=1,
            gpu=False,
            storage=tmp_path,
            name="run",
            epochs=1,
            desc="t",
        )
    (finished,) = log.read_text().split()
    assert placement_group_table()[finished]["state"] == "REMOVED"  # Ray Train removed it
    tags = run.client.get_run(run.run_id).data.tags
    assert tags[f"{NODE_TAG}0"] == ray.get_runtime_context().get_node_id()

    left = placement_group([{"CPU": 1}])  # what a killed run's controller leaves behind
    ray.get(left.ready())
    with log.open("a") as f:
        f.write(left.id.hex() + "\n")
    assert release_placement_groups(log) == 1
    assert placement_group_table(left)["state"] == "REMOVED" and not log.exists()
    assert release_placement_groups(log) == 0  # nothing logged: nothing to do


def test_more_workers_than_the_local_ray_has_cpus_are_refused(ray_session):
    """Ray Train would wait for the missing CPUs forever without a word."""
    from raypurify.errors import ConfigError

    have = int(ray.cluster_resources()["CPU"])
    check_cpus(have, 1.0)  # fits
    with pytest.raises(ConfigError, match=f"workers: {have + 1} worker"):
        check_cpus(have + 1, 1.0)
