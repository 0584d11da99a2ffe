"""The experiment's outputs: the attack x defence table (CSV, markdown, JSON), a grouped
bar chart, a figure of images through the pipeline (clean, poisoned, amplified
perturbation, P1, P3) for each attack, and the purification trace (what each defence
output kept of the poison, see trace.py).

Everything is rebuilt from the finished steps' records, so `raypurify report DIR` can
redo it without re-running anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from raypurify.atomic import write_json
from raypurify.experiments import trace
from raypurify.experiments.spec import ExperimentSpec

RUN_FILE = "run.json"
REPORT_FILES = ("results.md", "results.csv", "accuracy.png", "images.png")  # what users open
# What an experiment folder holds: a new run writes only into one of these (or an empty one).
EXPERIMENT_SIGNS = (RUN_FILE, "store")


def collect(spec: ExperimentSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Cells (row, column, classifier -> accuracy), derived columns included."""
    cells = [
        {**r["meta"], **{k: v for k, v in r["result"].items() if k != "per_class"}}
        for r in records
        if r["kind"] == "train" and r.get("result")
    ]
    for d in spec.defenses:
        if not d.best_of:
            continue
        for row in rows(spec):
            for c in spec.classifiers:
                found = [
                    x
                    for x in cells
                    if x["row"] == row and x["classifier"] == c.name and x["column"] in d.best_of
                ]
                if len(found) == len(d.best_of):
                    best = max(found, key=lambda x: x["accuracy"])
                    cells.append(
                        {
                            "row": row,
                            "column": d.column,
                            "classifier": c.name,
                            "accuracy": best["accuracy"],
                            "chosen": best["column"],
                        }
                    )
    budgets = {
        r["meta"]["row"]: r["result"].get("budget")
        for r in records
        if r["kind"] == "poison" and r.get("result")
    }
    purifications = {
        f"{r['meta']['row']}/{r['meta']['column']}": r["result"].get("wall_s")
        for r in records
        if r["kind"] == "purify" and r.get("result")
    }
    return {
        "name": spec.name,
        "cells": cells,
        "budgets": budgets,
        "purify_wall_s": purifications,
        "trace": trace.trace(records),
        "time_split": time_split(records),
    }


