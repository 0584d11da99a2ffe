"""The steps of an experiment: the graph `plan` makes of a spec.

    data/clean -> poison/<attack> -> defend/<row>/<defence> or purify/<row>/<defence>
               -> train/<row>/<column>/<classifier>   (one table cell each)

Each step's `action` (experiments/actions.py) writes into its own directory of the store
and returns a small JSON-able result; a step's key hashes its kind, config and inputs.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from raypurify import config, defenses
from raypurify.attacks import ATTACKS
from raypurify.data.interchange import open_dataset
from raypurify.data.spec import DatasetSpec
from raypurify.errors import DatasetError
from raypurify.experiments.actions import (
    make_clean,
    make_defended,
    make_imported,
    make_poison,
    make_purified,
    train_cell,
)
from raypurify.experiments.spec import AttackEntry, ClassifierEntry, ExperimentSpec
from raypurify.training.config import recipe
from raypurify.training.data import DataPath, in_memory

if TYPE_CHECKING:
    from typing import Protocol

    from raypurify.tracking import Run

    class RunParent(Protocol):
        """What actions and child_run read of a context: a Context, or a sweep's
        TrialContext."""

        parent: Run


@dataclass(eq=False)
class Step:
    kind: str  # data, poison, defend, purify, train
    name: str  # e.g. train/lsp/dvae/fast-resnet
    config: dict[str, Any]
    inputs: list[Step]
    action: Callable[[Step, Path, Any], dict[str, Any]]  # (step, directory, RunParent)
    meta: dict[str, str] = field(default_factory=dict)  # row, column, classifier
    # CPUs the step's Ray work holds while it runs (Train workers, Data actors); see Scheduler
    cpus: int = 1
    key: str | None = None
    dir: Path | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    cached: bool = False
    # What the step reads besides its inputs and config (a train step's test set), by
    # identity: kept out of the key, so stored keys stay, but recorded, and a record that
    # names another is not reused (one from before this field is taken as matching).
    reads: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.@-]+", "_", self.name.split("/", 1)[-1])

    def fingerprint(self) -> str:
        """What downstream keys hash: a dataset's content sha256 (else the step key)."""
        # A step is located (its key set) before anything downstream hashes it.
        return cast(str, (self.result or {}).get("sha256") or self.key)

    def input_path(self, i: int = 0) -> Path:
        # Inputs have finished (their result set) before a step runs.
        return Path(cast(dict[str, Any], self.inputs[i].result)["path"])

    def child_run(self, ctx: RunParent) -> Run:
        return ctx.parent.child(self.name, params=self.config, step=self.name, **self.meta)


def classifier_config(
    spec: ExperimentSpec, entry: ClassifierEntry, defense_name: str, options: dict
) -> dict:
    preset = [f"arch={entry.arch}"] if entry.arch else []
    cfg = recipe(entry.recipe, [*preset, *entry.overrides, f"seed={spec.seed}"])
    # validate_assignment makes the dict a DefenseRef.
    cfg.defense = {"name": defense_name, "options": options}  # type: ignore[assignment]
    return cfg.to_dict()


def plan(spec: ExperimentSpec) -> list[Step]:
    """The step graph for a spec, each step after the steps it uses.

    Rows come one after another, and the learned purifiers' columns (the costly ones) after
    every other column: with few steps at a time, each attack is checked (its undefended
    cell) early, and the cheap columns fill in before the purifications start.
    """
    clean = clean_step(spec.dataset)
    steps = [clean]
    if spec.clean_row:
        steps += row_steps(spec, "clean", clean, spec.clean_columns())
    for a in spec.attacks:
        source = poison_step(a, clean, spec.seed)
        steps += [source, *row_steps(spec, a.row, source)]
    steps += analysis_steps(spec, steps)
    return sorted(steps, key=after_purification)  # stable: inputs stay before their users


def after_purification(step: Step) -> bool:
    """True for a purification and for everything that uses one."""
    return step.kind == "purify" or any(after_purification(i) for i in step.inputs)


