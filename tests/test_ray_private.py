"""The private Ray names raypurify relies on (raypurify/ray_private.py): if a Ray upgrade
moves or renames one, these fail here, by name, instead of the behaviour going quietly."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import time

import ray

from raypurify.ray_private import (
    AUTH_NOTICE_MODULE,
    ERROR_PRINTER_MODULE,
    REPORT_LOGGER_MODULE,
    auth_notice_logger,
    drop_worker_pool_notice,
    report_logger,
)


def test_ray_train_logs_its_reports_to_the_logger_the_workers_quiet():
    module = importlib.import_module(REPORT_LOGGER_MODULE)
    assert module.logger is report_logger()


def test_ray_logs_its_token_auth_notice_to_the_logger_the_runtime_filters():
    module = importlib.import_module(AUTH_NOTICE_MODULE)
    assert module.logger is auth_notice_logger()


def test_the_driver_prints_the_raylets_errors_through_the_function_we_wrap():
    worker = importlib.import_module(ERROR_PRINTER_MODULE)
    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages)


def test_only_the_worker_pool_notice_is_kept_off_the_terminal(capsys):
    """The raylet's notice, as Ray 2.60 words it, goes; another raylet error and a worker's
    own line still print. Wrapping twice wraps once."""
    worker = importlib.import_module(ERROR_PRINTER_MODULE)
    drop_worker_pool_notice()
    drop_worker_pool_notice()
    notice = (
        "WARNING: 11 PYTHON worker processes have been started on node: 5e15 with address: "
        "127.0.0.1, which is 5x the maximum expected startup concurrency (2)."
    )
    worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, False)
    assert capsys.readouterr().out == ""
    other = "A worker died or was killed while executing a task by an unexpected system error."
    worker.print_to_stdstream({"lines": [other], "pid": "raylet", "is_err": False}, False)
    worker.print_to_stdstream({"lines": ["hello"], "pid": 42, "is_err": False}, False)
    out = capsys.readouterr().out
    assert other in out and "hello" in out
    assert notice not in out


def test_turning_clustering_off_keeps_a_local_ray_on_loopback():
    """In a fresh process (the constant is read at import): after `disable_clustering`,
    Ray resolves this node's address to 127.0.0.1, not the machine's outward IP."""
    code = (
        "import ray._private.services as s\n"
        "from raypurify.ray_private import disable_clustering\n"
        "disable_clustering()\n"
        "print(s.get_node_ip_address())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "127.0.0.1"


def test_the_control_store_names_each_groups_job_and_creator(ray_session):
    """`placement_group_records` reads what the public table leaves out: a group the
    driver made belongs to this job, has no creating actor, and reads removed once it is."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raypurify.ray_private import placement_group_records

    group = placement_group([{"memory": 1}])
    ray.get(group.ready())
    (record,) = [g for g in placement_group_records() if g.group_id == group.id.hex()]
    assert record.job_id == ray.get_runtime_context().get_job_id()
    assert record.creator_actor is None and not record.removed
    remove_placement_group(group)
    (record,) = [g for g in placement_group_records() if g.group_id == group.id.hex()]
    assert record.removed


def test_an_actor_reads_dead_in_the_control_store_once_killed(ray_session):
    import ray

    from raypurify.ray_private import actor_dead

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self):
            return 1

    actor = Idle.remote()
    ray.get(actor.ping.remote())
    actor_id = actor._actor_id.hex()
    assert not actor_dead(actor_id)
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while not actor_dead(actor_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert actor_dead(actor_id)


@ray.remote(num_cpus=0)
class Waited:
    """An actor of a module-level class (Ray records a nested one by its qualified name)."""

    def ping(self):
        return 1


def test_the_sweep_cleanup_waits_for_actors_of_ray_trains_controller_class(ray_session):
    from ray.train.v2._internal.execution.controller.controller import TrainController

    from raypurify.ray_private import TRAIN_CONTROLLER_CLASS, live_actors

    assert TrainController.__name__ == TRAIN_CONTROLLER_CLASS

    actor = Waited.remote()
    ray.get(actor.ping.remote())
    assert actor._actor_id.hex() in live_actors("Waited")
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while live_actors("Waited") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_actors("Waited")
