"""The warm worker groups a sweep's trials share (worker_group.py).

Each Ray Train run costs seconds to start on a small machine, as long as a demo trial's
epochs, and so would a warm group per trial. The driver opens one group per trial that
runs at once before the first trial (its start overlaps the sweep's own preparation),
and each trial claims a free one for its D-VAE stages and its classifier. A trial's
process cannot be trusted to give its claim back: ASHA's stop ends the process, and so
may a crash. So the driver does, from Tune's callbacks, which cancels what the trial left
on the group (job_board.py). A trial that finds no free group runs its fits as Ray Train
runs of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from raypurify.job_board import GroupClient

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from raypurify.sweeps.space import SweepSpace
    from raypurify.worker_group import WarmGroup

GROUPS_DIR = ".warm-groups"  # under the sweep's folder: the groups' Ray Train runs

_open: tuple[WarmGroup, ...] = ()  # the groups of the sweep this driver runs


def group_size(space: SweepSpace) -> int | None:
    """The workers of the trials' groups (a purification's, the step a trial starts
    with), or None where groups are not allowed: decided in the driver, which knows
    whether it joined a cluster (a trial's process may not)."""
    from raypurify.sweeps.driver import stand_in_purify
    from raypurify.training.config import recipe
    from raypurify.worker_group import groups_allowed

    purify = stand_in_purify(space).config["resolved"]
    devices = (purify["device"], recipe(space.classifier.recipe, space.classifier.overrides).device)
    return int(purify["workers"]) if all(groups_allowed(d) for d in devices) else None


@contextlib.contextmanager
def sweep_groups(space: SweepSpace, out: Path, count: int) -> Iterator[tuple[GroupClient, ...]]:
    """`count` groups for the trials, as clients they can take to their processes (none
    where `group_size` allows none, or for none); closed at the end of the block."""
    global _open
    from raypurify.worker_group import warm_group

    workers = group_size(space)
    if workers is None or count == 0:
        yield ()
        return
    with warm_group(workers, out / GROUPS_DIR, count) as groups:
        _open = tuple(groups)
        try:
            yield tuple(g.client() for g in groups)
        finally:
            _open = ()


@contextlib.contextmanager
def claimed(groups: Sequence[GroupClient], trial_id: str) -> Iterator[GroupClient | None]:
    """In a trial: the first of `groups` free to claim, held for the block (None: all
    are held by other trials)."""
    group = next((g for g in groups if g.claim(trial_id)), None)
    try:
        yield group
    finally:
        if group is not None:
            group.release(trial_id)


class ReleaseClaims(Callback):
    """Gives back the claim of a trial that has ended, however it ended (stopped by ASHA,
    failed, or lost and about to be restarted), and cancels its jobs. Holds no state: Tune
    restores a sweep's callbacks from its own copy, and the groups are this process's."""

    def _release(self, trial: Trial) -> None:
        for group in _open:
            group.release(trial.trial_id)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._release(trial)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._release(trial)

    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._release(trial)
