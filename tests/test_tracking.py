"""MLflow tracking through `Run` handles, read back with MlflowClient from a real store.

One test drives several checks against one store: every new MLflow SQLite store runs the
schema migrations, which cost seconds each.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raypurify import tracking
from raypurify.tracking import PARENT_TAG, Run, active_run, start_run


def test_tracking_round_trip(ray_session, mlflow_uri, tmp_path, capfd):
    assert tracking.tracking_uri() == mlflow_uri
    check_params_metrics_artifacts(mlflow_uri, tmp_path)
    # The new store's creation is not announced (MLflow's INFO line).
    assert "database tables" not in capfd.readouterr().err
    check_children_and_status(mlflow_uri)
    check_long_and_many_params(mlflow_uri)
    check_logging_from_a_ray_task(mlflow_uri)


def check_params_metrics_artifacts(mlflow_uri, tmp_path):
    run = start_run(
        "exp-a",
        "stage-1",
        params={"train": {"epochs": 3, "optim": {"lr": 0.01}}, "name": "x"},
        tags={"stage": "purify"},
    )
    assert run.uri == mlflow_uri
    run.log_metrics({"loss": 2.0, "acc": 0.1}, step=0)
    run.log_metrics({"loss": 1.5}, step=1)
    run.log_metrics({"loss": 1.25}, step=2)
    run.log_metrics({"mean_clean+p_hat_fast-resnet": 0.5})  # a column label MLflow refuses
    run.log_params({"extra": {"deep": {"key": [1, 2]}}})
    run.set_tags({"purifier": "dvae"})

    note = tmp_path / "note.txt"
    note.write_text("hello")
    run.log_artifact(note)
    run.log_artifact(note, "texts")
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    (folder / "b.txt").write_text("b")
    run.log_artifact(folder, "bundle")
    grid = np.zeros((6, 9, 3), np.uint8)
    grid[:, :, 0] = 255
    run.log_png(grid, "figures/grid.png")
    run.log_png(grid, "top.png")
    run.log_dict({"k": [1, 2]}, "data/summary.json")

    client = MlflowClient(tracking_uri=mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.run_name == "stage-1"
    assert client.get_experiment(got.info.experiment_id).name == "exp-a"
    assert got.data.params == {
        "train.epochs": "3",
        "train.optim.lr": "0.01",
        "name": "x",
        "extra.deep.key": "[1, 2]",
    }
    assert got.data.tags["stage"] == "purify"
    assert got.data.tags["purifier"] == "dvae"
    assert PARENT_TAG not in got.data.tags
    assert got.data.metrics == {"loss": 1.25, "acc": 0.1, "mean_clean_p_hat_fast-resnet": 0.5}
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.5), (2, 1.25)]

    top = {a.path for a in client.list_artifacts(run.run_id)}
    assert top == {"note.txt", "texts", "bundle", "figures", "top.png", "data"}
    assert [a.path for a in client.list_artifacts(run.run_id, "texts")] == ["texts/note.txt"]
    assert {a.path for a in client.list_artifacts(run.run_id, "bundle")} == {
        "bundle/a.txt",
        "bundle/b.txt",
    }
    (png,) = client.list_artifacts(run.run_id, "figures")
    assert png.path == "figures/grid.png" and png.file_size > 0

    # Artifacts live beside the SQLite store, and the PNG decodes to the logged pixels.
    from PIL import Image

    local = client.download_artifacts(run.run_id, "figures/grid.png", str(tmp_path / "dl"))
    assert np.array_equal(np.asarray(Image.open(local)), grid)
    assert (tmp_path / "mlartifacts" / "exp-a").is_dir()
    assert got.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def check_children_and_status(mlflow_uri):
    parent = start_run("exp-b", "sweep", params={"grid": {"eps": [4, 8]}})
    children = [
        parent.child(f"trial-{i}", params={"eps": eps}, trial=i) for i, eps in enumerate([4, 8])
    ]

    with active_run(children[0]) as run:
        run.log_metrics({"acc": 0.5}, step=1)
    with pytest.raises(ValueError, match="diverged"), active_run(children[1]) as run:
        raise ValueError("diverged")
    with active_run(parent):
        pass

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("exp-b")
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in found) == ["trial-0", "trial-1"]
    by_name = {r.info.run_name: r for r in found}
    assert by_name["trial-0"].data.params == {"eps": "4"}
    assert by_name["trial-1"].data.tags["trial"] == "1"
    assert by_name["trial-0"].info.status == "FINISHED"
    assert by_name["trial-1"].info.status == "FAILED"
    assert by_name["trial-0"].data.metrics == {"acc": 0.5}
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert all(r.data.tags[PARENT_TAG] == parent.run_id for r in found)
    # The parent itself is not anyone's child.
    assert PARENT_TAG not in client.get_run(parent.run_id).data.tags
    # A KeyboardInterrupt (not an Exception) still marks the run FAILED.
    third = parent.child("trial-2")
    with pytest.raises(KeyboardInterrupt), active_run(third):
        raise KeyboardInterrupt
    assert client.get_run(third.run_id).info.status == "FAILED"


def check_long_and_many_params(mlflow_uri):
    params = {f"p{i:03d}": i for i in range(230)}
    params["long"] = "x" * 7000
    run = start_run("exp-c", "many", params=params)
    got = MlflowClient(tracking_uri=mlflow_uri).get_run(run.run_id).data.params
    assert len(got) == 231
    assert got["p229"] == "229"
    assert got["long"] == "x" * 6000


def check_logging_from_a_ray_task(mlflow_uri):
    import ray

    parent = start_run("exp-ray", "driver")
    assert pickle.loads(pickle.dumps(parent)) == parent

    @ray.remote
    def worker(handle: Run, rank: int) -> tuple[str, int]:
        import os

        child = handle.child(f"worker-{rank}", params={"rank": rank})
        with active_run(child):
            for step in range(3):
                child.log_metrics({"loss": 1.0 / (step + 1 + rank)}, step=step)
        handle.log_metrics({f"done_{rank}": 1.0}, step=rank)
        return child.run_id, os.getpid()

    run_id, pid = ray.get(worker.remote(parent, 1))
    assert pid != os.getpid()  # really logged from another process
    client = MlflowClient(tracking_uri=mlflow_uri)
    got = client.get_run(run_id)
    assert got.info.run_name == "worker-1"
    assert got.data.params == {"rank": "1"}
    assert got.data.tags[PARENT_TAG] == parent.run_id
    assert got.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([1 / 2, 1 / 3, 1 / 4])
    (done,) = client.get_metric_history(parent.run_id, "done_1")
    assert (done.step, done.value) == (1, 1.0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_store_that_cannot_be_there_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI is checked before anything logs: a server that does not answer
    (in seconds, where MLflow's client retries for minutes), a SQLite path that is a
    folder, another file, or lies under a missing folder. A relative SQLite path, the
    form MLflow's docs use, is made absolute for Ray's workers."""
    from raypurify.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    bad = {
        f"http://127.0.0.1:{free_port()}": "no tracking server answers",
        f"sqlite:///{tmp_path}": "is a folder, not a database file",
        f"sqlite:///{tmp_path / 'notes.txt'}": "is not an SQLite database",
        f"sqlite:///{tmp_path / 'notes.txt' / 'm.db'}": "does not exist",
    }
    for uri, problem in bad.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(ConfigError, match=f"^MLFLOW_TRACKING_URI {uri}: .*{problem}"):
            tracking.tracking_uri()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db")
    (tmp_path / "runs").mkdir()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"
