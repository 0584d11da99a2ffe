"""The sweep's three plots: parallel coordinates, parameter importance, objective by trial."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raypurify.sweeps.space import SweepSpace  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _scored(trials: list[dict]) -> list[dict]:
    """Trials with a value to plot: the objective, or a stopped trial's last validation."""
    return [t for t in trials if t["status"] in ("DONE", "STOPPED") and _value(t) is not None]


def _value(t: dict) -> float | None:
    return t["objective"] if t["status"] == "DONE" else t["val_accuracy"]


def parallel_coordinates(space: SweepSpace, trials: list[dict], path: Path) -> None:
    """One line per trial across the parameters' axes (log axes where the range is log),
    coloured by the objective; dashed where ASHA stopped the trial."""
    names = list(space.parameters)
    rows = _scored(trials)
    fig, ax = plt.subplots(figsize=(1.8 * (len(names) + 1) + 2, 4))
    values = np.array([_value(t) for t in rows]) if rows else np.zeros(0)
    lo, hi = (values.min(), values.max()) if len(values) else (0, 1)
    cmap = plt.get_cmap("viridis")
    for t, v in zip(rows, values, strict=True):
        ys = [_unit(space, n, t[n]) for n in names] + [(v - lo) / ((hi - lo) or 1)]
        style = "-" if t["status"] == "DONE" else "--"
        ax.plot(range(len(ys)), ys, style, color=cmap((v - lo) / ((hi - lo) or 1)), alpha=0.8)
    labels = [f"{n}\n{_span(space, n)}" for n in names]
    ax.set_xticks(range(len(names) + 1), [*labels, f"{space.objective}\n[{lo:.3g}, {hi:.3g}]"])
    ax.set_yticks([])
    ax.set_title(f"sweep {space.name}: {len(rows)} trials (dashed: stopped by ASHA)")
    _save(fig, path)


def _unit(space: SweepSpace, name: str, value: float) -> float:
    rng = space.parameters[name]
    if rng.choices is not None:
        return rng.choices.index(value) / max(1, len(rng.choices) - 1)
    lo, hi, v = cast(float, rng.low), cast(float, rng.high), float(value)  # no choices: set
    if rng.log:
        lo, hi, v = np.log(lo), np.log(hi), np.log(v)
    return (v - lo) / (hi - lo)


def _span(space: SweepSpace, name: str) -> str:
    ends = space.parameters[name].ends()
    return f"[{ends[0]:g}, {ends[-1]:g}]"


def importance(
    space: SweepSpace, study_file: Path, study: str, trials: list[dict], path: Path
) -> None:
    """Optuna's PED-ANOVA importances (what optuna-dashboard shows) from the stored study;
    with too few finished trials for that, the plot says so."""
    fig, ax = plt.subplots(figsize=(5, 0.5 * len(space.parameters) + 1.5))
    try:
        import optuna
        from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(study_file)))
        loaded = optuna.load_study(study_name=study, storage=storage)
        scores = get_param_importances(loaded, evaluator=PedAnovaImportanceEvaluator())
    except Exception as e:  # too few trials, or one value everywhere
        ax.text(0.5, 0.5, f"importance not available:\n{str(e)[:80]}", ha="center", wrap=True)
        ax.set_axis_off()
    else:
        names = list(scores)[::-1]
        ax.barh(names, [scores[n] for n in names])
        ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title(f"sweep {space.name}: parameter importance")
    _save(fig, path)


def objective_by_trial(space: SweepSpace, trials: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = [(i, t["objective"]) for i, t in enumerate(trials) if t["status"] == "DONE"]
    stopped = [(i, t["val_accuracy"]) for i, t in enumerate(trials) if t["status"] == "STOPPED"]
    if done:
        ax.scatter(*zip(*done, strict=True), label="finished")
        best = np.maximum.accumulate([v for _, v in done])
        ax.step([i for i, _ in done], best, where="post", label="best so far")
    if stopped:
        ax.scatter(*zip(*stopped, strict=True), marker="x", label="stopped by ASHA (partial)")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(space.objective)
    ax.set_title(f"sweep {space.name}: objective by trial")
    ax.legend(fontsize=8)
    _save(fig, path)