def time_split(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind of Ray step (train, purify), the steps' wall seconds and how much of it
    was work (training epochs, inference batches); the rest is start-up, data hand-off,
    checkpoints and teardown. Steps reused from the store count as when they ran."""
    split: dict[str, dict[str, float]] = {}
    for r in records:
        work = (r.get("result") or {}).get("work_s")
        if work is None or "seconds" not in r:
            continue
        kind = split.setdefault(r["kind"], {"steps": 0, "wall_s": 0.0, "work_s": 0.0})
        kind["steps"] += 1
        kind["wall_s"] += r["seconds"]
        kind["work_s"] += work
    return split


def rows(spec: ExperimentSpec) -> list[str]:
    return (["clean"] if spec.clean_row else []) + [a.row for a in spec.attacks]


def columns(spec: ExperimentSpec) -> list[str]:
    from raypurify.experiments.steps import DISENTANGLE_COLUMN

    extra = [DISENTANGLE_COLUMN] if "disentangle" in spec.analyses else []
    return [d.column for d in spec.defenses] + extra


def lookup(
    results: dict[str, Any], row: str, column: str, classifier: str, key: str = "accuracy"
) -> float | None:
    for c in results["cells"]:
        if (c["row"], c["column"], c["classifier"]) == (row, column, classifier):
            return c.get(key)
    return None


def gap(results: dict[str, Any], row: str, column: str, classifier: str) -> float | None:
    """Training minus test accuracy of a cell: about the clean row's for a training set
    that teaches the images, far above it for one that still teaches a shortcut."""
    fit = lookup(results, row, column, classifier, "train_accuracy")
    test = lookup(results, row, column, classifier)
    return None if fit is None or test is None else fit - test


def gap_markdown(spec: ExperimentSpec, results: dict[str, Any]) -> list[str]:
    """Each classifier's generalisation gap, cell by cell (cells trained before the
    training accuracy was kept show '-')."""
    cols, out = columns(spec), []
    for c in spec.classifiers:
        vals = {(r, col): gap(results, r, col, c.name) for r in rows(spec) for col in cols}
        if all(v is None for v in vals.values()):
            continue
        out += [
            f"Generalisation gap, classifier `{c.name}`: accuracy on its own training rows "
            "in the last epoch minus clean test accuracy (points). A poison's shortcut is "
            "learned and fails on clean images, so a cell far above the clean row's gap "
            "trained on a set that still teaches one:",
            "",
            "| attack | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for row in rows(spec):
            out.append(f"| {row} | " + " | ".join(pct(vals[row, col]) for col in cols) + " |")
        out.append("")
    return out


def markdown(spec: ExperimentSpec, results: dict[str, Any]) -> str:
    out = [f"# {spec.name}", ""]
    if spec.description:
        out += [spec.description.strip(), ""]
    cols = columns(spec)
    attack_rows = [a.row for a in spec.attacks]
    for c in spec.classifiers:
        out += [f"Clean test accuracy (%), classifier `{c.name}` (recipe `{c.recipe}`):", ""]
        out.append("| attack | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for row in rows(spec):
            vals = [lookup(results, row, col, c.name) for col in cols]
            out.append(f"| {row} | " + " | ".join(pct(v) for v in vals) + " |")
        means = [mean([lookup(results, r, col, c.name) for r in attack_rows]) for col in cols]
        out.append("| **mean (attacks)** | " + " | ".join(pct(v) for v in means) + " |")
        if spec.clean_row:
            clean = lookup(results, "clean", cols[0], c.name)
            drops = [None if m is None or clean is None else clean - m for m in means]
            out.append(f"| drop vs clean ({cols[0]}) | " + " | ".join(pct(v) for v in drops) + " |")
        out.append("")
    out += gap_markdown(spec, results)
    out += detection_markdown(results.get("detection", []))
    out += trace.markdown(results.get("trace", []), rows(spec))
    chosen = [x for x in results["cells"] if "chosen" in x]
    if chosen:
        picks = ", ".join(f"{x['row']}: {x['chosen']}" for x in chosen)
        out += [f"Derived columns pick the better input column per row ({picks}).", ""]
    out += time_markdown(results.get("time_split", {}))
    if starts := results.get("warm_groups_start_s"):
        out += [
            f"Warm worker groups: {len(starts)}, each up {min(starts):.1f}-{max(starts):.1f} s "
            "after it was opened at the run's start (the steps above do not count it: the "
            "steps that hold no CPUs ran meanwhile, and each training step started once a "
            "group was up for it).",
            "",
        ]
    if results.get("wall_s"):
        out.append(f"Wall time of this run: {results['wall_s'] / 60:.1f} min.")
    return "\n".join(out) + "\n"


STEP_REST = "worker start-up, data hand-off, checkpoints, teardown"


def time_markdown(split: dict[str, dict[str, float]], rest: str = STEP_REST) -> list[str]:
    """`time_split` as a table; `rest` says what a step does besides its work."""
    if not split:
        return []
    out = [
        "Where the steps' time went (work: training epochs and inference batches; the rest:",
        f"{rest}):",
        "",
        "| step | steps | wall (s) | work (s) | the rest (s) | the rest (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, t in sorted(split.items()):
        rest = t["wall_s"] - t["work_s"]
        share = 100 * rest / t["wall_s"] if t["wall_s"] else 0.0
        out.append(
            f"| {kind} | {t['steps']} | {t['wall_s']:.1f} | {t['work_s']:.1f} | {rest:.1f} "
            f"| {share:.0f} |"
        )
    return [*out, ""]


def detection_markdown(detection: list[dict[str, Any]]) -> list[str]:
    """UE detection from the stage-1 p_hat (paper Table 8), one row per attack."""
    scored = [d for d in detection if "norm" in d]
    if not scored:
        return []
    out = [
        "UE detection from the stage-1 p_hat, Otsu threshold, no labels (%):",
        "",
        "| attack | statistic | accuracy | precision | recall | F1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in scored:
        for stat in ("norm", "class_cosine"):
            m = d[stat]
            out.append(
                f"| {d['row']} | {stat} | {pct(m['accuracy'])} | {pct(m['precision'])} "
                f"| {pct(m['recall'])} | {pct(m['f1'])} |"
            )
    return [*out, ""]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals and len(vals) == len(values) else None


def write_csv(results: dict[str, Any], path: Path) -> None:
    keys = [
        "row",
        "column",
        "classifier",
        "accuracy",
        "train_accuracy",
        "epochs",
        "wall_s",
        "chosen",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for cell in sorted(
            results["cells"], key=lambda c: (c["classifier"], c["row"], c["column"])
        ):
            w.writerow(cell)


def bar_chart(spec: ExperimentSpec, results: dict[str, Any], path: Path) -> None:
    """Grouped bars, row by row, each labelled with its accuracy (a cell not trained is
    left out, not drawn at 0); the clean row's first column (in the presets, no defence)
    as a dashed line: what every defended bar is trying to reach."""
    from raypurify.reports.plots import plt

    cols, row_names = columns(spec), rows(spec)
    c = spec.classifiers[0].name
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(row_names) * len(cols) / 3), 4))
    width = 0.8 / len(cols)
    for j, col in enumerate(cols):
        cells = [(i, lookup(results, r, col, c)) for i, r in enumerate(row_names)]
        xs = [i + j * width for i, v in cells if v is not None]
        vals = [100 * v for _, v in cells if v is not None]
        bars = ax.bar(xs, vals, width, label=col)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    clean = lookup(results, "clean", cols[0], c) if spec.clean_row else None
    if clean is not None:
        ax.axhline(100 * clean, color="0.3", linestyle="--", linewidth=1)
        ax.text(len(row_names) - 0.5, 100 * clean + 1, f"clean, {cols[0]}", ha="right", fontsize=8)
    ax.set_xticks(np.arange(len(row_names)) + 0.4 - width / 2, row_names)
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{spec.name}: {c}")
    ax.legend(ncol=min(len(cols), 4), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(
    spec: ExperimentSpec, results: dict[str, Any], out: Path, records: list[dict[str, Any]]
) -> list[Path]:
    """results.json/.csv/.md, the bar chart (with a classifier to chart) and the image
    figure; returns the paths."""
    files = [out / "results.json", out / "results.csv", out / "results.md"]
    write_json(files[0], results)
    write_csv(results, files[1])
    files[2].write_text(markdown(spec, results))
    if spec.classifiers:  # a spec without one makes the datasets and their trace only
        files.append(out / "accuracy.png")
        bar_chart(spec, results, files[-1])
    from raypurify.reports.figures import pipeline_figure

    figure = pipeline_figure(spec, records, out / "images.png")
    if figure:
        files.append(figure)
    return files


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    by_column: dict[str, list[float]] = {}
    for c in results["cells"]:
        if c["row"] != "clean":
            by_column.setdefault(f"mean_{c['column']}_{c['classifier']}", []).append(c["accuracy"])
    return {k: float(np.mean(v)) for k, v in by_column.items()}


def save_run(out: Path, spec: ExperimentSpec, step_dirs: list[str]) -> None:
    """The spec and its steps' directories, as `store/<kind>/<slug-key>` under `out`."""
    steps = [f"store/{Path(d).parent.name}/{Path(d).name}" for d in step_dirs]
    write_json(out / RUN_FILE, {"spec": spec.to_dict(), "steps": steps})


def load_run(out: Path) -> tuple[ExperimentSpec, list[dict[str, Any]]]:
    """The spec and finished step records of the last run in `out` (for `report`)."""
    from raypurify.errors import RaypurifyError
    from raypurify.experiments.store import RECORD, read_record

    f = out / RUN_FILE
    if not f.exists():
        raise RaypurifyError(f"{out}: no {RUN_FILE}; is this an experiment output directory?")
    try:
        data = json.loads(f.read_text())
        spec = ExperimentSpec.model_validate(data["spec"])
        steps = [str(d) for d in data["steps"]]
    except (ValueError, KeyError, TypeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise RaypurifyError(f"{f}: not a run record ({detail}); rerun the experiment") from None
    # Each step is found in this directory's store, whatever path it was recorded with
    # (older run.json files hold absolute ones): a moved or copied experiment reports its
    # own steps.
    here = [out / "store" / Path(d).parent.name / Path(d).name for d in steps]
    records = [read_record(d / RECORD) for d in here if (d / RECORD).exists()]
    return spec, records
