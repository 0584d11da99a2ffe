"""Search spaces: what a sweep varies, on which data, judged by what, within which budget.

A space is a YAML file in `tune_spaces/` (or anywhere), validated here before Ray starts:
an unknown parameter, an empty or inverted range, a log range that reaches 0, an unknown
objective, attack, preset or recipe fails at once with one line naming the key.

Parameters have fixed names that say what they change in the purification config, so
`kld1` is the same knob in the YAML, the trials table, Optuna and MLflow:

    kld1 -> stage1.kld_limit     kld2 -> stage2.kld_limit     lambda -> stageN.kl_weight
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from raypurify import config
from raypurify.config import Config
from raypurify.data.spec import DatasetSpec
from raypurify.errors import ConfigError
from raypurify.experiments.spec import AttackEntry

SPACE_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"

# Each sweep parameter and the purification-config paths it sets (Eq. 14's lambda is the
# KL weight of both stages; the paper uses one value for both).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "kld1": ("stage1.kld_limit",),
    "kld2": ("stage2.kld_limit",),
    "lambda": ("stage1.kl_weight", "stage2.kl_weight"),
    "lr": ("stage1.lr", "stage2.lr"),
    "epochs": ("stage1.epochs", "stage2.epochs"),
    "batch_size": ("stage1.batch_size", "stage2.batch_size"),
    "phat_lr_scale": ("stage1.phat_lr_scale", "stage2.phat_lr_scale"),
    "width": ("model.width",),
    "latent": ("model.latent",),
}
INTEGER_PARAMETERS = {"epochs", "batch_size", "width", "latent"}
OBJECTIVES = ("val_accuracy", "label_free")


class ParameterRange(Config):
    """A float or integer range (optionally log-scaled), or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> ParameterRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices: empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} >= high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be above 0, got low {self.low}")
        return self

    def contains(self, value: float) -> bool:
        if self.choices is not None:
            return value in self.choices
        # Without choices, the validator made sure of low and high.
        return cast(float, self.low) <= value <= cast(float, self.high)

    def ends(self) -> list[float]:
        # Without choices, the validator made sure of low and high.
        return (
            list(self.choices)
            if self.choices is not None
            else [cast(float, self.low), cast(float, self.high)]
        )


class SweepAttack(AttackEntry):
    """The poison every trial purifies, given as a table's row is: an attack with options,
    or a released poison. `label` and `ratio` are left out of a dump at their defaults, as
    `released` is, so a space written before a sweep took them keeps its digest and its
    sweep still resumes."""

    added_fields = frozenset({"released", "label", "ratio"})


class PurifierChoice(Config):
    """The purification every trial starts from (its preset is the sweep's first point);
    `overrides` set the fidelity (epochs, width) for all trials alike."""

    preset: str = "cpu"
    overrides: list[str] = Field(default_factory=list)


class ClassifierChoice(Config):
    recipe: str = "cpu"
    overrides: list[str] = Field(default_factory=list)


class Validation(Config):
    """Clean rows held out of the training split, never poisoned nor purified: the
    `val_accuracy` objective. Drawn from the split's rows outside `dataset.subset`."""

    rows: PositiveInt = 2000
    seed: NonNegativeInt = 1


class Budget(Config):
    samples: PositiveInt = 12
    # Points tried first, after the preset's own values (e.g. the paper's 1 / 3 / 0.01),
    # each naming every searched parameter.
    points: list[dict[str, float]] = Field(default_factory=list)
    concurrency: PositiveInt | Literal["auto"] = "auto"  # auto: what the cluster fits
    seed: NonNegativeInt = 0  # Optuna's TPE sampler


class Asha(Config):
    """Early stopping on the classifier's per-epoch validation accuracy."""

    enabled: bool = True
    grace_period: PositiveInt = 2  # epochs every trial gets
    reduction_factor: float = Field(2.0, ge=2)


class SweepSpace(Config):
    name: str
    description: str = ""
    dataset: DatasetSpec  # the clean training rows that are poisoned (needs `subset`)
    validation: Validation = Field(default_factory=Validation)
    test: DatasetSpec  # reported only: never read by the searcher or ASHA
    attack: SweepAttack
    purifier: PurifierChoice = Field(default_factory=PurifierChoice)
    classifier: ClassifierChoice = Field(default_factory=ClassifierChoice)
    parameters: dict[str, ParameterRange]
    fixed: dict[str, float] = Field(default_factory=dict)  # parameters held at a value
    objective: Literal["val_accuracy", "label_free"] = "val_accuracy"
    probe_rows: PositiveInt = 1000  # poisoned rows held out of training (label_free)
    budget: Budget = Field(default_factory=Budget)
    asha: Asha = Field(default_factory=Asha)
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _known_parameters(self) -> SweepSpace:
        for where, names in (("parameters", self.parameters), ("fixed", self.fixed)):
            for name in names:
                if name not in PARAMETERS:
                    raise ValueError(
                        f"{where}.{name}: unknown parameter (known: {', '.join(PARAMETERS)})"
                    )
        for name in ("kld1", "kld2", "lambda"):
            if name not in self.parameters and name not in self.fixed:
                raise ValueError(f"parameters.{name}: missing (give a range, or a fixed value)")
        both = set(self.parameters) & set(self.fixed)
        if both:
            raise ValueError(f"fixed.{sorted(both)[0]}: also given a range in parameters")
        if not self.parameters:
            raise ValueError("parameters: nothing to search")
        for i, point in enumerate(self.budget.points):
            if set(point) != set(self.parameters):
                raise ValueError(
                    f"budget.points.{i}: must name exactly the searched parameters "
                    f"({', '.join(self.parameters)})"
                )
        if self.dataset.subset is None:
            raise ValueError(
                "dataset.subset: needed, so validation rows can be held out of the split"
            )
        return self


