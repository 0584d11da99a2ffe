"""Run an experiment: validate, plan the step graph, run it on Ray, write the table.

Steps run in driver threads, as many at once as `max_parallel` allows (default: what the
cluster can train at once) and, on CPUs, as the CPUs their Ray work holds leave one free
for Ray Data's reads; each step's heavy work runs on Ray (Train workers, Data actors).
Finished steps are found in the store and skipped, so an interrupted run resumes where it
stopped and rerunning a finished one only rebuilds the report.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import ray
from tqdm import tqdm

from raypurify import config, defenses
from raypurify.atomic import check_home
from raypurify.attacks import ATTACKS
from raypurify.data import registry
from raypurify.errors import ConfigError, DatasetError, RaypurifyError
from raypurify.experiments.actions import Context
from raypurify.experiments.spec import AttackEntry, ExperimentSpec, ReleasedPoison
from raypurify.experiments.steps import Step, hosted, plan
from raypurify.experiments.store import ERROR_LOG, Store, step_key
from raypurify.models import ARCHS
from raypurify.progress import bar_slot
from raypurify.reports import experiment
from raypurify.storage import join_cluster
from raypurify.tracking import active_run, start_run
from raypurify.training.config import recipe

if TYPE_CHECKING:
    from raypurify.experiments.steps import RunParent
    from raypurify.worker_group import WarmGroup


def validate(spec: ExperimentSpec) -> None:
    """Every name and option resolves and both datasets are there, before Ray or MLflow
    start (errors carry key paths): options passed through to models (a classifier's
    `arch_options`, an attack's surrogate) are built once here, not in a Ray worker."""
    from raypurify.training.run import check_options

    registry.check(spec.dataset, "dataset")
    registry.check(spec.test, "test")
    for i, a in enumerate(spec.attacks):
        check_attack(a, f"attacks.{i}")
    for i, d in enumerate(spec.defenses):
        if d.best_of:
            continue
        # A column without best_of names a defence (DefenseEntry's validator).
        defense, options = defenses.options(cast(str, d.name), d.options, key=f"defenses.{i}")
        if defense.kind == "purify":
            from raypurify.defenses.purifiers import check

            try:
                check(options)
            except ConfigError as e:
                raise ConfigError(f"defenses.{i}.options: {e}") from None
    for i, c in enumerate(spec.classifiers):
        try:
            cfg = recipe(c.recipe, ([f"arch={c.arch}"] if c.arch else []) + c.overrides)
        except ConfigError as e:
            raise ConfigError(f"classifiers.{i}: {e}") from None
        ARCHS.get(cfg.arch, key=f"classifiers.{i}.arch")
        check_options(cfg, f"classifiers.{i}.arch_options")


def check_attack(a: AttackEntry, key: str) -> None:
    """An attack entry (a table's row, a sweep's poison): its attack and options, or its
    released poison's importer and files, named by `key`."""
    from raypurify.training.run import check_attack_options

    if a.released:
        check_released(a.released, f"{key}.released")
        return
    attack = ATTACKS.get(a.name, key=f"{key}.name")
    cfg = config.validate(attack.config, {**a.options, "ratio": a.ratio}, source=f"{key}.options")
    check_attack_options(cfg, f"{key}.options")


def check_released(released: ReleasedPoison, key: str) -> None:
    """A released poison's importer, its options and its files, named by `key`."""
    from raypurify.attacks.importers import configure_import

    try:
        configure_import(released.format, released.options)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    for j, p in enumerate(released.paths):
        if not Path(p).exists():
            raise ConfigError(f"{key}.paths.{j}: {p}: no such file or directory")


def default_parallel() -> int:
    """One step per GPU on a GPU cluster; on CPUs, one step per 2 cores (each trains with
    all the threads it is given; more at once only contend)."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return int(res["GPU"])
    return max(1, int(res.get("CPU", 1)) // 2)


def cpu_budget() -> float:
    """CPUs that running steps may hold at once: on a CPU cluster one stays free for Ray
    Data's read tasks, which every pass needs and none can run without (two passes whose
    actors held both of 2 CPUs waited for reads forever); on a GPU cluster actors and
    workers hold GPUs and the CPUs stay free, so no limit."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return float("inf")
    return max(1.0, res.get("CPU", 1) - 1)


