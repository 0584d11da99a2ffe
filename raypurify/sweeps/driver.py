"""Run a sweep: prepare the data once, then a Ray Tune search (Optuna TPE + ASHA) whose
trials purify and train through the step store, tracked as one MLflow parent run.

    clean rows ─┬─ validation rows (clean, held out)          prepared once, in the store
                └─ poison ── trial: purify (kld1, kld2, lambda) ── classifier ── scores

Everything lands in OUT: the store, Tune's experiment (`tune/`), the Optuna study
(`optuna.journal`), `sweep.json` (what to resume), and the results (`results.py`).
Rerunning the same command resumes: finished trials are kept, interrupted ones restart
from their checkpoints, and Optuna continues from what it knew.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from raypurify.atomic import check_home, write_json
from raypurify.data import registry
from raypurify.data.interchange import read_images, write_images
from raypurify.errors import ConfigError
from raypurify.experiments.steps import Step, clean_step, dataset_identity, poison_step
from raypurify.experiments.store import Store, step_key
from raypurify.sweeps.results import STUDY_FILE
from raypurify.sweeps.space import SweepSpace, classifier_epochs, preset_values
from raypurify.sweeps.trial import Prepared, TrialSpec, purify_step, run_trial

if TYPE_CHECKING:
    from collections.abc import Callable

    from ray.tune import Callback, ResultGrid, Tuner

    from raypurify.sweeps.trial import TrialContext
    from raypurify.tracking import Run

STATE = "sweep.json"
TUNE_DIR = "tune"


def make_validation(step: Step, directory: Path, ctx: TrialContext) -> dict[str, Any]:
    """Clean rows of the training split outside the poisoned subset, class-balanced."""
    from raypurify.data.imageset import balanced_rows
    from raypurify.data.spec import DatasetSpec
    from raypurify.experiments.actions import dataset_result

    pool = registry.load(DatasetSpec.model_validate(step.config["dataset"]))
    used = read_images(step.input_path()).index
    rest = pool.take(np.flatnonzero(~np.isin(pool.index, used)))
    rows = balanced_rows(
        rest.labels, step.config["rows"], rest.num_classes, step.config["seed"], "validation"
    )
    info = write_images(rest.take(rows), directory / "data", config=step.config, overwrite=True)
    return dataset_result(info)


def prepare_steps(space: SweepSpace) -> list[Step]:
    """Clean data, validation rows and the poison: the same clean and poison steps (so the
    same keys) as the table's, which a `raypurify run` store then shares."""
    clean = clean_step(space.dataset)
    pool = space.dataset.model_copy(update={"subset": None})
    validation = Step(
        "data",
        "data/validation",
        {"dataset": pool.to_dict(), "rows": space.validation.rows, "seed": space.validation.seed},
        [clean],
        make_validation,
        reads={"data": dataset_identity(pool)},  # the rows outside the subset, too
    )
    return [clean, validation, poison_step(space.attack, clean, space.seed)]


def sweep_inputs(space: SweepSpace, steps: list[Step]) -> dict[str, str]:
    """A digest of what each of the space's prepared steps (`prepare_steps`) and its test
    set hold, beyond the space: a dataset directory's content, a released poison's files.
    The space's digest names them by path only, and a sweep resumed on other data would
    mix two sweeps' trials."""
    whats = {s.name: {"config": s.config, "reads": s.reads} for s in steps}
    whats["test"] = {"reads": dataset_identity(space.test)}
    return {name: step_key("input", what, []) for name, what in whats.items()}


def no_tune_resume_hint(record: logging.LogRecord) -> bool:
    """Drops Tune's warning that names its Python resume API (`Tuner.restore`) on Ctrl-C:
    the sweep command prints the command that resumes it."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def stand_in_purify(space: SweepSpace) -> Step:
    """A trial's purification step at the preset's values, to size trials by."""
    # The stand-in poison step has no action (None): it is never run, only sized.
    return purify_step(space, preset_values(space), Step("poison", "poison/x", {}, [], None))  # type: ignore[arg-type]


def trial_cpus(space: SweepSpace) -> int:
    """CPUs one trial's Ray work holds at a time (its purification, then its classifier)."""
    from raypurify.training.config import recipe

    workers = recipe(space.classifier.recipe, space.classifier.overrides).workers
    return max(stand_in_purify(space).cpus, workers)


