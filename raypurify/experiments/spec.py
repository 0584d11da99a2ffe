"""Experiment specs: which data, attacks, defences and classifiers make up a table.

An experiment YAML (or a shipped preset) is validated here before any work starts, so an
unknown attack, defence, architecture or dataset fails at once with its key path
(``attacks.2.name: unknown attack 'emm'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from raypurify.config import Config
from raypurify.data.spec import DatasetSpec


class ReleasedPoison(Config):
    """A poison made elsewhere (an author's release, or one crafted once and shipped), put
    onto the table's clean data by an importer (attacks/importers.py) instead of running
    the attack. Relative paths are read from the spec file's folder. The files' content,
    not their names, goes into the poison step's key, so an edited file is imported again."""

    format: str  # an importer: perturbation, png, npz, ntga
    paths: list[str] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)  # the importer's (e.g. units)
    allow_over_budget: bool = False  # import a poison over its attack's (or the protocol's) budget


class AttackEntry(Config):
    """A row of the table: an attack with its options, optionally a poison ratio; or a
    released poison, with `name` naming the attack that made it."""

    added_fields = frozenset({"released"})

    name: str
    label: str | None = None  # row name; default: the attack name (and ratio if < 1)
    options: dict[str, Any] = Field(default_factory=dict)
    ratio: float = Field(1.0, gt=0, le=1)
    released: ReleasedPoison | None = None

    @model_validator(mode="after")
    def _released_alone(self) -> AttackEntry:
        if self.released and self.options:
            raise ValueError("a released poison takes no attack options (give released.options)")
        if self.released and self.ratio != 1.0:
            raise ValueError("a released poison is imported whole: ratio must be 1")
        return self

    @property
    def row(self) -> str:
        if self.label:
            return self.label
        return self.name if self.ratio == 1.0 else f"{self.name}@{self.ratio:g}"

    def with_paths_from(self, folder: Path) -> AttackEntry:
        """The entry with its released poison's relative paths read from `folder` (that of
        the file that names it), so a run works from any directory."""
        if self.released:
            self.released.paths = [str((folder / p).resolve()) for p in self.released.paths]
        return self


class DefenseEntry(Config):
    """A column: a defence (transform, training-time or purifier) or a derived column."""

    name: str | None = None  # a registered defence (dvae and vae included)
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # e.g. {quality: 10}, {preset: cpu}
    best_of: list[str] = Field(default_factory=list)  # derived: best of these columns

    @model_validator(mode="after")
    def _named_or_derived(self) -> DefenseEntry:
        if bool(self.name) == bool(self.best_of):
            raise ValueError("give either name (a defence) or best_of (a derived column)")
        if self.best_of and not self.label:
            raise ValueError("a best_of column needs a label")
        return self

    @property
    def column(self) -> str:
        # The validator above guarantees a name or a label.
        return cast(str, self.label or self.name)


class ClassifierEntry(Config):
    """How each cell's classifier is trained: a recipe plus overrides."""

    label: str | None = None
    recipe: str = "cpu"
    arch: str | None = None
    overrides: list[str] = Field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label or self.arch or self.recipe


class ExperimentSpec(Config):
    name: str
    description: str = ""
    dataset: DatasetSpec  # the clean training set (e.g. a 10k subset)
    test: DatasetSpec  # the clean test set
    attacks: list[AttackEntry]
    defenses: list[DefenseEntry]
    classifiers: list[ClassifierEntry] = Field(default_factory=lambda: [ClassifierEntry()])
    # The clean row: every defence on the clean set (true), none (false), or the columns
    # named (e.g. [none]: the clean accuracy the attacks are measured against, without
    # paying for a purification of clean data).
    clean_row: bool | list[str] = True
    seed: NonNegativeInt = 0
    max_parallel: PositiveInt | None = None  # steps at once (default: from the cluster)
    analyses: list[str] = Field(default_factory=list)  # disentangle, detect

    @field_validator("analyses")
    @classmethod
    def _known_analyses(cls, value: list[str]) -> list[str]:
        for a in value:
            if a not in ("disentangle", "detect"):
                raise ValueError(f"unknown analysis '{a}' (known: disentangle, detect)")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ExperimentSpec:
        rows = [a.row for a in self.attacks]
        if len(set(rows)) != len(rows) or "clean" in rows:
            raise ValueError(f"attack rows must be unique and not 'clean': {rows}")
        cols = [d.column for d in self.defenses]
        if len(set(cols)) != len(cols):
            raise ValueError(f"defence columns must be unique: {cols}")
        for d in self.defenses:
            missing = set(d.best_of) - set(cols)
            if missing:
                raise ValueError(f"best_of names unknown columns {sorted(missing)}")
        if isinstance(self.clean_row, list):
            missing = set(self.clean_row) - set(cols)
            if missing:
                raise ValueError(f"clean_row names unknown columns {sorted(missing)}")
            if not self.clean_row:
                raise ValueError("clean_row: give true, false or the columns to train")
        return self

    def with_paths_from(self, folder: Path) -> ExperimentSpec:
        """The spec with its released poisons' relative paths read from `folder` (the spec
        file's), so a run works from any directory."""
        for a in self.attacks:
            a.with_paths_from(folder)
        return self

    def clean_columns(self) -> list[str]:
        """The columns of the clean row (none without one), in the table's order."""
        if self.clean_row is True:
            return [d.column for d in self.defenses]
        chosen = self.clean_row or []
        return [d.column for d in self.defenses if d.column in chosen]
