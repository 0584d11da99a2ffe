"""What a running sweep shows: an overall progress bar and a table of its trials.

A Tune callback in the driver: it sees every trial's reports (the classifier's epochs and
the final scores) and redraws the table when a trial finishes, and at most once a minute
otherwise, so a log file stays readable.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from tqdm import tqdm

from raypurify.sweeps.space import SweepSpace

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ray.tune.experiment import Trial

REDRAW_S = 60.0


class LiveTable(Callback):
    def __init__(self, space: SweepSpace, concurrency: int):
        self.names = list(space.parameters)
        self.samples, self.concurrency = space.budget.samples, concurrency
        self.rows: dict[str, dict] = {}
        self._bar = None
        self._drawn = 0.0

    # Tune stores its callbacks with the experiment; bars do not pickle.
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_bar": None}

    def _progress(self, trials: Iterable[Trial] = ()) -> tqdm:
        """The bar, started at the trials a resumed sweep restored as ended."""
        if self._bar is None:
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            for trial in ended:
                row = self._row(trial)
                row["epoch"] = trial.last_result.get("epoch", 0)
                row["val_accuracy"] = trial.last_result.get("val_accuracy")
                row["objective"] = trial.last_result.get("objective")
                row["status"] = _ended(trial.status, row)
            self._bar = tqdm(
                total=self.samples, initial=len(ended), desc="sweep", unit="trial", position=0
            )
            tqdm.write(f"up to {self.concurrency} trial(s) at once")
        return self._bar

    def _row(self, trial: Trial) -> dict:
        row = self.rows.setdefault(trial.trial_id, {"status": "PENDING", "epoch": 0})
        for name in self.names:
            row[name] = trial.config.get(name)
        return row

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._progress(trials)
        self._row(trial)["status"] = "RUNNING"

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        row = self._row(trial)
        row["status"] = "RUNNING"
        row["epoch"] = result.get("epoch", row["epoch"])
        row["val_accuracy"] = result.get("val_accuracy", row.get("val_accuracy"))
        if "objective" in result:
            row["objective"] = result["objective"]
        if time.monotonic() - self._drawn > REDRAW_S:
            self.draw()

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        row = self._row(trial)
        row["status"] = _ended("TERMINATED", row)
        self._progress(_others(trials, trial)).update(1)
        self.draw()

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._row(trial)["status"] = "ERROR"
        self._progress(_others(trials, trial)).update(1)
        self.draw()

    def draw(self) -> None:
        self._drawn = time.monotonic()
        cols = ["trial", "status", *self.names, "epoch", "val_acc", "objective"]
        lines = ["  ".join(f"{c:>10}" for c in cols)]
        for tid, r in self.rows.items():
            cells = [tid[-10:], r["status"]]
            cells += [_fmt(r.get(n)) for n in self.names]
            cells += [str(r["epoch"]), _fmt(r.get("val_accuracy")), _fmt(r.get("objective"))]
            lines.append("  ".join(f"{c:>10}" for c in cells))
        tqdm.write("\n".join(lines))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _others(trials: list[Trial], trial: Trial) -> list[Trial]:
    return [t for t in trials if t is not trial]


def _ended(status: str, row: dict) -> str:
    if status == "ERROR":
        return "ERROR"
    return "DONE" if row.get("objective") is not None else "STOPPED"


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
