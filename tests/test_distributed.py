"""Ray Train glue: the node tags, the run's own group removed, the warm groups' claims,
the refusals before Ray waits forever, the loops' imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray
import ray.train

from raypurify.distributed import check_cpus, fit
from raypurify.workers import LoopJob


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


def test_a_run_tags_its_node_and_leaves_no_group_behind(ray_session, tmp_path, mlflow_uri):
    """Each worker tags the run's MLflow run with its node (on a cluster: who did the work);
    a run that ends removes its own placement group (only a killed controller's stays, see
    tests/test_sweep_cleanup.py)."""
    from raypurify.sweeps.cleanup import groups_made_by_actors
    from raypurify.tracking import start_run
    from raypurify.workers import NODE_TAG

    def one_epoch(job: LoopJob, ctx) -> None:  # nested: pickled by value for the workers
        from raypurify.workers import report_and_checkpoint

        report_and_checkpoint({"epoch": 1}, {"epoch": 1}, ray.train.get_context().get_world_rank())

    before = groups_made_by_actors()
    run = start_run("nodes", "run")
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
    assert groups_made_by_actors() <= before
    tags = run.client.get_run(run.run_id).data.tags
    assert tags[f"{NODE_TAG}0"] == ray.get_runtime_context().get_node_id()


def test_more_workers_than_the_local_ray_has_cpus_are_refused(ray_session):
    """Ray Train would wait for the missing CPUs forever without a word."""
    from raypurify.errors import ConfigError

    have = int(ray.cluster_resources()["CPU"])
    check_cpus(have, 1.0)  # fits
    with pytest.raises(ConfigError, match=f"workers: {have + 1} worker"):
        check_cpus(have + 1, 1.0)


class Group:
    """A warm group as `claim` sees it: it hosts CPU fits of one worker, and is up or still
    starting."""

    def __init__(self, up: bool = True) -> None:
        self.up = up

    def hosts(self, workers: int, gpu: bool) -> bool:
        return workers == 1 and not gpu

    def ready(self) -> bool:
        return self.up


def test_each_fit_claims_a_free_warm_group_and_gives_it_back():
    """Steps that run at once each get a group of their own; a fit no free group can host
    starts its own run (None)."""
    from raypurify.distributed import claim, serving

    a, b = Group(), Group()
    with serving(a, b):
        with claim(1, False) as first, claim(1, False) as second:
            assert {id(first), id(second)} == {id(a), id(b)}
            with claim(1, False) as third:
                assert third is None  # both busy
        with claim(2, False) as wide, claim(1, True) as gpu:
            assert wide is None and gpu is None
        with claim(1, False) as again:
            assert again is a  # given back
    with claim(1, False) as outside:
        assert outside is None


def test_a_fit_claims_a_group_that_is_up_before_one_still_starting():
    from raypurify.distributed import claim, serving

    starting, up = Group(up=False), Group()
    with serving(starting, up), claim(1, False) as first, claim(1, False) as second:
        assert first is up and second is starting  # none up and free: wait on one
