"""What each step of an experiment does: its action, run by the runner in the step's own
directory of the store, returns a small JSON-able result (a dataset path and content
hash, or a table cell's metrics). `steps.plan` wires them into the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from raypurify import defenses
from raypurify.data import registry
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import open_dataset, read_images, write_images
from raypurify.defenses.apply import transform_dataset
from raypurify.errors import DatasetError
from raypurify.experiments.spec import ExperimentSpec
from raypurify.tracking import Run
from raypurify.training.classifier import train_classifier

if TYPE_CHECKING:
    from raypurify.data.interchange import DatasetInfo
    from raypurify.experiments.steps import Step


@dataclass
class Context:
    spec: ExperimentSpec
    test: ImageSet
    parent: Run


def dataset_result(info: DatasetInfo) -> dict[str, Any]:
    return {"path": str(info.path), "sha256": info.sha256, "rows": info.rows}


def make_clean(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    spec = registry.DatasetSpec.model_validate(step.config["dataset"])
    data = registry.load(spec)
    info = write_images(
        data,
        directory / "data",
        config=step.config,
        parents=[{"source": spec.name, "split": spec.split}],
        overwrite=True,
    )
    return dataset_result(info)


def make_poison(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    from raypurify.attacks.base import poison

    clean = read_images(step.input_path())
    cfg = step.config
    run = step.child_run(ctx)
    settings = {**cfg["options"], "ratio": cfg["ratio"], "seed": cfg["seed"]}
    poisoned, budget = poison(clean, cfg["attack"], run=run, settings=settings)
    info = write_images(
        poisoned,
        directory / "data",
        overwrite=True,
        config={**cfg, "budget": budget},
        parents=[open_dataset(step.input_path()).lineage()],
    )
    run.finish()
    return dataset_result(info) | {"budget": budget}


def make_imported(step: Step, directory: Path, ctx: Context, *, paths: list[str]) -> dict[str, Any]:
    """A released poison put onto the clean data, held to its attack's budget (checked
    before its MLflow run opens, so a refused import leaves none)."""
    from raypurify.attacks.base import log_poisoning
    from raypurify.attacks.importers import content_digest, held_to_budget, import_poison

    cfg, released = step.config, step.config["released"]
    if content_digest(paths) != released["sha256"]:
        raise DatasetError(f"{paths[0]}: changed while the run was going; run it again")
    clean = read_images(step.input_path())
    settings = {**released["options"], "attack": cfg["attack"]}
    poisoned, budget = import_poison(clean, released["format"], paths, settings=settings)
    how = "set released.allow_over_budget: true to import it anyway"
    check = held_to_budget(
        budget, cfg["attack"], Path(paths[0]), released["allow_over_budget"], how
    )
    run = step.child_run(ctx)
    log_poisoning(
        run, {"format": released["format"], "from": paths, **settings}, clean, poisoned, budget
    )
    info = write_images(
        poisoned,
        directory / "data",
        overwrite=True,
        config={**cfg, "budget": budget, "budget_check": check, "from": paths},
        parents=[open_dataset(step.input_path()).lineage()],
    )
    run.finish()
    return dataset_result(info) | {"budget": budget}


def make_defended(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    defense, options = defenses.options(step.config["defense"], step.config["options"])
    source = registry.stream(registry.spec_for(str(step.input_path())))
    info = transform_dataset(
        defense,
        options,
        source,
        directory / "data",
        overwrite=True,
        parents=[open_dataset(step.input_path()).lineage()],
    )
    return dataset_result(info)


def make_purified(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    defense, options = defenses.options(step.config["defense"], step.config["options"])
    run = step.child_run(ctx)
    # Every purifier has a purify function.
    summary = cast(Callable[..., dict[str, Any]], defense.purify)(
        options, step.input_path(), directory / "purify", run=run
    )
    run.finish()
    info = open_dataset(summary["output"])
    return dataset_result(info) | {
        "purify_dir": str(directory / "purify"),
        "wall_s": summary["wall_s"],
        "work_s": summary.get("work_s"),
        "outputs": summary["outputs"],
    }


def train_cell(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    from raypurify.training.config import TrainConfig

    cfg = TrainConfig.model_validate(step.config["train"])
    run = step.child_run(ctx)
    metrics = train_classifier(
        read_images(step.input_path()), ctx.test, cfg, directory / "train", run=run
    )
    run.finish()
    keep = (
        "accuracy",
        "train_accuracy",
        "per_class",
        "epochs",
        "wall_s",
        "work_s",
        "startup_s",
        "train_s",
        "images_per_s",
    )
    return {k: metrics[k] for k in keep} | dict(step.meta)
