"""Free what a stopped trial's Ray Train runs still hold: their placement groups.

Each trial process logs the placement group of every Ray Train run it starts
(`distributed.placement_groups`) to a file named after the placement group Tune runs that
process in. Tune removes that group only once the process has stopped (finished, stopped
by ASHA, killed, or interrupted), so its removal is the sign that nothing will use, or
create, the logged groups any more; this callback then removes them. Without it a stopped
trial's CPUs stay reserved until the sweep ends and the trials after it wait forever on a
small machine (see `distributed.placement_groups` for why Ray leaves them).

Freeing them at Tune's trial-end events instead would be too early: Tune reports a trial
complete before it stops the process, and a Ray Train run whose workers lose their group
while its controller lives starts a new group, which then outlives both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.tune import Callback

from raypurify.distributed import release_placement_groups

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

PLACEMENT_GROUPS = ".placement_groups"  # under the sweep's OUT: one log per trial process


def placement_group_log(out: Path) -> Path:
    """The log of the trial process this runs in, named by its own (Tune's) group."""
    own = ray.util.get_current_placement_group()
    if own is None:
        raise RuntimeError("a sweep trial runs outside a placement group: Tune changed")
    return Path(out) / PLACEMENT_GROUPS / f"{own.id.hex()}.txt"


def _removed(group_hex: str) -> bool:
    """Whether that group is gone; a log named otherwise (an older sweep's, by trial id)
    is from a process that has stopped."""
    from ray.util.placement_group import PlacementGroup

    if len(group_hex) != 2 * ray.PlacementGroupID.size():
        return True
    group = PlacementGroup(ray.PlacementGroupID.from_hex(group_hex))
    return ray.util.placement_group_table(group).get("state", "REMOVED") == "REMOVED"


def release_stopped(out: Path) -> int:
    """Release the groups logged by every trial process that has stopped (its own group is
    removed; on a resumed sweep, every process of the earlier Ray); how many were removed."""
    logs = sorted((Path(out) / PLACEMENT_GROUPS).glob("*.txt"))
    return sum(release_placement_groups(log) for log in logs if _removed(log.stem))


def release_all(out: Path) -> int:
    """Release every logged group once the sweep's trials have all ended, and the folder."""
    directory = Path(out) / PLACEMENT_GROUPS
    removed = sum(release_placement_groups(log) for log in sorted(directory.glob("*.txt")))
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    return removed


class ReleasePlacementGroups(Callback):
    """Every `every_s` of Tune's loop, free what stopped trial processes left reserved."""

    def __init__(self, out: Path, every_s: float = 2.0):
        self.out = Path(out)
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            release_stopped(self.out)
