"""Serve the MLflow UI against the project's store and point at a sweep's comparison.

A sweep leaves one parent run and one child run per trial; what a user wants afterwards
is the trials side by side (kld1, kld2, lambda against the objective). MLflow's
compare-runs page shows exactly that, but its address is a hash route listing every run
id, so `raypurify ui` builds it from the sweep's `sweep.json` and the store, and the
sweep prints the same link through `comparison_url`.

The server is `mlflow server` in a process group of its own, so it is stopped by that
group and nothing broader, whether the user presses Ctrl-C or `raypurify ui` is sent
SIGTERM/SIGHUP. It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import quote

from raypurify.errors import ConfigError, RaypurifyError

if TYPE_CHECKING:
    from types import FrameType

DEFAULT_PORT = 5000
SWEEP_FILE = "sweep.json"
SWEEP_KEYS = ("tracking_uri", "experiment_id", "experiment_name", "parent_run_id")
PARENT_TAG = "mlflow.parentRunId"  # the same tag raypurify.tracking sets on child runs


# --- addresses -----------------------------------------------------------------------------


def comparison_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare-runs page for `run_ids`.

    The route is the one the bundled UI (MLflow 3.x, `Routes.getCompareRunPageRoute`)
    builds itself: `#/compare-runs?runs=<JSON list>&experiments=<JSON list>`. The JSON is
    percent-encoded so that terminals recognise the whole link; the UI decodes it.
    """
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    exps = quote(json.dumps([str(experiment_id)], separators=(",", ":")), safe="")
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table (child runs grouped under their parent)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}"


def base_url(host: str, port: int) -> str:
    """The address a browser on this machine uses (a wildcard bind is reached via loopback)."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# --- the sweep and its runs ---------------------------------------------------------------


def load_sweep(directory: str | Path) -> dict[str, Any]:
    """Read DIR/sweep.json, the sweep's pointer to its MLflow store and parent run."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "a file, not a sweep's folder" if directory.exists() else "no such directory"
        raise ConfigError(f"--sweep {directory}: {what}")
    path = directory / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"--sweep {directory}: no {SWEEP_FILE} (is it a sweep's --out?)")
    try:
        sweep = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(sweep).__name__}")
    for key in SWEEP_KEYS:
        if not isinstance(sweep.get(key), str) or not sweep[key]:
            raise ConfigError(f"{path}: `{key}` is missing or not a non-empty string")
    return sweep


