"""One sweep trial: purify the poisoned set with the trial's kld1/kld2/lambda, train the
shared classifier on the result, and score it.

A trial runs the same steps as a table cell (`experiments/steps.py`) through the same
content-addressed store, so the poison made before the sweep serves every trial, a trial
restarted after a crash resumes its purification and classifier from their checkpoints,
and the best trial's purified set is the very step `raypurify run` would reuse.

Inside the Tune trial, the classifier's Ray Train job reports each epoch to Tune (Tune's
report callback): ASHA stops on the epoch's accuracy on the clean validation rows. The
test set is read once, after the last epoch, for the report only.

Where the driver allows it (a local Ray on CPUs), a trial's D-VAE stages and classifier
run as jobs of one of the sweep's warm worker groups (sweeps/groups.py), which the trial
claims, instead of starting three Ray Train runs: each start costs seconds, as long as a
small trial's epochs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import numpy as np
import torch

from raypurify.data.imageset import ImageSet, balanced_rows
from raypurify.data.interchange import read_images
from raypurify.experiments.actions import make_purified
from raypurify.experiments.steps import Step, seeded
from raypurify.experiments.store import Store
from raypurify.sweeps.space import SweepSpace, overrides_for
from raypurify.tracking import Run, active_run

if TYPE_CHECKING:
    from raypurify.job_board import GroupClient
    from raypurify.training.config import TrainConfig

# Fields of a trial's result, besides its parameters (the trials table's columns).
TRIAL_METRICS = ("val_accuracy", "test_accuracy", "label_free", "probe_deep", "probe_linear")


@dataclass(frozen=True)
class Prepared:
    """A step finished before the sweep (clean data, validation rows, the poison): what a
    trial needs to use it as an input."""

    kind: str
    name: str
    key: str
    result: dict[str, Any]

    def as_input(self) -> Step:
        return Step(self.kind, self.name, {}, [], _never, key=self.key, result=self.result)


# A prepared step is never run by a trial.
def _never(step: Step, directory: Path, ctx: TrialContext) -> NoReturn:
    raise AssertionError(f"{step.name} should have been prepared before the sweep")


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs, fixed by the driver: sent once to every trial."""

    space: SweepSpace
    store: str  # the step store's root, an absolute path every node sees
    parent: Run  # the sweep's MLflow parent run
    clean: Prepared
    validation: Prepared
    poison: Prepared
    groups: tuple[GroupClient, ...] = ()  # the sweep's warm groups (sweeps/groups.py)


@dataclass
class TrialContext:
    """What the steps' actions read: the MLflow run their child runs hang from."""

    parent: Run


def purify_step(space: SweepSpace, params: dict[str, float], poison: Step) -> Step:
    """The D-VAE purification of `poison` with the trial's values: the same step (config
    and key) as a table's D-VAE column with these overrides."""
    from raypurify.defenses.dvae.config import preset

    overrides = seeded(space.purifier.overrides + overrides_for(space.fixed | params), space.seed)
    options: dict[str, Any] = {"preset": space.purifier.preset, "overrides": overrides}
    resolved = preset(options["preset"], overrides).to_dict()
    row = poison.name.split("/", 1)[-1]
    return Step(
        "purify",
        f"purify/{row}/dvae",
        {"defense": "dvae", "options": options, "resolved": resolved},
        [poison],
        make_purified,
        {"row": row, "column": "dvae"},
        cpus=max(resolved["workers"], resolved["infer_actors"]),
    )


def classifier_step(space: SweepSpace, purified: Step, validation: Step) -> Step:
    """The shared classifier on the purified set, less the label-free probe rows, judged
    per epoch on the clean validation rows."""
    from raypurify.training.config import recipe

    cfg = recipe(space.classifier.recipe, [*space.classifier.overrides, f"seed={space.seed}"])
    config = {
        "train": cfg.to_dict() | {"eval_subset": None},
        "evaluate": "validation",
        "probe": {"rows": space.probe_rows, "seed": space.seed},
        "test": space.test.to_dict(),
    }
    return Step(
        "train",
        purified.name.replace("purify/", "train/", 1) + "/val",
        config,
        [purified, validation],
        train_on_purified,
        dict(purified.meta),
        cpus=cfg.workers,
    )