def warm_workers(
    parallel: int, out: Path, pending: bool = True
) -> contextlib.AbstractContextManager[list[WarmGroup] | None]:
    """On a local Ray on CPUs, one warm Ray Train worker group per step that runs at once
    trains the steps, so each does not start its own (worker_group.py); a run with no step
    `pending` (a rerun that only rebuilds the report) starts none."""
    from raypurify.worker_group import warm_workers as warm

    return warm(1, "auto", out / ".warm-group", wanted=pending, count=parallel)


def run_experiment(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    force: Sequence[str] = (),
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) `spec` into `out`; returns the results (also written to `out`)."""
    validate(spec)
    check_home(out, experiment.EXPERIMENT_SIGNS, "experiment")
    steps = plan(spec)
    for pattern in force:  # a mistyped pattern would rerun nothing, silently
        if not any(fnmatch.fnmatch(step.name, pattern) for step in steps):
            raise ConfigError(f"--force {pattern}: matches no step (e.g. {steps[-1].name})")
    test = registry.load(spec.test)  # also catches a missing dataset before any work
    out = join_cluster(out, num_cpus)  # on a cluster: shared storage, a tracking server
    out.mkdir(parents=True, exist_ok=True)
    parallel = spec.max_parallel or default_parallel()
    pending = bool(force) or len(finished_steps(spec, out)) < len(steps)
    # The warm groups start in the background (processes, imports, a process group: tens
    # of seconds on 2 cores) while MLflow opens its store.
    with warm_workers(parallel, out, pending) as groups:
        store = Store(out / "store")
        parent = start_run(
            spec.name, out.name, params={"spec": spec.to_dict()}, tags={"kind": "experiment"}
        )
        ctx = Context(spec=spec, test=test, parent=parent)
        start = time.perf_counter()
        with active_run(parent):
            Scheduler(steps, store, ctx, force, parallel, out, cpu_budget(), groups or ()).run()
            records = [r for s in steps if s.dir and (r := store.record(s.dir))]
            results = experiment.collect(spec, records)
            results["wall_s"] = time.perf_counter() - start
            results["warm_groups_start_s"] = [
                s for g in groups or () if (s := g.start_s()) is not None
            ]
            results["steps"] = {
                "ran": sum(s.result is not None and not s.cached for s in steps),
                "reused": sum(s.cached for s in steps),
            }
            files = experiment.write(spec, results, out, records)
            for f in files:
                parent.log_artifact(f)
            parent.log_metrics(experiment.summary_metrics(results))
    failed = [s for s in steps if s.error]
    if failed:
        names = ", ".join(s.name for s in failed[:5])
        raise RaypurifyError(
            f"{len(failed)} step(s) failed ({names}); the table in {out} "
            f"has gaps. First error: {failed[0].error}"
        )
    return results


def locate(step: Step, store: Store) -> None:
    """Set the step's key (its config and its inputs' fingerprints) and store directory."""
    step.key = step_key(step.kind, step.config, [i.fingerprint() for i in step.inputs])
    step.dir = store.path(step.kind, step.slug, step.key)


def resolve(step: Step, store: Store, force: Sequence[str] = ()) -> bool:
    """Locate `step` in the store (forgetting it first if `force` matches its name); True,
    with its result filled in, if it finished in an earlier run."""
    locate(step, store)  # sets step.dir
    stale = (record := store.record(cast(Path, step.dir))) is not None and not current(record, step)
    if stale or any(fnmatch.fnmatch(step.name, pattern) for pattern in force):
        store.forget(cast(Path, step.dir))
        record = None
    if record is not None:
        step.result, step.cached = record["result"], True
    return record is not None


def current(record: dict[str, Any], step: Step) -> bool:
    """Whether a finished step's record read what `step` reads (`Step.reads`)."""
    recorded = record.get("reads") or {}
    return all(recorded.get(name, value) == value for name, value in step.reads.items())


