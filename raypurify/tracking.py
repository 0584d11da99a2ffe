"""MLflow tracking through a small picklable run handle.

`Run` holds only the tracking URI and the run id, so it crosses process boundaries: the
driver creates a run (or a parent and its children) and passes the handle to Ray Train
workers or Ray Data actors, which log through `MlflowClient` (thread-safe, no global
state). The default store is SQLite in the working directory, MLflow's embedded default;
MLFLOW_TRACKING_URI points everything at a server instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypurify.config import flatten
from raypurify.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_CHARS = 6000
_NOT_IN_A_NAME = re.compile(r"[^\w\-. :/]")  # MLflow refuses a metric or param name with any


def key(name: str) -> str:
    """`name` as MLflow takes a metric or param name: a column label such as
    `clean+p_hat` or `d-vae (k=3)` puts its other characters into names, which MLflow
    refuses, failing the whole batch; they become `_`."""
    return _NOT_IN_A_NAME.sub("_", name)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` in the working directory; a
    relative SQLite path is made absolute (Ray's workers run in other directories), and
    the store is checked once per process (`check_store`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path.cwd() / uri.removeprefix('sqlite:///')}"
    return check_store(uri)


@functools.cache
def check_store(uri: str) -> str:
    """`uri` if a store can be there: a tracking server that answers (its /health, within
    seconds, where MLflow's own client retries for minutes), or a SQLite file that is a
    database or can become one. Else one line naming MLFLOW_TRACKING_URI."""
    import urllib.error
    import urllib.request

    problem = None
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # a server answered (behind a proxy or with auth, /health may differ)
        except (urllib.error.URLError, OSError, ValueError) as e:
            problem = f"no tracking server answers ({getattr(e, 'reason', e)})"
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_dir():
            problem = f"{db} is a folder, not a database file"
        elif not db.parent.is_dir():
            problem = f"folder {db.parent} does not exist"
        elif db.is_file() and db.stat().st_size and not _is_sqlite(db):
            problem = f"{db} is not an SQLite database"
    if problem:
        raise ConfigError(f"MLFLOW_TRACKING_URI {uri}: {problem}")
    return uri


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    if os.environ.get("RAYPURIFY_VERBOSE") != "1":
        # A new local store announces its tables at INFO, the first thing a newcomer's
        # first command prints; set here, after MLflow's import has configured its loggers.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def open_store(uri: str) -> None:
    """Open `uri`'s store in this process ahead of its first run (MLflow keeps one per
    URI), as a warm worker does while it waits. A store that cannot be opened is left to
    fail the first run that logs to it, with that run's own error."""
    with contextlib.suppress(Exception):
        _client(uri).search_experiments(max_results=1)


def _retry(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """SQLite allows one writer at a time; retry briefly when several processes log at once."""
    for attempt in range(8):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException or sqlalchemy OperationalError
            if "locked" not in str(e).lower() or attempt == 7:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the local database rather than in the current directory.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _folder(artifact_file: str) -> str | None:
    """The artifact folder of `artifact_file` (None at the top level)."""
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


@dataclass(frozen=True)
class Run:
    """A handle to one MLflow run, safe to send to Ray workers."""

    uri: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return _client(self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(key(k)[:250], str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key(k), float(v), now, step or 0) for k, v in metrics.items()]
        _retry(self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        _retry(
            self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact (and close it)."""
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            self.log_artifact(path, _folder(artifact_file))

    def log_png(self, image: np.ndarray, artifact_file: str) -> None:
        """Log a uint8 HWC array (an image grid) as a PNG artifact."""
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            Image.fromarray(image).save(path)
            self.log_artifact(path, _folder(artifact_file))

    def child(self, name: str, params: Mapping[str, Any] | None = None, **tags: Any) -> Run:
        """Start a child run (a sweep trial, a purification stage) under this one."""
        run = self.client.get_run(self.run_id)
        exp = self.client.get_experiment(run.info.experiment_id).name
        return start_run(exp, name, params=params, parent=self, uri=self.uri, tags=tags)

    def finish(self, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, self.run_id, status)


def start_run(
    experiment: str,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    parent: Run | None = None,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Run:
    """Create a run in `experiment` (created if needed) and log `params` flattened."""
    uri = uri or (parent.uri if parent else tracking_uri())
    client = _client(uri)
    exp_id = _retry(_experiment_id, client, uri, experiment)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent is not None:
        all_tags[PARENT_TAG] = parent.run_id
    info = _retry(client.create_run, exp_id, run_name=name, tags=all_tags).info
    run = Run(uri=uri, run_id=info.run_id)
    if params:
        run.log_params(params)
    return run


@contextlib.contextmanager
def active_run(run: Run) -> Iterator[Run]:
    """Mark `run` FINISHED when the block succeeds, FAILED (and re-raise) when it does not."""
    try:
        yield run
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