def concurrency_bound(space: SweepSpace, requested: int | str) -> int:
    """Trials that fit at once, leaving one CPU for Ray Data's reads on a CPU cluster (a
    GPU cluster bounds by GPUs, one per worker). A request above it is refused."""
    import ray

    res = ray.cluster_resources()
    hold = trial_cpus(space)
    if res.get("GPU", 0) >= 1:
        fits = int(res["GPU"] // hold)
        unit = "GPU"
    else:
        fits = int((res.get("CPU", 1) - 1) // hold)
        unit = "CPU"
    if fits < 1:
        raise ConfigError(
            f"budget: one trial holds {hold} {unit}(s) and Ray Data needs one more CPU; the "
            f"cluster has {res.get(unit, 0):g} {unit}(s)"
        )
    if requested == "auto":
        return fits
    if cast(int, requested) > fits:  # not "auto": a number
        raise ConfigError(
            f"budget.concurrency: {requested} trials at once do not fit: each holds {hold} "
            f"{unit}(s), the cluster fits {fits} (one CPU stays free for Ray Data)"
        )
    return int(requested)


def prepare(store: Store, parent: Run, steps: list[Step]) -> dict[str, Prepared]:
    """Run (or find in the store) a space's `prepare_steps`."""
    from raypurify.experiments.runner import execute, resolve
    from raypurify.sweeps.trial import TrialContext

    ctx = TrialContext(parent=parent)
    out = {}
    for step in steps:
        if not resolve(step, store):
            print(f"preparing {step.name} ...", flush=True)
            step.result = execute(step, store, ctx)
        # Resolved or executed: its key and result are set.
        out[step.name.split("/")[-1] if step.kind == "data" else "poison"] = Prepared(
            step.kind, step.name, cast(str, step.key), cast(dict[str, Any], step.result)
        )
    return out


def load_state(out: Path, space: SweepSpace, inputs: dict[str, str]) -> dict[str, Any]:
    """The sweep recorded in OUT (resume), or a new record; refuses another space's OUT,
    and one whose data or poison changed (`sweep_inputs`) since it began."""
    import json

    path = out / STATE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path}: unreadable sweep record; use a new --out") from None
    if not isinstance(state, dict) or state.get("space_digest") != space.digest():
        raise ConfigError(
            f"{out} holds a sweep of another space or budget "
            f"({state.get('space') if isinstance(state, dict) else 'unreadable'}); "
            "use a new --out, or the same space and settings to resume it"
        )
    recorded = state.get("inputs") or inputs  # a record from before `inputs`: taken as is
    changed = [name for name, digest in inputs.items() if recorded.get(name) != digest]
    if changed:
        raise ConfigError(
            f"{out}: the sweep's {', '.join(changed)} changed since it began (a dataset "
            "rewritten in place, or a released poison's files); use a new --out"
        )
    return state


def run_sweep(space: SweepSpace, out: str | Path, *, num_cpus: int | None = None) -> dict:
    """Run (or resume) the sweep of `space` into `out`; returns the summary."""
    import optuna

    from raypurify.storage import join_cluster
    from raypurify.sweeps import results
    from raypurify.sweeps.cleanup import Before, release_after_trials
    from raypurify.sweeps.groups import sweep_groups
    from raypurify.sweeps.tracking import parent_run, reconcile
    from raypurify.tracking import tracking_uri

    if os.environ.get("RAYPURIFY_VERBOSE") != "1":  # its INFO lines: a study made or loaded
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("ray.tune.tune").addFilter(no_tune_resume_hint)
    check_home(out, (STATE, "store"), "sweep or experiment")
    steps = prepare_steps(space)  # once: a released poison's files are hashed to make them
    inputs = sweep_inputs(space, steps)
    state = load_state(Path(out).resolve(), space, inputs)
    registry.load(space.test)  # a missing test set fails here, not in every trial
    uri = state.get("tracking_uri") or tracking_uri()
    out = join_cluster(out, num_cpus, tracking=uri)  # on a cluster: shared storage, a server
    concurrency = concurrency_bound(space, space.budget.concurrency)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "store")
    parent = parent_run(space, out.name, state.get("parent_run_id"), uri)
    client = parent.client
    exp = client.get_run(parent.run_id).info.experiment_id
    state = state or {
        "space": space.name,
        "space_digest": space.digest(),
        "study_name": f"{space.name}-{uuid.uuid4().hex[:8]}",
        "tracking_uri": parent.uri,
        "experiment_id": exp,
        "experiment_name": client.get_experiment(exp).name,
        "parent_run_id": parent.run_id,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    state["inputs"] = inputs
    write_json(out / STATE, state)
    start = time.perf_counter()
    try:
        before = Before.now()
        try:  # the trials' groups start while the sweep's data is prepared
            wanted = 0 if results.ran_to_the_end(out) else concurrency
            with sweep_groups(space, out, wanted) as groups:
                prepared = prepare(store, parent, steps)
                spec = TrialSpec(space, str(store.root), parent, **prepared, groups=groups)
                grid = fit_trials(space, out, state, spec, concurrency)
        finally:
            release_after_trials(before)
    except BaseException:
        parent.finish("FAILED")
        raise
    trials = results.collect(space, grid)
    reconcile(parent, trials)
    summary = results.write(space, trials, out, state, time.perf_counter() - start)
    results.log(parent, out, summary)
    parent.finish("KILLED" if summary["interrupted"] else "FINISHED")
    return summary


def fit_trials(
    space: SweepSpace, out: Path, state: dict, spec: TrialSpec, concurrency: int
) -> ResultGrid:
    """Run (or resume) the trials of the sweep in `out` with Tune."""
    from ray import tune

    from raypurify.sweeps.cleanup import ReleasePlacementGroups
    from raypurify.sweeps.groups import ReleaseClaims
    from raypurify.sweeps.live import LiveTable

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec), {"cpu": 0, "memory": 2**20}
    )
    live = LiveTable(space, concurrency)
    tune_path = out / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_path)):
        print(f"resuming the sweep in {out}", flush=True)
        tuner = tune.Tuner.restore(
            str(tune_path), trainable, resume_errored=True, resume_unfinished=True
        )
    else:
        callbacks = [live, ReleasePlacementGroups(), ReleaseClaims()]
        tuner = new_tuner(space, out, state, trainable, concurrency, callbacks)
    grid = tuner.fit()
    live.close()
    return grid