def clean_step(dataset: DatasetSpec) -> Step:
    """The clean training rows, a table's or a sweep's (the same key, so a store serves
    both). A dataset directory is named by its path in the key, and by its content in
    `reads`: rewritten in place, it is copied again."""
    cfg = {"dataset": dataset.to_dict()}
    return Step(
        "data", "data/clean", cfg, [], make_clean, cpus=0, reads={"data": dataset_identity(dataset)}
    )


def poison_step(a: AttackEntry, clean: Step, seed: int) -> Step:
    """A table row's poison, or a sweep's: the attack run on the clean data with `seed`, or
    a released poison imported onto it. An import is keyed by the files' content and not by
    the seed (nothing in it is random), so every seed of a table reuses it."""
    name, meta = f"poison/{a.row}", {"row": a.row}
    if a.released is None:
        cfg = {"attack": a.name, "options": a.options, "ratio": a.ratio, "seed": seed}
        return Step("poison", name, cfg, [clean], make_poison, meta, attack_cpus(a))
    from raypurify.attacks.importers import content_digest

    r = a.released
    released = r.to_dict() | {"sha256": content_digest(r.paths)}
    del released["paths"]
    action = functools.partial(make_imported, paths=r.paths)
    return Step("poison", name, {"attack": a.name, "released": released}, [clean], action, meta, 0)


def hosted(step: Step) -> bool:
    """Whether one-worker warm groups host all of a ready step's training, so that its Ray
    work holds no CPU for long (a group's worker holds none, worker_group.IDLE_RESOURCES,
    and a purification's passes are Ray Data tasks, which free their CPU as they finish):
    a classifier or a purification of one worker on CPUs whose data travels in memory."""
    data_path: DataPath = "auto"
    if step.kind == "train":
        cfg, data_path = step.config["train"], step.config["train"]["data_path"]
    elif step.kind == "purify":
        cfg = step.config["resolved"]
    else:
        return False
    if cfg["workers"] != 1 or cfg["device"] == "cuda" or data_path == "ray_data":
        return False
    info = open_dataset(step.input_path())
    return in_memory(info.rows * math.prod(info.shape), data_path)


def attack_cpus(entry: AttackEntry) -> int:
    """An attack's Train workers (EM) or Data actor pool (TAP, SEP); none for the attacks
    that compute in the driver (LSP, AR, OPS)."""
    cfg = config.validate(ATTACKS.get(entry.name).config, {**entry.options, "ratio": entry.ratio})
    return max(getattr(cfg, "workers", 0), getattr(cfg, "actors", 0))


def seeded(overrides: list[str], seed: int) -> list[str]:
    """A purifier's overrides under a table's (or sweep's) seed: the seed seeds the
    purifier too. Seed 0, the purifiers' default, adds nothing, so steps stored before
    keep their keys; an explicit `seed=` in the overrides comes later and wins."""
    return [f"seed={seed}", *overrides] if seed else list(overrides)


def row_steps(
    spec: ExperimentSpec, row: str, source: Step, columns: list[str] | None = None
) -> list[Step]:
    """One row of the table: each defence (of `columns`, default all) applied to `source`,
    and a classifier on it."""
    from raypurify.defenses.dvae.config import preset

    steps = []
    for d in spec.defenses:
        if d.best_of or (columns is not None and d.column not in columns):
            continue
        # A column without best_of names a defence (DefenseEntry's validator).
        defense, options = defenses.options(cast(str, d.name), d.options)
        col, meta = d.column, {"row": row, "column": d.column}
        data, train_defense, train_options = source, "none", {}
        if defense.kind == "transform":
            data = Step(
                "defend",
                f"defend/{row}/{col}",
                {"defense": d.name, "options": options.to_dict()},
                [source],
                make_defended,
                meta,
                cpus=0,  # Ray Data tasks only: nothing held while reads wait
            )
            steps.append(data)
        elif defense.kind == "purify":
            overrides = seeded(options.overrides, spec.seed)
            options = options.model_copy(update={"overrides": overrides})
            resolved = preset(options.preset, options.overrides).to_dict()
            data = Step(
                "purify",
                f"purify/{row}/{col}",
                {"defense": d.name, "options": options.to_dict(), "resolved": resolved},
                [source],
                make_purified,
                meta,
                cpus=max(resolved["workers"], resolved["infer_actors"]),
            )
            steps.append(data)
        elif defense.kind == "train":
            train_defense, train_options = cast(str, d.name), options.to_dict()
        steps += train_steps(spec, row, col, data, train_defense, train_options)
    return steps


