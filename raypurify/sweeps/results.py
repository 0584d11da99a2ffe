"""A finished sweep's outputs: trials.csv, best.json, results.md and three plots, also
logged to the sweep's MLflow parent run.

Test accuracy is a reported-only column: nothing here or in the search reads it to choose.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypurify.atomic import write_json
from raypurify.experiments.store import Store
from raypurify.reports.experiment import STEP_REST, time_markdown, time_split
from raypurify.sweeps.space import SweepSpace, classifier_epochs, overrides_for, preset_values
from raypurify.sweeps.trial import TRIAL_METRICS

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

    from raypurify.tracking import Run

STUDY_FILE = "optuna.journal"  # the Optuna study (journal storage: safe on NFS too)
PLOTS = ("parallel_coordinates.png", "param_importance.png", "objective_by_trial.png")


SUMMARY = "summary.json"


def ran_to_the_end(out: Path) -> bool:
    """Whether an earlier run of the sweep in `out` left no trial to run: every one ended
    and none failed (a resume reruns failed trials). A rerun then only rebuilds the
    outputs from the trials Tune kept."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return summary.get("interrupted") == 0 and summary.get("errors") == 0


def collect(space: SweepSpace, grid: ResultGrid) -> list[dict[str, Any]]:
    """One row per trial from Tune's results, in the order the trials started."""
    tune_trials = trials_of(grid)
    trials = []
    # ResultGrid iterates by __getitem__ (it has no __iter__), which mypy does not follow.
    for result in grid:  # type: ignore[attr-defined]
        m = result.metrics or {}
        trial_id = m.get("trial_id") or _trial_id(result.path)
        if "objective" in m:
            status = "DONE"
        elif result.error:
            status = "ERROR"
        elif getattr(tune_trials.get(trial_id), "status", "") == "TERMINATED":  # by ASHA
            status = "STOPPED"
        else:  # the sweep was interrupted while this trial ran or waited
            status = "INTERRUPTED"
        row = {
            "trial_id": trial_id,
            "status": status,
            **{name: (result.config or {}).get(name) for name in space.parameters},
            "objective": m.get("objective"),
            **{k: m.get(k) for k in TRIAL_METRICS},
            "epoch": m.get("epoch", 0),
            "stopped_by_asha": status == "STOPPED",
            "wall_s": m.get("time_total_s"),
            # times Tune restarted it after its process died (FailureConfig)
            "restarts": getattr(tune_trials.get(trial_id), "num_failures", 0),
            "purify_key": m.get("purify_key"),
            "error": str(result.error).splitlines()[0] if result.error else "",
        }
        trials.append(row)
    return sorted(trials, key=lambda t: t["trial_id"])


