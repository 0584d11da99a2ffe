"""Free what an ended trial's Ray Train runs still hold: their placement groups.

Each trial logs the placement group of every Ray Train run it starts (one file per trial,
`distributed.placement_groups`); this Tune callback in the driver removes the ones still
reserved when the trial completes, is stopped by ASHA, fails or is restarted. Without it
a stopped trial's CPUs stay reserved until the sweep ends, and the trials after it wait
forever on a small machine (see `distributed.placement_groups` for why Ray leaves them).
"""

from __future__ import annotations

from pathlib import Path

from ray.tune import Callback

from raypurify.distributed import release_placement_groups

PLACEMENT_GROUPS = ".placement_groups"  # under the sweep's OUT: one log per trial


def placement_group_log(out: Path, trial_id: str) -> Path:
    return Path(out) / PLACEMENT_GROUPS / f"{trial_id}.txt"


def release_all(out: Path) -> int:
    """Release every trial's leftover groups (at the end of a sweep); how many were removed."""
    directory = Path(out) / PLACEMENT_GROUPS
    removed = sum(release_placement_groups(log) for log in sorted(directory.glob("*.txt")))
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    return removed


class ReleasePlacementGroups(Callback):
    def __init__(self, out: Path):
        self.out = Path(out)

    def _release(self, trial) -> None:
        release_placement_groups(placement_group_log(self.out, trial.trial_id))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._release(trial)
