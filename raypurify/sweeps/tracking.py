"""A sweep in MLflow: one parent run, one child run per trial, never two.

Tune's own MLflow callback keeps its trial -> run map in memory, so a resumed sweep would
open a second run for every resumed trial. Here each trial finds its run by the
`trial_id` tag under the sweep's parent (the parent's id is kept in the sweep's
directory), and opens one only if none exists. Trial runs log their parameters under the
space's names (kld1, kld2, lambda), so the MLflow UI compares them side by side.
"""

from __future__ import annotations

from typing import Any

from raypurify.config import flatten
from raypurify.sweeps.space import SweepSpace
from raypurify.tracking import PARENT_TAG, Run, _retry, start_run

TRIAL_TAG = "trial_id"


def children(parent: Run) -> list:
    """The parent's child runs (MLflow Run entities), oldest first."""
    client = parent.client
    exp = client.get_run(parent.run_id).info.experiment_id
    runs = _retry(
        client.search_runs,
        [exp],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'",
        max_results=10000,
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def trial_run(parent: Run, trial_id: str, params: dict[str, Any], space: SweepSpace) -> Run:
    """The trial's child run: the one an earlier attempt opened, or a new one."""
    for r in children(parent):
        if r.data.tags.get(TRIAL_TAG) == trial_id:
            run = Run(parent.uri, r.info.run_id)
            _retry(parent.client.update_run, run.run_id, status="RUNNING")
            return run
    fixed = {f"fixed.{k}": v for k, v in space.fixed.items()}
    return start_run(
        _experiment_name(parent),
        f"trial-{trial_id}",
        params={**params, **fixed, "objective_name": space.objective},
        parent=parent,
        tags={TRIAL_TAG: trial_id, "kind": "trial", "attack": space.attack.name},
    )


def _experiment_name(run: Run) -> str:
    client = run.client
    return client.get_experiment(client.get_run(run.run_id).info.experiment_id).name


def parent_run(space: SweepSpace, name: str, run_id: str | None, uri: str | None) -> Run:
    """The sweep's parent run: the one recorded in its directory, or a new one."""
    if run_id:
        run = Run(uri, run_id)
        _retry(run.client.update_run, run_id, status="RUNNING")
        return run
    return start_run(
        f"sweep-{space.name}",
        name,
        params=flatten({"space": space.to_dict()}),
        tags={"kind": "sweep", "space": space.name, "attack": space.attack.name},
    )


def close_stopped(parent: Run, stopped: dict[str, int]) -> None:
    """Mark trials ASHA stopped (their process is gone before it could) as KILLED, with
    the epoch they reached."""
    for r in children(parent):
        epoch = stopped.get(r.data.tags.get(TRIAL_TAG, ""))
        if epoch is not None:
            run = Run(parent.uri, r.info.run_id)
            run.set_tags({"asha_stopped_at_epoch": epoch})
            run.finish("KILLED")