def new_tuner(
    space: SweepSpace,
    out: Path,
    state: dict,
    trainable: Callable[..., Any],
    concurrency: int,
    callbacks: list[Callback],
) -> Tuner:
    """A fresh Tuner: TPE seeded, the preset's values first, ASHA on validation epochs."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raypurify.sweeps.search import distributions

    # metric and mode go to the searcher and the scheduler, not TuneConfig: with a
    # concurrency limit Tune wraps the searcher and does not pass them on.
    metric = "val_accuracy" if space.objective == "val_accuracy" else "objective"
    first = preset_values(space)
    inside = all(space.parameters[k].contains(v) for k, v in first.items())
    points = ([first] if inside else []) + list(space.budget.points)
    searcher = OptunaSearch(
        space=distributions(space),
        metric=metric,
        mode="max",
        points_to_evaluate=points or None,
        sampler=optuna.samplers.TPESampler(seed=space.budget.seed),
        study_name=state["study_name"],
        storage=JournalStorage(JournalFileBackend(str(out / STUDY_FILE))),
    )
    epochs = classifier_epochs(space)
    if space.asha.enabled:
        # time_attr is the classifier's own epoch (not Tune's report count, which restarts
        # when a trial does); max_t one past the last epoch, so the final report with the
        # trial's scores is never cut off by ASHA's stop at max_t.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=metric,
            mode="max",
            max_t=epochs + 1,
            grace_period=space.asha.grace_period,
            reduction_factor=space.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=space.budget.samples,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=2),
            callbacks=callbacks,
            verbose=0,
        ),
    )
