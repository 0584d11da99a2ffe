"""`raypurify train`: data in, defence applied, classifier trained, metrics out.

The output directory names the run: rerunning with the same --out resumes from the last
epoch checkpoint, and a defended training set already written there is reused, but only
when the run there was made from the same training and test content and the same
settings (its `.raypurify` marker records them); anything else is refused with what
differs, so a changed `--data`, learning rate or epoch count never returns an old model.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypurify import defenses
from raypurify.atomic import claim_dir, release, remove_ours
from raypurify.data import registry
from raypurify.data.interchange import open_dataset, read_images
from raypurify.data.sources.parquet import locate
from raypurify.defenses.apply import reuse, transform_dataset
from raypurify.errors import ConfigError, DatasetError
from raypurify.models import ARCHS, build_model
from raypurify.storage import join_cluster
from raypurify.tracking import active_run, start_run
from raypurify.training.classifier import check_compatible, train_classifier
from raypurify.training.config import TrainConfig, recipe
from raypurify.workers import check_one_batch

if TYPE_CHECKING:
    from raypurify.attacks.base import AttackConfig
    from raypurify.config import Config
    from raypurify.data.imageset import ImageSet
    from raypurify.data.spec import DatasetSpec
    from raypurify.defenses.base import Defense

# How the run executes, not what it computes: free to change when resuming.
EXECUTION_KEYS = ("workers", "device", "threads", "data_path", "keep_checkpoints")


def identity(spec: DatasetSpec) -> dict[str, Any]:
    """What names a dataset's content: a directory's content id, else its source spec."""
    if spec.name == "parquet":
        info = open_dataset(locate(spec))
        return {"id": info.id, "sha256": info.sha256}
    return {"source": spec.to_dict()}


def check_model(arch: str, options: dict[str, Any], key: str) -> None:
    """Build the model once on the CPU so an unknown or bad option is a one-line config
    error naming `key` now, not a failure inside a Ray worker minutes later."""
    entry = ARCHS.get(arch, key="arch")
    hints = typing.get_type_hints(entry.build)
    for name, value in options.items():
        want = hints.get(name)
        if want in (int, float, bool) and not _is_a(value, want):
            kind = {int: "a whole number", float: "a number", bool: "true or false"}[want]
            raise ConfigError(f"{key}.{name}: {value!r} must be {kind}")
    try:
        build_model(entry.name, 10, 32, **options)
    except (TypeError, ValueError, RuntimeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {detail} (architecture '{entry.name}')") from None


def _is_a(value: Any, want: type) -> bool:
    if isinstance(value, bool) and want is not bool:
        return False
    return isinstance(value, (int, float) if want is float else want)


def check_options(cfg: TrainConfig, key: str = "arch_options") -> None:
    check_model(cfg.arch, cfg.arch_options, key)


def check_attack_options(cfg: AttackConfig, key: str) -> None:
    """Options an attack passes through to a surrogate model or recipe, checked now."""
    if hasattr(cfg, "surrogate") and hasattr(cfg, "surrogate_options"):
        check_model(cfg.surrogate, cfg.surrogate_options, f"{key}.surrogate_options")
    if hasattr(cfg, "surrogate_recipe"):
        overrides = list(getattr(cfg, "surrogate_overrides", []))
        try:
            train_cfg = recipe(cfg.surrogate_recipe, overrides)
        except ConfigError as e:
            raise ConfigError(f"{key}.surrogate_overrides: {e}") from None
        check_options(train_cfg, f"{key}.surrogate_overrides (arch_options)")


def run_training(
    data: str,
    test: str,
    out: str | Path,
    *,
    recipe_name: str = "paper",
    arch: str | None = None,
    defense: str = "none",
    overrides: Sequence[str] = (),
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    preset = [f"arch={arch}"] if arch else []
    cfg = recipe(recipe_name, [*preset, f"defense.name={defense}", *overrides])
    check_options(cfg)  # before a defended set is written, not after
    chosen, options = defenses.options(cfg.defense.name, cfg.defense.options)
    if chosen.kind == "purify":
        raise ConfigError(
            f"defense.name: '{chosen.name}' is a purifier; run `raypurify purify` first and "
            "train on its p3/ output"
        )
    out = Path(out)
    train_spec = registry.spec_for(data, split="train")
    test_spec = registry.spec_for(test, split="test")
    source = identity(train_spec)
    settings = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_KEYS}
    what = {"data": source, "test": identity(test_spec), "config": settings}
    inputs = [locate(s) for s in (train_spec, test_spec) if s.name == "parquet"]
    test_set = registry.load(test_spec)
    existed = out.exists()
    resumed = claim_dir(out, what, overwrite=overwrite, inputs=inputs)
    try:
        train_set = training_set(chosen, options, train_spec, data, out, num_cpus)
        check_compatible(train_set, test_set)  # the trainer checks again; before Ray here
        if len(np.unique(train_set.labels)) < 2:
            raise DatasetError(f"{train_set.name}: training needs at least 2 classes with images")
        check_one_batch(len(train_set), cfg.batch_size, cfg.workers, data, "batch_size")
        join_cluster(out, num_cpus)  # on a cluster: shared storage, a tracking server
    except BaseException:
        if not resumed:  # a bad input found while reading leaves nothing behind
            release(out, existed)
        raise
    run = start_run(
        "train",
        f"{cfg.arch}-{chosen.name}-{out.name}",
        params={"data": data, "test": test, "recipe": recipe_name, **cfg.to_dict()},
    )
    with active_run(run):
        return train_classifier(train_set, test_set, cfg, out, run=run)


def training_set(
    chosen: Defense,
    options: Config,
    train_spec: DatasetSpec,
    data: str,
    out: Path,
    num_cpus: int | None,
) -> ImageSet:
    """The training set in memory: defended into `out/defended` first for a transform
    defence (reusing one made from this input by this defence, replacing any other). The
    marker of `out` already ties the run to the input's content; the defended set's own
    manifest names the defence and the input as given."""
    source = {"source": data}
    if chosen.kind != "transform":
        return registry.load(train_spec)
    join_cluster(out, num_cpus)  # Ray Data writes the defended set from every node
    defended = out / "defended"
    made = {"defense": chosen.name, "options": options.to_dict()}
    info = reuse(defended)
    if info is not None and (info.manifest["config"], info.manifest["parents"]) != (
        made,
        [source],
    ):
        remove_ours(defended)
        info = None
    if info is None:
        info = transform_dataset(
            chosen, options, registry.stream(train_spec), defended, parents=[source]
        )
    return read_images(info.path)
