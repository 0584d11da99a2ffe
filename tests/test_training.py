"""Classifier training on a real local Ray Train with tiny data: accuracy and outputs, 1 and 2
workers, the in-memory and Ray Data paths, resume after a kill, determinism, bad input, and
`raypurify train` end to end (with a JPEG-defended training set and an MLflow run)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from conftest import run_and_kill

from raypurify.cli import main
from raypurify.data.interchange import open_dataset, read_images, write_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec
from raypurify.defenses.squeeze import JpegOptions, jpeg
from raypurify.errors import ConfigError, DatasetError
from raypurify.models import build_model
from raypurify.training.classifier import METRICS_FILE, MODEL_FILE, train_classifier
from raypurify.training.config import recipe
from raypurify.training.epoch import predict
from raypurify.workers import check_one_batch, saved_state

# The `cpu` recipe shrunk to seconds: 600 synthetic 16 px images of 4 classes.
TINY = ["arch_options.width=8", "batch_size=32", "epochs=4", "eval_subset=null"]
EPOCHS = 4


def synthetic(split: str, rows: int, **fields):
    return load(DatasetSpec(name="synthetic", split=split, rows=rows, **fields))


@pytest.fixture(scope="module")
def train_set():
    return synthetic("train", 600, size=16, classes=4)


@pytest.fixture(scope="module")
def test_set():
    return synthetic("test", 200, size=16, classes=4)


@pytest.fixture(scope="module")
def baseline(ray_session, warm_fits, train_set, test_set, tmp_path_factory):
    """One run of the tiny config, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("baseline")
    return out, train_classifier(train_set, test_set, recipe("cpu", TINY), out)


def weights(out):
    return torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_few_epochs_reach_high_accuracy_and_write_metrics_and_model(baseline, test_set):
    out, metrics = baseline
    assert 0.9 <= metrics["accuracy"] <= 1.0
    saved = json.loads((out / METRICS_FILE).read_text())
    assert {"accuracy", "per_class", "epochs", "wall_s", "config"} <= saved.keys()
    assert saved["accuracy"] == metrics["accuracy"] and saved["epochs"] == EPOCHS
    assert saved["config"] == recipe("cpu", TINY).to_dict()
    assert saved["wall_s"] > 0 and saved["workers"] == 1 and saved["train_rows"] == 600
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3, 4]
    # The wall time splits into the epochs (work) and start-up before the first of them.
    assert saved["work_s"] == pytest.approx(sum(h["epoch_s"] for h in saved["history"]))
    assert 0 < saved["startup_s"] <= saved["wall_s"] - saved["work_s"] + 1e-3
    # Per-class accuracy and the confusion matrix agree with the accuracy.
    confusion = np.array(saved["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == len(test_set)
    assert confusion.trace() / confusion.sum() == pytest.approx(saved["accuracy"])
    counts = test_set.class_counts()
    assert np.allclose(saved["per_class"], confusion.diagonal() / counts)
    assert np.dot(saved["per_class"], counts) / counts.sum() == pytest.approx(saved["accuracy"])

    # model.pt holds plain tensors, and they are the model that was measured.
    state = weights(out)
    model = build_model("fast-resnet", 4, 16, width=8)
    model.load_state_dict(state)
    images = torch.from_numpy(test_set.images).permute(0, 3, 1, 2).contiguous()
    pred = predict(model.to(memory_format=torch.channels_last), images, amp=False).argmax(1)
    accuracy = float((pred.numpy() == test_set.labels).mean())
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1.5 / len(test_set))


def test_two_workers_on_the_ray_data_path_train(ray_session, train_set, test_set, tmp_path):
    """Two workers, each fed its Ray Data shard (one worker from memory: `baseline`)."""
    workers = 2
    cfg = recipe("cpu", [*TINY, f"workers={workers}", "data_path=ray_data"])
    metrics = train_classifier(train_set, test_set, cfg, tmp_path / "out")
    assert metrics["workers"] == workers and metrics["epochs"] == EPOCHS
    assert metrics["train_rows"] == 600
    assert metrics["accuracy"] >= 0.9
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "out" / METRICS_FILE).read_text())["workers"] == workers


