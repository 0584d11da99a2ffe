"""Shared fixtures: one real local Ray per test session, a real MLflow store per test,
and the real CIFAR-10 offline copy when ../shared/data is present."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAYPURIFY_OFFLINE", "1")  # tests never download
os.environ.setdefault("RAYPURIFY_PRECISION", "fp32")  # the same numbers on every CPU kind
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if "RAYPURIFY_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["RAYPURIFY_DATA_DIR"] = str(SHARED_DATA)


def pytest_collection_modifyitems(items) -> None:
    """Mark by fixture: `ray` for tests on the session's Ray, `cifar` for real CIFAR-10.
    `pytest -m "not ray and not cifar and not slow"` is the inner loop's fast subset."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & {"ray_session", "local_ray"}:
            item.add_marker(pytest.mark.ray)
        if "cifar10_dir" in used:
            item.add_marker(pytest.mark.cifar)


def pytest_runtest_logreport(report) -> None:
    """Print a failure's traceback as it happens, not at the end: a CI run cut short by its
    time limit still shows why a test failed."""
    if report.failed:
        sys.stderr.write(f"\n{report.nodeid} {report.when} FAILED:\n{report.longreprtext}\n")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once for the whole test session."""
    import ray

    import raypurify  # noqa: F401  (its defaults for a local Ray must be set before it starts)

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


@pytest.fixture(scope="session")
def session_group(ray_session, tmp_path_factory):
    """One warm Ray Train worker group, started at its first use and kept for the session:
    it holds no CPU (worker_group.IDLE_RESOURCES) and serves fits only inside `warm_fits`."""
    from raypurify.worker_group import WarmGroup

    group = WarmGroup(1, tmp_path_factory.mktemp("warm-group"))
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module")
def warm_fits(session_group):
    """The session's warm group serving a module's one-worker CPU fits, as the experiment
    runner's group serves a table's steps (worker_group.py): each fit runs on the real
    hosted path instead of paying a Ray Train start-up of its own (10-15 s on a 2-core
    AVX2 machine), and the modules share one group's start-up. Tests of a fit's own run
    (test_distributed, the subprocess and cluster tests), of a group's own start, restart
    and sizing (some of test_worker_group) and of the runner's own group (test_experiments,
    test_demo_story) do not use it."""
    from raypurify import distributed

    with distributed.serving(session_group):
        yield session_group


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made by MLflow once per session. Making one runs
    MLflow's schema migrations, 5.3 s on a 2-core AMX Xeon (0.01 s to open one), in
    whichever process touches it first (a Ray worker, a subprocess); each test's store is
    a copy of this one, made in milliseconds."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def new_store(template: Path, folder: Path) -> str:
    """The URI of a new MLflow store `folder`/mlflow.db: a copy of the session's empty one."""
    db = folder / "mlflow.db"
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path, monkeypatch):
    """A real MLflow SQLite store in a temporary directory, set for the whole process."""
    uri = new_store(mlflow_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The offline CIFAR-10 copy (skips the test where it is absent)."""
    root = Path(os.environ.get("RAYPURIFY_DATA_DIR", SHARED_DATA)) / "cifar10"
    if not (root / "train.parquet").exists():
        pytest.skip(f"offline CIFAR-10 not found under {root}")
    return root


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid`: a command started with `start_new_session`
    and everything it spawned, Ray's workers included (each in a process group of its
    own, which a signal to the command's group misses)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, *, timeout: float = 60.0) -> None:
    """SIGKILL every process of session `sid` and wait until none is left, so nothing of
    a killed command (a Ray worker finishing its epoch) writes after it is gone."""
    deadline = time.time() + timeout
    while pids := session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.time() > deadline:
            pytest.fail(f"processes {pids} of the killed command outlived SIGKILL")
        time.sleep(0.1)


def holds(ready) -> bool:
    """`ready()`, taken as false where a folder it looks into vanished meanwhile: the
    command's writers rename temporary folders away, and Ray Train rotates checkpoints."""
    try:
        return bool(ready())
    except FileNotFoundError:
        return False


def run_and_kill(
    args: list[str], ready, *, timeout: float = 300.0, sig: int = signal.SIGKILL
) -> tuple[int, str]:
    """Run `args` (a Python command line) in a session of its own with its own local Ray,
    wait until `ready()` is true, then send `sig` to its process group: by default SIGKILL,
    a real crash, Ray included; SIGINT is Ctrl-C, after which the command may finish its
    exit. Whatever of the session outlives the command is then killed, so the caller sees
    the state the command left. Fails if the command ends first or `ready()` never holds.
    Returns the command's exit code and output."""
    env = dict(os.environ, RAY_ADDRESS="")
    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="run_and_kill-") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Ctrl-C as from a terminal: a suite started in the background (`pytest &`)
            # hands its children SIGINT ignored, and Python then never raises
            # KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.time() + timeout
            while not holds(ready):
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(
                        f"the command ended (exit {proc.returncode}) before it could be "
                        f"killed; its output ends:\n{log.read()[-2000:]}"
                    )
                if time.time() > deadline:
                    pytest.fail(f"not ready within {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            if sig == signal.SIGKILL:
                kill_session(proc.pid)
            else:
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kill_session(proc.pid)
        log.seek(0)
        return proc.returncode, log.read()
