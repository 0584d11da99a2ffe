"""The step store: every step's output in a directory named by a hash of what made it.

A step's key hashes its kind, its config and the fingerprints of its inputs (a dataset's
content sha256), so changing anything upstream changes every key downstream, and an
unchanged step is found again: a rerun skips it, an interrupted run resumes it, and a
second classifier trained on a purified set reuses that purification. A step is finished
when its `step.json` exists (written last, atomically). A step that fails keeps its whole
error, traceback and cause included, in `error.log` beside its partial output (and in the
experiment's MLflow run); the terminal shows only its first line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from raypurify.atomic import write_bytes, write_json
from raypurify.config import format_validation_error
from raypurify.errors import RaypurifyError

if TYPE_CHECKING:
    from raypurify.tracking import Run

RECORD = "step.json"
ERROR_LOG = "error.log"


def step_key(kind: str, config: dict[str, Any], fingerprints: list[str]) -> str:
    blob = json.dumps({"kind": kind, "config": config, "inputs": fingerprints}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, slug: str, key: str) -> Path:
        return self.root / kind / f"{slug}-{key}"

    def record(self, directory: Path) -> dict[str, Any] | None:
        """The finished step's record, or None if it has not finished."""
        f = directory / RECORD
        return read_record(f) if f.exists() else None

    def finish(self, directory: Path, record: dict[str, Any]) -> None:
        write_json(directory / RECORD, record)
        (directory / ERROR_LOG).unlink(missing_ok=True)  # an earlier attempt's

    def fail(self, directory: Path, error: BaseException, run: Run | None = None) -> Path:
        """Keep a failed step's full error (the traceback and its causes, Ray's remote
        traceback included) in `error.log`, and in MLflow `run` as errors/<step>.log."""
        text = "".join(traceback.format_exception(error))
        path = directory / ERROR_LOG
        write_bytes(path, text.encode())
        if run is not None:  # the log on disk is what matters; MLflow may be unreachable
            with contextlib.suppress(Exception):
                run.log_artifact(path, f"errors/{directory.parent.name}/{directory.name}")
        return path

    def forget(self, directory: Path) -> None:
        """Delete a step's output so it runs again (`--force`)."""
        if directory.exists():
            shutil.rmtree(directory)

    def records(self) -> list[dict[str, Any]]:
        """Every finished step's record (for `raypurify report`)."""
        return [read_record(f) for f in sorted(self.root.glob(f"*/*/{RECORD}"))]


class Shape(BaseModel):
    """What the readers of a record (report, trace, figures, resume) take from it; other
    fields pass. Strict: a number written as a string is a wrong record, not a number."""

    model_config = ConfigDict(extra="allow", strict=True)


class DatasetResult(Shape):
    path: str
    sha256: str
    rows: int


class StageOutput(Shape):
    path: str


class PurifyResult(DatasetResult):
    purify_dir: str
    outputs: dict[str, StageOutput] = {}


class CellResult(Shape):
    accuracy: float


class TrialResult(Shape):
    val_accuracy: float
    test_accuracy: float


class CellMeta(Shape):
    row: str
    column: str
    classifier: str


class StepRecord(Shape):
    kind: str
    name: str
    config: dict[str, Any] = {}
    meta: dict[str, str] = {}
    reads: dict[str, Any] = {}
    result: dict[str, Any]


# Each kind's result; a table cell's meta (its place in the table) is checked too.
RESULTS: dict[str, type[Shape]] = {
    "data": DatasetResult,
    "poison": DatasetResult,
    "defend": DatasetResult,
    "disentangle": DatasetResult,
    "purify": PurifyResult,
    "train": CellResult,
}


def read_record(f: Path) -> dict[str, Any]:
    """A step record, or one line naming the file and the field when it is not one
    (edited, truncated, written by something else)."""
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RaypurifyError(
            f"{f}: unreadable step record ({getattr(e, 'msg', type(e).__name__)}); delete "
            "that step's directory to rerun it"
        ) from None
    check_shape(f, StepRecord, data)
    if data.get("config", {}).get("evaluate") == "validation":  # a sweep trial's classifier
        check_shape(f, TrialResult, data["result"], "result")
    elif data["kind"] in RESULTS:
        check_shape(f, RESULTS[data["kind"]], data["result"], "result")
        if data["kind"] == "train":
            check_shape(f, CellMeta, data["meta"], "meta")
    return cast(dict[str, Any], rebase(data, f.parent))


def check_shape(f: Path, shape: type[Shape], data: Any, where: str = "") -> None:
    try:
        shape.model_validate(data)
    except ValidationError as e:
        raise RaypurifyError(
            f"{f}: not a step record ({format_validation_error(e, where)}); delete that "
            "step's directory to rerun it"
        ) from None


def rebase(value: Any, directory: Path) -> Any:
    """`value` with every absolute path inside a step directory named like `directory`
    (its kind and `slug-key`, which the key makes unique) moved under `directory`: a
    record keeps the absolute paths it was written with, so an experiment directory that
    was moved or copied still reads its own outputs, never the old location's."""
    if isinstance(value, dict):
        return {k: rebase(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, directory) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        parts, own = Path(value).parts, (directory.parent.name, directory.name)
        for i in range(len(parts) - 1):
            if parts[i : i + 2] == own:
                return str(directory.joinpath(*parts[i + 2 :]))
    return value