def sweep_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    """The sweep's trial runs (MLflow Run entities, deleted ones left out), oldest first:
    the parent's children that carry a trial id, not the runs of the steps a sweep prepares
    (its poison), which hang below the parent too."""
    from mlflow.tracking import MlflowClient

    from raypurify.sweeps.tracking import TRIAL_TAG
    from raypurify.tracking import _retry

    client = MlflowClient(tracking_uri=tracking_uri)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs, token = [], None
    while True:
        page = _retry(
            client.search_runs,
            [str(experiment_id)],
            filter_string=query,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    trials = [r for r in runs if TRIAL_TAG in r.data.tags]
    return sorted(trials, key=lambda r: (r.info.start_time or 0, r.info.run_id))


# --- the store ----------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def check_store(uri: str) -> None:
    """Refuse a local store that does not exist: `mlflow server` would create an empty one."""
    if uri.startswith(("http://", "https://")):
        return
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(
            f"no MLflow store at {db} (run an experiment first, or point MLFLOW_TRACKING_URI "
            "or --backend-store-uri at one)"
        )


def artifacts_destination(uri: str) -> Path | None:
    """Where the local store keeps artifacts: `mlartifacts/` beside the database, as
    raypurify.tracking lays it out; None when the store is not a local SQLite file."""
    db = sqlite_path(uri)
    return None if db is None else db.parent / "mlartifacts"


# --- ports ----------------------------------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` right now (no listener, not reserved)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server binds: a closed connection's TIME_WAIT does not hold the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def choose_port(host: str, port: int | None) -> tuple[int, str | None]:
    """The port to serve on and, when it is not the one asked for, a note saying why.

    An explicit port that is taken is an error (the user meant that one); the default
    5000 that is taken (often by another MLflow, or macOS's AirPlay) falls back to a free one.
    """
    if port is not None:
        if not 0 < port < 65536:
            raise ConfigError(f"--port {port}: not a TCP port (1-65535)")
        if not port_free(host, port):
            raise ConfigError(f"--port {port}: already in use on {host}")
        return port, None
    if port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT, None
    chosen = free_port(host)
    return chosen, f"port {DEFAULT_PORT} is in use on {host}; serving on {chosen} instead"


# --- the server -----------------------------------------------------------------------------


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` against `uri`, one worker (the UI is for one user, on a small machine)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    dest = artifacts_destination(uri)
    if dest is not None:
        # Runs logged by raypurify carry file:// artifact URIs under this folder, which the
        # server reads directly; runs created through the UI's own proxy land here too
        # instead of in the current directory.
        cmd += ["--serve-artifacts", "--artifacts-destination", dest.as_uri()]
    return cmd


def server_env() -> dict[str, str]:
    """The environment for `mlflow server`, without its GenAI job runner unless asked for.

    MLflow 3 starts a job runner with seven huey consumer processes beside the UI, for
    GenAI evaluation jobs that a sweep never submits; on a small machine shared with
    training they only take memory and CPU. MLFLOW_SERVER_ENABLE_JOB_EXECUTION, when set,
    still wins.
    """
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll the server's /health until it answers OK; fail with its last log line if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RaypurifyError(
                f"mlflow server exited with code {proc.returncode}: {_last_line(log)} (log: {log})"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RaypurifyError(f"mlflow server did not answer at {url} within {timeout:.0f} s ({log})")


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "no output"


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the server's own process group (uvicorn and its worker): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # The leader may be gone while its worker still holds the port: sweep the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


# Ctrl-C, kill and a closed terminal all stop the server. SIGINT is handled explicitly too:
# a process started in the background by a non-interactive shell inherits it ignored.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    """Raised by the stop signals' handler so that the `finally` stopping the server runs."""


def _raise_stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Stop(signal.Signals(signum).name)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    sweep_dir: str | Path | None = None,
    backend_store_uri: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Start the UI, print its URLs, wait for Ctrl-C (or SIGTERM), stop the server.

    The store is --backend-store-uri, else the sweep's own `tracking_uri`, else the
    project's (MLFLOW_TRACKING_URI or ./mlflow.db). A tracking server (http URI) already
    serves the UI, so then only the links are printed.
    """
    from raypurify.tracking import tracking_uri

    out = out or sys.stdout
    sweep = load_sweep(sweep_dir) if sweep_dir is not None else None
    uri = backend_store_uri or (sweep["tracking_uri"] if sweep else None) or tracking_uri()
    check_store(uri)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking server at {uri} serves the MLflow UI itself", file=out)
        _print_links(uri.rstrip("/"), uri, sweep, out)
        return 0

    port, note = choose_port(host, port)
    if note:
        print(note, file=out)
    url = base_url(host, port)
    log = Path(tempfile.gettempdir()) / f"raypurify-ui-{port}.log"
    previous = {s: signal.signal(s, _raise_stop) for s in _STOP_SIGNALS}
    proc = None
    try:
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                server_command(uri, host, port),
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped by that group, nothing else
            )
        print(f"starting the MLflow UI on {uri} (server pid {proc.pid}, log {log})", file=out)
        wait_ready(url, proc, log)
        print(f"MLflow UI: {url}", file=out)
        _print_links(url, uri, sweep, out)
        print("press Ctrl-C to stop", file=out, flush=True)
        while proc.poll() is None:
            time.sleep(0.5)
        raise RaypurifyError(f"mlflow server exited with code {proc.returncode} ({log})")
    except (KeyboardInterrupt, _Stop):
        print("stopping the MLflow UI", file=out, flush=True)
        return 0
    finally:
        for s in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _print_links(url: str, uri: str, sweep: dict[str, Any] | None, out: TextIO) -> None:
    """The sweep's parent run and the comparison of its trials (if any have started)."""
    if sweep is None:
        return
    exp, parent = sweep["experiment_id"], sweep["parent_run_id"]
    print(f"sweep {sweep['experiment_name']!r}: {experiment_url(url, exp)}", file=out)
    runs = sweep_runs(uri, exp, parent)
    if not runs:
        print(f"no trial runs under parent run {parent} yet", file=out)
        return
    ids = [r.info.run_id for r in runs]
    print(f"compare its {len(ids)} trials: {comparison_url(url, exp, ids)}", file=out, flush=True)