def overrides_for(values: dict[str, float]) -> list[str]:
    """`--set`-style purification overrides for parameter values."""
    out = []
    for name, value in values.items():
        value = int(round(value)) if name in INTEGER_PARAMETERS else float(value)
        out += [f"{path}={value!r}" for path in PARAMETERS[name]]
    return out


def preset_values(space: SweepSpace) -> dict[str, float]:
    """The searched parameters' values in the space's purifier preset (with its overrides):
    the sweep's first point, and what results.md compares the best trial against."""
    from raypurify.defenses.dvae.config import preset

    data = preset(space.purifier.preset, space.purifier.overrides).to_dict()
    values: dict[str, float] = {}
    for name in space.parameters:
        node: Any = data
        for part in PARAMETERS[name][0].split("."):
            node = node[part]
        values[name] = node
    return values


def spaces() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPACE_DIR.glob("*.yaml"))}


def load_space(
    name_or_path: str, overrides: Sequence[str] = (), *, datasets: bool = True
) -> SweepSpace:
    """A shipped space by name, or a YAML file, with `--set` overrides; validated whole
    (every parameter's range ends resolve to a valid purification config)."""
    path = config.named_or_file(name_or_path, spaces(), "space")
    space = config.load(SweepSpace, path, overrides)
    space.attack.with_paths_from(path.resolve().parent)
    check(space, source=str(path), datasets=datasets)
    return space


def check(space: SweepSpace, source: str = "space", datasets: bool = True) -> None:
    """Every name resolves, every range end gives a valid config and (with `datasets`) the
    data is there, before Ray starts."""
    from raypurify import defenses
    from raypurify.data import registry
    from raypurify.defenses.dvae.config import preset
    from raypurify.experiments.runner import check_attack
    from raypurify.models import ARCHS
    from raypurify.training.config import recipe
    from raypurify.training.run import check_options

    for key, spec in (("dataset", space.dataset), ("test", space.test)):
        if datasets:
            registry.check(spec, f"{source}: {key}")
        else:
            registry.source(spec, f"{source}: {key}")
    check_attack(space.attack, f"{source}: attack")
    try:
        defenses.options("dvae", {"preset": space.purifier.preset})
        preset(space.purifier.preset, space.purifier.overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: purifier: {e}") from None
    try:
        base = preset(space.purifier.preset, space.purifier.overrides + overrides_for(space.fixed))
    except ConfigError as e:
        raise ConfigError(f"{source}: fixed: {e}") from None
    try:
        cfg = recipe(space.classifier.recipe, space.classifier.overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: classifier: {e}") from None
    ARCHS.get(cfg.arch, key=f"{source}: classifier arch")
    check_options(cfg, f"{source}: classifier.overrides arch_options")
    if base.method != "dvae":
        raise ConfigError(f"{source}: purifier.preset: '{space.purifier.preset}' is not D-VAE")
    for i, point in enumerate(space.budget.points):
        try:
            preset(space.purifier.preset, space.purifier.overrides + overrides_for(point))
        except ConfigError as e:
            raise ConfigError(f"{source}: budget.points.{i}: {e}") from None
    for name, rng in space.parameters.items():
        for end in rng.ends():
            try:
                preset(
                    space.purifier.preset,
                    space.purifier.overrides + overrides_for(space.fixed | {name: end}),
                )
            except ConfigError as e:
                raise ConfigError(
                    f"{source}: parameters.{name}: {end:g} is invalid ({e})"
                ) from None
    if space.asha.enabled and space.objective == "label_free":
        raise ConfigError(
            f"{source}: asha.enabled: ASHA stops on clean validation accuracy, which a "
            "label-free sweep must not read; set it to false"
        )
    if space.asha.enabled and space.asha.grace_period >= cfg.epochs:
        raise ConfigError(
            f"{source}: asha.grace_period: {space.asha.grace_period} must be below the "
            f"classifier's {cfg.epochs} epochs"
        )


def classifier_epochs(space: SweepSpace) -> int:
    from raypurify.training.config import recipe

    return recipe(space.classifier.recipe, space.classifier.overrides).epochs
