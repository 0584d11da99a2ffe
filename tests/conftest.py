"""Shared fixtures: one real local Ray per test session, a real MLflow store per test,
and the real CIFAR-10 offline copy when ../shared/data is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAYPURIFY_OFFLINE", "1")  # tests never download
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if "RAYPURIFY_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["RAYPURIFY_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=768 * 1024**2,
            log_to_driver=False,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a temporary directory, set for the whole process."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The offline CIFAR-10 copy (skips the test where it is absent)."""
    root = Path(os.environ.get("RAYPURIFY_DATA_DIR", SHARED_DATA)) / "cifar10"
    if not (root / "train.parquet").exists():
        pytest.skip(f"offline CIFAR-10 not found under {root}")
    return root
