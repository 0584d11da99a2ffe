"""A failed step keeps its whole error (traceback and causes) in the step's `error.log` and
in the experiment's MLflow run, while the terminal gets one line."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from raypurify.errors import TrainingError
from raypurify.experiments.store import ERROR_LOG, RECORD, Store
from raypurify.tracking import start_run


def failing_step():
    try:
        raise ValueError("worker 0: CUDA error: device-side assert\nframe 1\nframe 2")
    except ValueError as e:
        raise TrainingError("train fast-resnet: training failed (worker errors)") from e


def test_a_failed_step_keeps_its_whole_error(tmp_path, mlflow_uri):
    store = Store(tmp_path / "store")
    directory = store.path("train", "lsp-none", "0123456789abcdef")
    directory.mkdir(parents=True)
    run = start_run("errors", "exp")
    try:
        failing_step()
    except TrainingError as e:
        log = store.fail(directory, e, run=run)
        first_line = str(e).splitlines()[0]
    run.finish()

    text = log.read_text()
    assert first_line in text
    for lost in ("CUDA error: device-side assert", "frame 2", "Traceback", "failing_step"):
        assert lost in text  # everything the one-line summary drops
    assert store.record(directory) is None  # failed, so it reruns

    artifacts = MlflowClient(mlflow_uri).list_artifacts(run.run_id, "errors/train")
    assert [a.path for a in artifacts] == [f"errors/train/{directory.name}"]

    store.finish(directory, {"kind": "train", "meta": {}, "result": {}})
    assert (directory / RECORD).exists() and not (directory / ERROR_LOG).exists()
