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


def children(parent: Run, status: str | None = None) -> list:
    """The parent's child runs (MLflow Run entities), oldest first; only those in
    `status` (e.g. RUNNING) if given."""
    client = parent.client
    exp = client.get_run(parent.run_id).info.experiment_id
    where = f"tags.`{PARENT_TAG}` = '{parent.run_id}'"
    if status:
        where += f" and attributes.status = '{status}'"
    runs = _retry(client.search_runs, [exp], filter_string=where, max_results=10000)
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
        tags={TRIAL_TAG: trial_id, "kind": "trial", "attack": space.attack.row},
    )


def _experiment_name(run: Run) -> str:
    client = run.client
    return client.get_experiment(client.get_run(run.run_id).info.experiment_id).name


def parent_run(space: SweepSpace, name: str, run_id: str | None, uri: str) -> Run:
    """The sweep's parent run: the one recorded in its directory, or a new one."""
    if run_id:
        run = Run(uri, run_id)
        _retry(run.client.update_run, run_id, status="RUNNING")
        return run
    return start_run(
        f"sweep-{space.name}",
        name,
        params=flatten({"space": space.to_dict()}),
        tags={"kind": "sweep", "space": space.name, "attack": space.attack.row},
    )


def reconcile(parent: Run, trials: list[dict]) -> None:
    """Bring the child runs in line with the trials Tune finished with.

    A trial ASHA stopped had its process ended before it could close its run: it is marked
    KILLED with the epoch it reached and its val accuracy there (the UI compares it too);
    a trial the user interrupted is marked KILLED until the sweep resumes. Step runs left
    RUNNING under a trial are marked KILLED.
    A sweep killed just after starting a trial, before Tune saved that trial in its state,
    resumes without it (the searcher suggests afresh): the run that trial opened belongs
    to no trial of the sweep, so it is deleted (MLflow keeps it in its trash) and every
    trial keeps exactly one run.
    """
    by_id = {t["trial_id"]: t for t in trials}
    for r in children(parent):
        if TRIAL_TAG not in r.data.tags:  # the shared steps' runs (clean data, poison)
            continue
        trial = by_id.get(r.data.tags[TRIAL_TAG])
        if trial is None:
            _retry(parent.client.delete_run, r.info.run_id)
            continue
        # A step run whose process was stopped (by ASHA, Ctrl-C, a lost node) cannot close
        # itself; a restarted step opened a new one.
        for step in children(Run(parent.uri, r.info.run_id), status="RUNNING"):
            Run(parent.uri, step.info.run_id).finish("KILLED")
        if trial["stopped_by_asha"]:
            run = Run(parent.uri, r.info.run_id)
            run.set_tags({"asha_stopped_at_epoch": trial["epoch"]})
            if trial["val_accuracy"] is not None:  # the UI compares stopped trials too
                run.log_metrics({"val_accuracy": trial["val_accuracy"]}, step=trial["epoch"])
            run.finish("KILLED")
        elif trial["status"] == "INTERRUPTED":  # reopened when the sweep resumes
            Run(parent.uri, r.info.run_id).finish("KILLED")