def probe_split(data: ImageSet, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, probe positions): the probe is class-balanced and drawn by
    `index`, so it is the same rows whatever order a pass wrote them in."""
    order = np.argsort(data.index, kind="stable")
    labels = data.labels[order]
    rows = min(rows, len(data) // 2)
    probe = np.sort(order[balanced_rows(labels, rows, data.num_classes, seed, data.name)])
    keep = np.setdiff1d(np.arange(len(data)), probe)
    return keep, probe


def train_on_purified(step: Step, directory: Path, ctx: TrialContext) -> dict[str, Any]:
    """Train the classifier (reporting each epoch to Tune), then score it: validation
    accuracy (the objective), the label-free score and, for the report only, test accuracy."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypurify.data import registry
    from raypurify.data.spec import DatasetSpec
    from raypurify.training.classifier import train_classifier
    from raypurify.training.config import TrainConfig

    cfg = TrainConfig.model_validate(step.config["train"])
    purified = read_images(step.input_path(0))
    validation = read_images(step.input_path(1))
    keep, probe = probe_split(purified, **step.config["probe"])
    run = step.child_run(ctx)  # the classifier's curves, as a table cell's
    metrics = train_classifier(
        purified.take(keep),
        validation,
        cfg,
        directory / "train",
        run=run,
        eval_key="val_accuracy",
        callbacks=[TuneReportCallback()],
    )
    model = trained_model(cfg, directory / "train", purified)
    test = registry.load(DatasetSpec.model_validate(step.config["test"]))
    probe_deep = accuracy(model, purified.take(probe))
    probe_linear = linear_probe_accuracy(purified.take(keep), purified.take(probe), cfg.seed)
    run.finish()
    return {
        "val_accuracy": metrics["accuracy"],
        "test_accuracy": accuracy(model, test),
        "probe_deep": probe_deep,
        "probe_linear": probe_linear,
        "label_free": probe_deep - probe_linear,
        "epochs": metrics["epochs"],
        "val_curve": [h["val_accuracy"] for h in metrics["history"]],
        "wall_s": metrics["wall_s"],
        "work_s": metrics["work_s"],  # its epochs; the rest is start-up, checkpoints, teardown
        "startup_s": metrics["startup_s"],
    }


def trained_model(cfg: TrainConfig, directory: Path, data: ImageSet) -> torch.nn.Module:
    from raypurify.models import build_model
    from raypurify.training.classifier import MODEL_FILE

    model = build_model(cfg.arch, data.num_classes, data.shape[0], **cfg.arch_options)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.to(memory_format=torch.channels_last)


def accuracy(model: torch.nn.Module, data: ImageSet) -> float:
    from raypurify.training import data as batches
    from raypurify.training.epoch import predict

    images, labels = batches.unpack(batches.pack(data))
    logits = predict(model, images, amp=False)
    return float((logits.argmax(1) == labels).float().mean())


def linear_probe_accuracy(train: ImageSet, probe: ImageSet, seed: int, epochs: int = 30) -> float:
    """Accuracy on `probe` of a linear softmax classifier on raw pixels fitted to `train`.

    Poisons that work as shortcuts are (nearly) linearly separable, natural image classes
    are not: a linear model gets about 40 % on clean CIFAR-10 pixels and far more on a set
    that still carries a shortcut. The label-free score is the deep classifier's accuracy
    on the same held-out rows minus this: what the purified set teaches beyond a shortcut.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train.images).flatten(1).float() / 255.0
    mean = x.mean(0, keepdim=True)
    x = x - mean
    y = torch.from_numpy(train.labels)
    w = torch.zeros(x.shape[1], train.num_classes, requires_grad=True)
    b = torch.zeros(train.num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=gen).split(256):
            loss = torch.nn.functional.cross_entropy(x[rows] @ w + b, y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xp = torch.from_numpy(probe.images).flatten(1).float() / 255.0 - mean
    with torch.no_grad():
        pred = (xp @ w + b).argmax(1)
    return float((pred == torch.from_numpy(probe.labels)).float().mean())


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune trainable: find or start this trial's MLflow run, run its two steps through
    the store, and report the final scores to Tune."""
    from ray import tune

    from raypurify.distributed import serving, serving_groups
    from raypurify.experiments.runner import execute, resolve
    from raypurify.sweeps.groups import claimed
    from raypurify.sweeps.tracking import trial_run

    space = spec.space
    params = {name: config[name] for name in space.parameters}
    trial_id = tune.get_context().get_trial_id()
    run = trial_run(spec.parent, trial_id, params, space)
    ctx = TrialContext(parent=run)
    store = Store(spec.store)
    t0 = time.perf_counter()
    purified = purify_step(space, params, spec.poison.as_input())
    train = classifier_step(space, purified, spec.validation.as_input())
    # FAILED if a step raises; a trial ASHA kills is closed by the driver
    with active_run(run), contextlib.ExitStack() as fits:
        for step in (purified, train):
            if not resolve(step, store):
                if spec.groups and not serving_groups():
                    group = fits.enter_context(claimed(spec.groups, trial_id))
                    if group is not None:
                        fits.enter_context(serving(group))
                step.result = execute(step, store, ctx)
        result = cast(dict[str, Any], train.result)  # set just above
        final = {
            "epoch": result["epochs"],
            **{k: result[k] for k in TRIAL_METRICS},
            "objective": result[space.objective],
            "purify_key": purified.key,
            "train_key": train.key,
            "trial_s": time.perf_counter() - t0,
        }
        run.log_metrics({k: final[k] for k in (*TRIAL_METRICS, "objective")})
        run.set_tags(
            {"purify_key": purified.key, "purified": cast(dict[str, Any], purified.result)["path"]}
        )
        if train.cached:  # its epochs reached Tune in an earlier run: give ASHA the curve again
            for epoch, acc in enumerate(result["val_curve"], 1):
                tune.report({"epoch": epoch, "val_accuracy": acc})
        tune.report(final)
