"""The private Ray names raypurify relies on, kept here and nowhere else.

Ray has no public switch or query for any. tests/test_ray_private.py fails as soon as a
Ray upgrade moves or renames one, instead of every worker logging each report, every
command printing Ray's token-auth notice or its raylet's worker-pool warning, a local Ray
listening on every interface, or a stopped sweep trial's CPUs staying reserved.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

# Ray Train logs every report, metrics included, at INFO under a logger named by the file
# path of this private module, which RunConfig's log level does not reach.
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def report_logger() -> logging.Logger:
    """The logger Ray Train writes each report to (found without importing private code)."""
    spec = importlib.util.find_spec(REPORT_LOGGER_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"Ray Train moved {REPORT_LOGGER_MODULE}: update REPORT_LOGGER_MODULE")
    return logging.getLogger(spec.origin)


# A new local Ray logs at WARNING, from this private module's logger, that token auth is
# on (its default); runtime.quiet_logs filters that one notice out.
AUTH_NOTICE_MODULE = "ray._private.authentication.authentication_token_setup"


def auth_notice_logger() -> logging.Logger:
    """The logger of Ray's token-auth notices."""
    return logging.getLogger(AUTH_NOTICE_MODULE)


# The driver prints every error the raylet publishes, log_to_driver or not, through this
# module function, which its listening thread looks up at each message.
ERROR_PRINTER_MODULE = "ray._private.worker"
WORKER_POOL_NOTICE = "worker processes have been started on node"


def drop_worker_pool_notice() -> None:
    """Keep the raylet's warning that it started several times more worker processes than
    it starts at once off the driver's terminal (`runtime.quiet_logs` says why); every
    other error the raylet publishes still prints. Idempotent."""
    worker = importlib.import_module(ERROR_PRINTER_MODULE)
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None:
        raise RuntimeError(
            f"Ray moved {ERROR_PRINTER_MODULE}.print_to_stdstream: update ray_private.py"
        )
    if getattr(printer, "drops_worker_pool_notice", False):
        return

    def print_unless_notice(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and any(
            WORKER_POOL_NOTICE in line for line in data["lines"]
        ):
            return
        printer(data, ignore_prefix)

    print_unless_notice.drops_worker_pool_notice = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_unless_notice  # type: ignore[attr-defined]


def disable_clustering() -> None:
    """Keep a local Ray's node address at loopback (runtime.loopback_only says why): the
    constant Ray read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError("Ray moved ray_constants.ENABLE_RAY_CLUSTER: update ray_private.py")
    ray_constants.ENABLE_RAY_CLUSTER = False


@dataclasses.dataclass(frozen=True)
class GroupRecord:
    """What Ray's control store (GCS) keeps about a placement group and its public
    `placement_group_table` leaves out: which job and which actor created it, and whether
    that actor has died (False while it lives; True for a group a driver created)."""

    group_id: str  # hex
    removed: bool
    job_id: str  # hex
    creator_actor: str | None  # hex; None for a group a driver created
    creator_dead: bool


def placement_group_records() -> list[GroupRecord]:
    """Every placement group of the connected Ray, read from the control store directly
    (the State API that would say the same needs the dashboard, which a local Ray here
    runs without)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not hasattr(state, "_connect_and_get_accessor"):
        raise RuntimeError("Ray moved GlobalState._connect_and_get_accessor: update ray_private.py")
    table = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated, no stubs
    records = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = table.FromString(raw)
        actor = data.creator_actor_id.hex()
        records.append(
            GroupRecord(
                group_id=data.placement_group_id.hex(),
                removed=data.state == table.REMOVED,
                job_id=data.creator_job_id.hex(),
                creator_actor=None if set(actor) <= {"f"} else actor,
                creator_dead=data.creator_actor_dead,
            )
        )
    return records


def actor_dead(actor_id: str) -> bool:
    """Whether the actor (hex id) reads DEAD in the control store's actor table (not one
    that is restarting). A group's `creator_dead` flag was once seen still False 30 s
    after the actor table recorded its creator's death, so the sweep cleanup asks both."""
    from ray._private.state import state

    if not hasattr(state, "actor_table"):
        raise RuntimeError("Ray moved GlobalState.actor_table: update ray_private.py")
    info = state.actor_table(actor_id)
    return bool(info) and info.get("State") == "DEAD"


# The class of the actor Ray Train starts per run to drive it: it makes the run's group
# (ray.train.v2._internal.execution.controller.TrainController).
TRAIN_CONTROLLER_CLASS = "TrainController"


def live_actors(class_name: str) -> set[str]:
    """The (hex) ids of the connected job's actors of class `class_name` not yet DEAD."""
    import ray
    from ray._private.state import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    table = state.actor_table(None, job_id=job)
    return {
        actor
        for actor, info in table.items()
        if info["ActorClassName"] == class_name and info["State"] != "DEAD"
    }