def trials_of(grid: ResultGrid) -> dict[str, Trial]:
    """Tune's own Trial of each trial id, for its status (TERMINATED, ERROR, ...) and its
    failure count, as Tune saved them in the experiment's state. Not the in-memory ones:
    an interrupted Tune saves its state and then ends every running trial as TERMINATED,
    which would read as stopped by ASHA (and the saved state is what a resume runs)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t for t in ExperimentAnalysis(grid.experiment_path).trials}


def _trial_id(path: str) -> str:
    """A trial's id from its directory (`<trainable>_<id>_<n>_<params>_<time>`), for a
    trial that failed before it reported anything."""
    match = re.search(r"run_trial_([0-9a-f]+)_", Path(str(path)).name)
    return match.group(1) if match else Path(str(path)).name


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 pairs."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def summarize(space: SweepSpace, trials: list[dict], state: dict, wall_s: float) -> dict:
    done = [t for t in trials if t["status"] == "DONE"]
    best = max(done, key=lambda t: t["objective"]) if done else None
    preset = preset_values(space)
    at_preset = [t for t in done if all(_same(t[k], v) for k, v in preset.items())]
    epochs = classifier_epochs(space)
    saved = sum(epochs - t["epoch"] for t in trials if t["stopped_by_asha"])
    pairs = [(t["label_free"], t["test_accuracy"]) for t in done]
    return {
        "space": space.name,
        "attack": space.attack.row,
        "objective_name": space.objective,
        "trials": len(trials),
        "done": len(done),
        "stopped_by_asha": sum(t["stopped_by_asha"] for t in trials),
        "errors": sum(t["status"] == "ERROR" for t in trials),
        "restarts": sum(t["restarts"] for t in trials),
        "interrupted": sum(t["status"] == "INTERRUPTED" for t in trials)
        + max(0, space.budget.samples - len(trials)),
        "classifier_epochs_saved": saved,
        "classifier_epochs": epochs,
        "wall_s": wall_s,
        "study_name": state["study_name"],
        "best": best,
        "preset": {"config": preset, "trial": at_preset[0] if at_preset else None},
        "label_free_vs_test": {
            "spearman": spearman(*zip(*pairs, strict=True)) if len(pairs) >= 3 else None,
            "trials": len(pairs),
        },
        "val_vs_test": {
            "spearman": spearman(
                [t["val_accuracy"] for t in done], [t["test_accuracy"] for t in done]
            ),
            "trials": len(done),
        },
    }


def _same(a: float | None, b: float) -> bool:
    return a is not None and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def write(space: SweepSpace, trials: list[dict], out: Path, state: dict, wall_s: float) -> dict:
    summary = summarize(space, trials, state, wall_s)
    summary["time_split"] = time_split(Store(out / "store").records())
    write_csv(space, trials, out / "trials.csv")
    best = summary["best"]
    if best is not None:
        params = {k: best[k] for k in space.parameters}
        overrides = space.purifier.overrides + overrides_for(space.fixed | params)
        write_json(
            out / "best.json",
            {
                "config": params,
                "objective": best["objective"],
                "objective_name": space.objective,
                "trial_id": best["trial_id"],
                "purify_key": best["purify_key"],
                "store": str(out / "store"),
                "purifier": {"preset": space.purifier.preset, "overrides": overrides},
            },
        )
    write_json(out / SUMMARY, summary)
    (out / "results.md").write_text(markdown(space, trials, summary))
    plots(space, trials, out, state)
    return summary


def write_csv(space: SweepSpace, trials: list[dict], path: Path) -> None:
    cols = [
        "trial_id",
        "status",
        *space.parameters,
        "objective",
        *TRIAL_METRICS,
        "epoch",
        "stopped_by_asha",
        "wall_s",
        "restarts",
        "purify_key",
        "error",
    ]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(trials)
    tmp.replace(path)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(space: SweepSpace, trials: list[dict], s: dict) -> str:
    names = list(space.parameters)
    head = [
        "trial",
        "status",
        *names,
        space.objective,
        "test acc (report only)",
        "epochs",
        "wall s",
    ]
    lines = [
        f"# Sweep `{space.name}`: {space.attack.row}, objective `{space.objective}`",
        "",
        f"{s['trials']} trials ({s['done']} finished, {s['stopped_by_asha']} stopped by ASHA, "
        f"{s['errors']} failed, {s['interrupted']} still to run; {s['restarts']} restarts "
        "after a lost process) in "
        f"{s['wall_s'] / 60:.1f} min; ASHA saved "
        f"{s['classifier_epochs_saved']} classifier epochs of "
        f"{s['trials'] * s['classifier_epochs']}. Optuna study `{s['study_name']}` in "
        "optuna.journal.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for t in trials:
        cells = [t["trial_id"], t["status"], *(t[n] for n in names)]
        cells += [t["objective"] if t["status"] == "DONE" else t["val_accuracy"]]
        cells += [t["test_accuracy"], t["epoch"], t["wall_s"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Best against the preset", ""]
    best, preset = s["best"], s["preset"]
    lines += [
        f"| | {' | '.join(names)} | {space.objective} | test acc |",
        "|---" * (len(names) + 3) + "|",
    ]
    if best:
        lines.append(_vs_row("best", names, best))
    ptrial = preset["trial"] or {**preset["config"], "objective": None, "test_accuracy": None}
    lines.append(_vs_row(f"preset `{space.purifier.preset}`", names, ptrial))
    lf, vt = s["label_free_vs_test"], s["val_vs_test"]
    ranks = (
        f"Rank correlation with test accuracy over the finished trials: label-free score "
        f"rho = {_cell(lf['spearman'])} ({lf['trials']} trials), validation accuracy "
        f"rho = {_cell(vt['spearman'])} ({vt['trials']} trials)."
    )
    if max(lf["trials"], vt["trials"]) < 3:
        ranks = (
            "Rank correlations with test accuracy need three finished trials "
            f"({vt['trials']} here)."
        )
    rest = f"{STEP_REST}; a trial's classifier also scores itself: test accuracy and the probes"
    if stopped := s["stopped_by_asha"]:  # their classifiers never finish: no step record
        rest += f"; finished steps only: the classifiers ASHA stopped ({stopped}) are not in it"
    lines += [
        "",
        ranks,
        "",
        *time_markdown(s.get("time_split", {}), rest),
        *[f"![{p}]({p})" for p in PLOTS],
        "",
    ]
    return "\n".join(lines)


def _vs_row(label: str, names: list[str], t: dict) -> str:
    cells = [label, *(t.get(n) for n in names), t.get("objective"), t.get("test_accuracy")]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def plots(space: SweepSpace, trials: list[dict], out: Path, state: dict) -> None:
    from raypurify.sweeps.plots import importance, objective_by_trial, parallel_coordinates

    parallel_coordinates(space, trials, out / PLOTS[0])
    importance(space, out / STUDY_FILE, state["study_name"], trials, out / PLOTS[1])
    objective_by_trial(space, trials, out / PLOTS[2])


def log(parent: Run, out: Path, summary: dict) -> None:
    """The sweep's tables, plots and best config on its MLflow parent run."""
    for name in ("trials.csv", "results.md", SUMMARY, "best.json", *PLOTS):
        if (out / name).exists():
            parent.log_artifact(out / name)
    metrics = {"trials": summary["trials"], "stopped_by_asha": summary["stopped_by_asha"]}
    if summary["best"]:
        metrics["best_objective"] = summary["best"]["objective"]
        parent.log_params({f"best.{k}": summary["best"][k] for k in summary["preset"]["config"]})
    if summary["label_free_vs_test"]["spearman"] is not None:
        metrics["label_free_spearman"] = summary["label_free_vs_test"]["spearman"]
    parent.log_metrics(metrics)
