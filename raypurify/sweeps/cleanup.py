"""Free the placement groups that stopped trials' Ray Train runs leave reserved.

A Ray Train run's placement group is created by the run's controller actor but belongs to
the Ray job: when ASHA stops a sweep trial or its process dies, the controller dies with
it, yet Ray removes the group only when the job ends (Ray Train's own cleaner asks the
dashboard's State API, which a local Ray here runs without). Its CPUs stay reserved and,
on a small machine, the trials after it wait forever.

Ray's control store records, for each group, the actor that created it and whether that
actor has died (a flag that can lag the actor table, so both are asked). Nothing but its
creator places work in a Ray Train group, so a group whose creator is dead will never be
used again: those of this job are what gets removed, every few seconds while the sweep
runs and once more after its last trial. A live controller's group is never touched,
whatever Tune has reported about its trial (a Ray Train run whose group is removed under a
live controller starts another).

After the last trial, the cleanup first waits for every controller the sweep started to
die: one can still make a group as its trial's process dies (the flag then never turns
True), and in one full run such a group appeared after the groups then in place were gone,
and outlived the sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import ray
from ray.tune import Callback

from raypurify.ray_private import (
    TRAIN_CONTROLLER_CLASS,
    GroupRecord,
    actor_dead,
    live_actors,
    placement_group_records,
)

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def _made_by_actors_of_this_job() -> list[GroupRecord]:
    """This job's groups that an actor (a Ray Train controller, say) created, not removed."""
    job = ray.get_runtime_context().get_job_id()
    return [
        g
        for g in placement_group_records()
        if g.job_id == job and g.creator_actor is not None and not g.removed
    ]


def release_orphaned() -> int:
    """Remove this job's groups whose creating actor has died; how many were removed."""
    from ray.util.placement_group import PlacementGroup

    orphaned = [
        g
        for g in _made_by_actors_of_this_job()
        if g.creator_dead or actor_dead(cast(str, g.creator_actor))
    ]
    for g in orphaned:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(g.group_id)))
    return len(orphaned)


def groups_made_by_actors() -> set[str]:
    """The ids of this job's actor-made groups in place now."""
    return {g.group_id for g in _made_by_actors_of_this_job()}


@dataclass(frozen=True)
class Before:
    """What was in place before the trials: the caller's own groups and controllers."""

    groups: frozenset[str]
    controllers: frozenset[str]

    @classmethod
    def now(cls) -> Before:
        return cls(frozenset(groups_made_by_actors()), frozenset(controllers()))


def controllers() -> set[str]:
    """This job's Ray Train controllers not yet dead."""
    return live_actors(TRAIN_CONTROLLER_CLASS)


def release_after_trials(before: Before, timeout_s: float = 30.0, settle_s: float = 1.0) -> int:
    """Once Tune has stopped every trial process: wait for the controllers those processes
    owned to die (Ray propagates an owner's death a moment later), then remove their
    groups, until none has been left for `settle_s`. What `before` holds is not waited
    for; a group whose creator still lives after `timeout_s` is left. Returns how many
    groups were removed."""
    deadline = time.monotonic() + timeout_s
    removed = 0
    while controllers() - before.controllers and time.monotonic() < deadline:
        removed += release_orphaned()
        time.sleep(0.2)
    clear_since: float | None = None
    while True:
        removed += release_orphaned()
        now = time.monotonic()
        if any(g.group_id not in before.groups for g in _made_by_actors_of_this_job()):
            clear_since = None
            if now > deadline:
                return removed
        else:
            clear_since = clear_since or now
            if now - clear_since >= settle_s:
                return removed
        time.sleep(0.2)


class ReleasePlacementGroups(Callback):
    """Every `every_s` of Tune's loop, free the groups that stopped trials left reserved."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            release_orphaned()