def train_steps(
    spec: ExperimentSpec,
    row: str,
    col: str,
    data: Step,
    defense: str = "none",
    options: dict[str, Any] | None = None,
) -> list[Step]:
    out = []
    reads = {"test": dataset_identity(spec.test)}
    for c in spec.classifiers:
        cfg = {"train": classifier_config(spec, c, defense, options or {})}
        meta = {"row": row, "column": col, "classifier": c.name}
        cpus = cfg["train"]["workers"]
        name = f"train/{row}/{col}/{c.name}"
        out.append(Step("train", name, cfg, [data], train_cell, meta, cpus, reads=reads))
    return out


def dataset_identity(dataset: DatasetSpec) -> dict[str, Any]:
    """What a step read of a dataset (a train cell's test set, the clean step's rows): a
    dataset directory's content id, else the spec of a named source (and the spec where
    the directory is gone, as for a report of a moved experiment)."""
    from raypurify.training.run import identity

    try:
        return identity(dataset)
    except DatasetError:
        return {"source": dataset.to_dict()}


DISENTANGLE_COLUMN = "clean+p_hat"


def analysis_steps(spec: ExperimentSpec, steps: list[Step]) -> list[Step]:
    """Detection and the disentanglement check, for every attack row with a D-VAE column.

    The disentanglement check also runs on the clean row when it has the D-VAE column: a
    stage 1 trained on clean data learns a p_hat too (what the label explains of the
    blurred residual), so clean + that p_hat is the control that says how much of an
    attack row's collapse is the poison's.
    """
    from raypurify.defenses.dvae.config import preset
    from raypurify.experiments import analyses

    def trains_stage1(options: dict[str, Any]) -> bool:  # the analyses read its p_hat
        _, opts = defenses.options("dvae", options)
        return preset(opts.preset, opts.overrides).ablation != "without-stage1"

    dvae = [d.column for d in spec.defenses if d.name == "dvae" and trains_stage1(d.options)]
    if not spec.analyses or not dvae:
        return []
    by_name = {s.name: s for s in steps}
    sources = [(a.row, by_name[f"poison/{a.row}"]) for a in spec.attacks]
    if "disentangle" in spec.analyses and dvae[0] in spec.clean_columns():
        sources.insert(0, ("clean", by_name["data/clean"]))
    out = []
    for row, source in sources:
        purify = by_name[f"purify/{row}/{dvae[0]}"]
        meta = {"row": row, "column": dvae[0]}
        pass_cpus = purify.config["resolved"]["infer_actors"]  # both run a stage-1 p_hat pass
        if "detect" in spec.analyses and row != "clean":
            out.append(
                Step(
                    "detect",
                    f"detect/{row}",
                    {"column": dvae[0]},
                    [source, purify],
                    analyses.detect,
                    meta,
                    pass_cpus,
                )
            )
        if "disentangle" in spec.analyses:
            data = Step(
                "disentangle",
                f"disentangle/{row}",
                {"column": dvae[0]},
                [by_name["data/clean"], source, purify],
                analyses.clean_plus_phat,
                meta,
                pass_cpus,
            )
            out += [data, *train_steps(spec, row, DISENTANGLE_COLUMN, data)]
    return out