def execute(step: Step, store: Store, ctx: RunParent) -> dict[str, Any]:
    """Run a located step's action into its directory and record it as finished."""
    # A located step has its dir.
    cast(Path, step.dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = step.action(step, cast(Path, step.dir), ctx)
    except Exception as e:  # the whole error in the step's error.log and MLflow; one line on
        store.fail(cast(Path, step.dir), e, run=ctx.parent)
        raise
    store.finish(
        cast(Path, step.dir),
        {
            "kind": step.kind,
            "name": step.name,
            "key": step.key,
            "config": step.config,
            "inputs": [i.name for i in step.inputs],
            "meta": step.meta,
            "reads": step.reads,
            "result": result,
            "seconds": time.perf_counter() - t0,
        },
    )
    return result


def finished_steps(spec: ExperimentSpec, out: str | Path) -> list[Step]:
    """The spec's steps already finished in OUT's store, found without running anything:
    what `raypurify report OUT --spec` tabulates while a long run is still going."""
    store = Store(Path(out).resolve() / "store")
    steps = plan(spec)
    for step in steps:  # plan lists every step after its inputs
        if all(i.result is not None for i in step.inputs):
            locate(step, store)  # sets step.dir
            record = store.record(cast(Path, step.dir))
            if record is not None and current(record, step):
                step.result = record["result"]
    return [s for s in steps if s.result is not None]


def chain_heights(steps: list[Step]) -> dict[Step, int]:
    """For each step, the length of the longest chain of steps that wait on it (0 for a
    step nothing needs), from `steps` listed after their inputs as `plan` lists them."""
    height = dict.fromkeys(steps, 0)
    for step in reversed(steps):
        for i in step.inputs:
            height[i] = max(height[i], height[step] + 1)
    return height


class Scheduler:
    """Runs steps whose inputs are done, up to `parallel` at once, in driver threads, and
    while the CPUs they hold (`Step.cpus`) fit `budget`; a step runs alone if it needs more.
    With warm `groups` serving the fits, a step they host holds none (`steps.hosted`), and
    starts once a group is up and free for it, so a step's start-up is its own (the
    groups' start is the run's, reported apart), and the first steps on the groups are
    the longest chains ready by then, not the first step that happened to be ready.

    Order among ready steps: those that hold no CPUs first (quick data steps, written in
    the driver while a warm group starts). Then, where order changes the run's length
    (several steps at once) and for the first step that holds CPUs (the one that waits
    for a starting warm group), the step with the longest chain of steps waiting on it
    first: the critical path, and a poison or a purification (longer than a classifier
    in every preset) to absorb the group's start. Otherwise plan order, which fills the
    table row by row while a long run goes on."""

    def __init__(
        self,
        steps: list[Step],
        store: Store,
        ctx: Context,
        force: Sequence[str],
        parallel: int,
        out: Path,
        budget: float = float("inf"),
        groups: Sequence[WarmGroup] = (),
    ):
        self.steps, self.store, self.ctx, self.out = steps, store, ctx, out
        self.force, self.parallel, self.budget, self.groups = list(force), parallel, budget, groups
        self.height = chain_heights(steps)
        self.is_hosted: dict[Step, bool] = {}
        self.held_started = False  # whether a step that holds CPUs has started
        self.cells = tqdm(
            total=sum(s.kind == "train" for s in steps), desc="table", unit="cell", position=0
        )

    def resolve(self, step: Step) -> bool:
        """Compute the step's key and directory; True if it finished in an earlier run."""
        return resolve(step, self.store, self.force)

    def execute(self, step: Step, slot: int) -> dict[str, Any]:
        with bar_slot(slot):
            return execute(step, self.store, self.ctx)

    def run(self) -> None:
        pending = list(self.steps)
        running: dict[Future, tuple[Step, int]] = {}
        free = list(range(1, self.parallel + 1))
        pool = ThreadPoolExecutor(self.parallel)
        try:
            while pending or running:
                for step in sorted(pending, key=self.priority):
                    if any(i.error for i in step.inputs):
                        step.error = f"input {next(i.name for i in step.inputs if i.error)} failed"
                        pending.remove(step)
                        self._done(step)
                    elif all(i.result is not None for i in step.inputs):
                        if self.resolve(step):
                            pending.remove(step)
                            self._done(step)
                        elif free and self.fits(step, [s for s, _ in running.values()]):
                            pending.remove(step)
                            self.held_started |= step.cpus > 0
                            slot = free.pop(0)
                            running[pool.submit(self.execute, step, slot)] = (step, slot)
                # While a ready step may wait for a group to come up, look every 0.5 s.
                timeout = 0.5 if free and self.awaits_group(pending) else None
                if not running:
                    time.sleep(timeout or 0)
                    continue
                finished, _ = wait(running, timeout, return_when=FIRST_COMPLETED)
                for future in finished:
                    step, slot = running.pop(future)
                    free.append(slot)
                    try:
                        step.result = future.result()
                    except Exception as e:  # keep going: independent cells still run
                        first = f"{type(e).__name__}: {e}".splitlines()[0]
                        step.error = f"{first} (full error: {cast(Path, step.dir) / ERROR_LOG})"
                        tqdm.write(f"step {step.name} failed: {step.error}")
                    self._done(step)
        except BaseException:
            # Ctrl-C: do not wait here for the steps in flight (a whole purification); the
            # warm groups' close cancels their jobs at the next epoch, and the CLI stops Ray.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        self.cells.close()

    def priority(self, step: Step) -> tuple[bool, int]:
        """Sort key of a ready step (the class docstring says why)."""
        longest_first = self.parallel > 1 or not self.held_started
        return step.cpus > 0, -self.height[step] if longest_first else 0

    def hosted(self, step: Step) -> bool:
        """Whether the groups host `step` (asked once its inputs are done; an input that
        cannot be read is the step's own error, which it reports when it runs)."""
        if step not in self.is_hosted:
            try:
                self.is_hosted[step] = bool(self.groups) and hosted(step)
            except DatasetError:
                self.is_hosted[step] = False
        return self.is_hosted[step]

    def alive(self) -> list[WarmGroup]:
        """The groups that are up or starting (a group whose run failed hosts nothing more:
        the fits start their own runs)."""
        return [g for g in self.groups if g.alive()]

    def group_free(self, running: list[Step]) -> bool:
        """Whether a group is up and hosts no running step (or none will come up)."""
        alive = self.alive()
        return not alive or sum(g.ready() for g in alive) > sum(map(self.hosted, running))

    def awaits_group(self, pending: list[Step]) -> bool:
        """Whether a ready step may be waiting for a group to come up."""
        if all(g.ready() for g in self.alive()):
            return False
        return any(all(i.result is not None for i in s.inputs) and self.hosted(s) for s in pending)

    def holds(self, step: Step) -> int:
        """CPUs `step` holds while it runs: none where a warm group hosts its fits."""
        return 0 if self.hosted(step) else step.cpus

    def fits(self, step: Step, running: list[Step]) -> bool:
        if self.hosted(step) and not self.group_free(running):
            return False
        held, cpus = sum(self.holds(s) for s in running), self.holds(step)
        return cpus == 0 or held == 0 or held + cpus <= self.budget

    def _done(self, step: Step) -> None:
        dirs = [str(s.dir) for s in self.steps if s.dir is not None]
        experiment.save_run(self.out, self.ctx.spec, dirs)  # what `raypurify report` rebuilds
        if step.kind == "train":
            self.cells.update(1)
            if step.result:
                self.cells.set_postfix_str(f"{step.name}: {step.result['accuracy']:.1%}")