def test_same_config_and_seed_give_the_same_model(
    ray_session, warm_fits, baseline, train_set, test_set, tmp_path
):
    first_out, first = baseline
    second = train_classifier(train_set, test_set, recipe("cpu", TINY), tmp_path / "again")
    assert second["accuracy"] == first["accuracy"]
    assert second["confusion"] == first["confusion"]
    assert [h["train_loss"] for h in second["history"]] == [
        h["train_loss"] for h in first["history"]
    ]
    assert same_weights(weights(first_out), weights(tmp_path / "again"))


KILL_SCRIPT = """
import sys
from pathlib import Path
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec
from raypurify.runtime import init_ray
from raypurify.training.config import recipe
from raypurify.training.classifier import train_classifier
init_ray(num_cpus=2)
train = load(DatasetSpec(name="synthetic", rows=600, size=16, classes=4))
test = load(DatasetSpec(name="synthetic", split="test", rows=200, size=16, classes=4))
train_classifier(train, test, recipe("cpu", sys.argv[2:]), Path(sys.argv[1]))
"""


def checkpointed_epoch(storage) -> int:
    try:
        state = saved_state(storage, "train")
    except Exception:  # a checkpoint still being written
        return 0
    return 0 if state is None else state["epoch"]


def test_run_killed_after_a_checkpoint_resumes_to_the_full_epoch_count(
    ray_session, warm_fits, baseline, train_set, test_set, tmp_path
):
    out = tmp_path / "out"
    storage = out / "checkpoints"
    run_and_kill(["-c", KILL_SCRIPT, str(out), *TINY], lambda: checkpointed_epoch(storage) >= 1)
    killed = saved_state(storage, "train")
    assert 1 <= killed["epoch"] < EPOCHS
    assert not (out / METRICS_FILE).exists()

    metrics = train_classifier(train_set, test_set, recipe("cpu", TINY), out)
    assert metrics["epochs"] == EPOCHS
    final = saved_state(storage, "train")
    assert final["epoch"] == EPOCHS
    assert [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    # The epochs before the kill were not trained again: their records are the saved ones.
    done = killed["epoch"]
    assert final["history"][:done] == killed["history"]
    # And the resumed run continued exactly where the killed one stopped (same data order,
    # augmentation and optimiser state): it ends with the uninterrupted run's weights.
    baseline_out, baseline_metrics = baseline
    assert metrics["accuracy"] == baseline_metrics["accuracy"]
    assert same_weights(weights(out), weights(baseline_out))


def test_ctrl_c_during_raypurify_train_says_so_and_the_rerun_resumes(
    ray_session, warm_fits, train_set, test_set, tmp_path, capsys
):
    """Ctrl-C (SIGINT to the command's process group) ends `raypurify train` with
    "interrupted" and exit 130, as every command; Ray Train's own handler, which a fit in
    the main thread would install, must not swallow it or exit without a word."""
    write_images(train_set, tmp_path / "train")
    write_images(test_set, tmp_path / "test")
    out = tmp_path / "out"
    argv = ["train", "--data", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    argv += ["--out", str(out), "--recipe", "cpu", *[a for o in TINY for a in ("--set", o)]]
    ready = lambda: checkpointed_epoch(out / "checkpoints") >= 1  # noqa: E731
    code, output = run_and_kill(["-m", "raypurify", *argv], ready, sig=signal.SIGINT)
    lines = [line.rsplit("\r", 1)[-1].strip() for line in output.splitlines()]
    assert code == 130 and "interrupted" in lines, output[-2000:]
    assert "Traceback" not in output
    killed = saved_state(out / "checkpoints", "train")
    assert 1 <= killed["epoch"] < EPOCHS and not (out / METRICS_FILE).exists()

    assert main(argv) == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert metrics["history"][: killed["epoch"]] == killed["history"]


def test_a_run_shorter_than_its_recipes_warm_up_still_decays():
    from raypurify.training.config import recipe
    from raypurify.training.epoch import lr_factor

    def factors(epochs: int, steps: int = 40) -> list[float]:
        o = recipe("cpu", [f"epochs={epochs}"]).optim
        total, warmup = epochs * steps, int(o.warmup_epochs * steps)
        return [lr_factor(o.schedule, s, total, warmup) for s in range(total)]

    full = factors(14)  # the recipe as the protocol runs it: 2 warm-up epochs, then decay
    assert full[79] == 1.0 and full[0] == 1 / 80 and full[-1] < 0.01
    for epochs in (1, 2, 4):  # at or under the warm-up: a quarter warms up, the rest decays
        f = factors(epochs)
        assert max(f) == 1.0 and f.index(1.0) == epochs * 10 - 1
        assert f[-1] == pytest.approx(1 / (epochs * 30))  # one decay step from zero


def test_a_set_without_a_full_batch_per_worker_is_refused():
    with pytest.raises(ConfigError, match=r"^batch_size: d has 63 rows, .* over 2 workers"):
        check_one_batch(63, 64, 2, "d", "batch_size")  # 31 rows each, batches of 32
    check_one_batch(64, 64, 2, "d", "batch_size")
    check_one_batch(2, 1, 1, "d", "batch_size")


def test_bad_inputs_are_refused_before_training(ray_session, train_set, test_set, tmp_path):
    cfg = recipe("cpu", TINY)
    out = tmp_path / "out"
    other_classes = synthetic("test", 50, size=16, classes=5)
    with pytest.raises(DatasetError, match=r"classes .*\(5\) differ .*\(4\)"):
        train_classifier(train_set, other_classes, cfg, out)
    other_size = synthetic("test", 50, size=24, classes=4)
    with pytest.raises(DatasetError, match=r"24x24x3.*16x16x3"):
        train_classifier(train_set, other_size, cfg, out)
    with pytest.raises(ConfigError) as e:
        train_classifier(train_set, test_set, recipe("cpu", [*TINY, "arch=resnet7"]), out)
    message = str(e.value)
    assert message.startswith("arch: unknown architecture 'resnet7'")
    assert all(name in message for name in ("resnet18", "fast-resnet", "mobilenetv2"))
    one_class = train_set.take(np.flatnonzero(train_set.labels == 2))
    with pytest.raises(DatasetError, match="at least 2 classes"):
        train_classifier(one_class, test_set, cfg, out)
    # More GPU workers than this local Ray has GPUs: an error, not an endless wait.
    with pytest.raises(ConfigError, match=r"^workers: 64 GPU worker\(s\) need 64 GPU"):
        train_classifier(
            train_set, test_set, recipe("cpu", [*TINY, "device=cuda", "workers=64"]), out
        )
    assert not out.exists()


def test_train_cli_with_jpeg_defence_writes_metrics_defended_set_and_mlflow_run(
    ray_session, warm_fits, mlflow_uri, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    source = load(DatasetSpec(name="cifar10-sample", subset=200, seed=1))
    data = write_images(source, tmp_path / "data").path
    out = tmp_path / "run"
    sets = ["epochs=1", "arch_options.width=8", "batch_size=32", "defense.options.quality=20"]
    common = ["train", "--data", str(data), "--test", "cifar10-sample", "--recipe", "cpu"]
    for item in sets:
        common += ["--set", item]
    assert main([*common, "--out", str(out), "--defense", "jpeg"]) == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"accuracy {metrics['accuracy']:.2%} after 1 epoch ")
    assert printed.endswith(f"-> {out}/metrics.json")
    assert metrics["config"]["defense"] == {"name": "jpeg", "options": {"quality": 20}}
    assert metrics["train_rows"] == 200 and metrics["test_rows"] == 1000  # the bundled test split
    assert (out / MODEL_FILE).exists()

    # The defended training set, in the interchange format, is what was trained on.
    info = open_dataset(out / "defended")
    assert info.rows == 200
    assert info.manifest["config"] == {"defense": "jpeg", "options": {"quality": 20}}
    assert info.manifest["parents"] == [{"source": str(data)}]
    defended = read_images(out / "defended")
    order, source_order = np.argsort(defended.index), np.argsort(source.index)
    expected = jpeg(source.images[source_order], JpegOptions(quality=20))
    assert np.array_equal(defended.images[order], expected)
    assert np.array_equal(defended.labels[order], source.labels[source_order])

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe"] == "cpu" and run.data.params["defense.name"] == "jpeg"
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])

    # An unknown architecture is one line on stderr and exit status 2, before any work.
    bad = tmp_path / "bad"
    assert main([*common, "--out", str(bad), "--defense", "jpeg", "--arch", "resnet7"]) == 2
    assert "error: arch: unknown architecture 'resnet7'" in capsys.readouterr().err
    assert not bad.exists()
