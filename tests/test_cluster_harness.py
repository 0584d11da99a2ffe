"""A two-node Ray cluster plus an MLflow tracking server on this machine, for the cluster
tests (no tests here). Started with the real CLIs (`ray start`, `mlflow server`, `ray job
submit`), every server on 127.0.0.1 with its own ports and temp folder, so it can run beside
other Ray instances on the same box; stopped by the pids it started, never by `ray stop`
(which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START_TIMEOUT = 600  # s; a loaded 2-core box takes minutes to start a Ray node


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    """Head (1 CPU) + second node (2 CPUs, resource `second`) + `mlflow server`."""

    def __init__(self, base: Path, repo: Path):
        self.base = base
        self.repo = repo
        self.shared = base / "shared"  # every node sees it: the storage root
        self.private = base / "private"  # tmpfs-covered on the second node
        self.mlflow_db = base / "mlflow" / "mlflow.db"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: set[int] = set()
        self.walls: dict[str, float] = {}
        self.isolated = False
        gcs, dash, client, mlflow, *rest = free_ports(4 + 2 * 6)
        self.gcs, self.dash, self.client_port, self.mlflow_port = gcs, dash, client, mlflow
        self.node_ports = [rest[:6], rest[6:]]
        self.mlflow_uri = f"http://127.0.0.1:{mlflow}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.env = os.environ | {
            "RAY_AUTH_MODE": "disabled",  # explicit: 2.59+ may turn token auth on by itself
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "RAYPURIFY_THREADS": "1",
            "PYTHONPATH": str(repo),
            # A loaded box starts a node's agents slowly; Ray's default (30 s) kills the raylet.
            "RAY_agent_register_timeout_ms": "300000",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("MLFLOW_TRACKING_URI", None)

    # -- processes -------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.base / log, "ab")  # noqa: SIM115 (lives as long as the process)
        p = subprocess.Popen(
            cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = p
        self.pids.add(p.pid)
        return p

    def _node_cmd(self, i: int) -> list[str]:
        nm, om, metrics, agent, agent_grpc, renv = self.node_ports[i]
        lo = 20000 + 2000 * i + (self.gcs % 1000) * 2  # worker ports, apart per node
        return [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(nm), "--object-manager-port", str(om),
            "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(renv),
            "--min-worker-port", str(lo), "--max-worker-port", str(lo + 999),
            "--object-store-memory", str(200 * 1024**2),
            "--num-gpus", "0", "--disable-usage-stats",
            "--temp-dir", str(self.base / "ray"),
        ]  # fmt: skip

    def start(self) -> None:
        for d in (self.shared, self.private, self.mlflow_db.parent):
            d.mkdir(parents=True, exist_ok=True)
        head = self._node_cmd(0) + [
            "--head", "--port", str(self.gcs), "--num-cpus", "1",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash),
            "--ray-client-server-port", str(self.client_port),
        ]  # fmt: skip
        self._start_node("head", head, lambda: self._alive_nodes() >= 1)
        self.start_second_node()
        self._spawn(
            "mlflow",
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.mlflow_db}",
                "--artifacts-destination", str(self.base / "mlflow" / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
            ],
            "mlflow.log",
        )  # fmt: skip
        self._until(self._mlflow_up, "the MLflow server to start")
        self.head_node_id, self.second_node_id = self._node_ids()

    def start_second_node(self) -> None:
        """Start (or, after a kill, replace) the second node, in its own mount namespace
        with a tmpfs over `private` when this user may make one."""
        before = self._alive_nodes()
        cmd = self._node_cmd(1) + [
            "--address", f"127.0.0.1:{self.gcs}", "--num-cpus", "2",
            "--resources", json.dumps({"second": 1}),
        ]  # fmt: skip
        self.isolated = (
            shutil.which("unshare") is not None
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
        )
        if self.isolated:
            quoted = " ".join(f"'{c}'" for c in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs '{self.private}' && exec {quoted}"]  # fmt: skip
        self._start_node("second", cmd, lambda: self._alive_nodes() > before)
        self.second_node_id = self._node_ids()[1]

    def _start_node(self, name: str, cmd: list[str], up, attempts: int = 5) -> None:
        """`ray start` a node until `up()`. On a loaded box `ray start` can give up (its
        raylet must register within 30 s, its agents within the agent timeout): then
        every process of that attempt is killed and it starts again."""
        for _ in range(attempts):
            p = self._spawn(name, cmd, f"{name}.log")
            deadline = time.monotonic() + START_TIMEOUT
            while p.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if up():
                        return
                time.sleep(1)
            for pid in [p.pid, *_descendants(p.pid)]:
                _signal(pid, signal.SIGKILL)
            if name == "head":  # nothing else of ours runs yet: orphans included
                for pid in self._ours():
                    _signal(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        raise RuntimeError(f"{name} did not start: {self._tail(name)}")

    def kill_second_node(self) -> None:
        """SIGKILL every process of the second node: `ray start`, raylet, agents, workers."""
        p = self.procs["second"]
        for pid in [p.pid, *_descendants(p.pid)]:
            _signal(pid, signal.SIGKILL)
        p.wait()

    def wait_node_dead(self) -> None:
        dead = self.second_node_id
        self._until(lambda: dead not in self._alive_ids(), "the killed node to be seen dead")

    def stop(self) -> None:
        """Stop what this cluster started (second node, head, MLflow), children first."""
        for name in ("second", "head", "mlflow"):
            p = self.procs.get(name)
            if p is None:
                continue
            tree = _descendants(p.pid)
            _signal(p.pid, signal.SIGTERM)
            # a head that has run jobs does not exit on SIGTERM within 30 s (measured):
            # a short grace, then the tree is killed
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            for pid in [p.pid, *tree, *_descendants(p.pid)]:
                _signal(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        # Orphans (workers whose raylet went first) still name our temp folder.
        for pid in self._ours():
            _signal(pid, signal.SIGKILL)

    def _ours(self) -> list[int]:
        """Live processes whose command line names this cluster's temp folder."""
        key = str(self.base)
        return [pid for pid, cmd in _processes().items() if key in cmd and pid != os.getpid()]

    def leftovers(self) -> list[str]:
        time.sleep(1)
        table = _processes()
        left = set(self._ours()) | {pid for pid in self.pids if pid in table}
        return [f"{pid} {table.get(pid, '')[:100]}" for pid in sorted(left)]

    # -- state -----------------------------------------------------------------------

    def _until(self, ok, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if name != "second" and p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self._tail(name)}")
            try:
                if ok():
                    return
            except Exception:  # noqa: BLE001 (not up yet)
                pass
            time.sleep(1)
        raise TimeoutError(f"timed out waiting for {what}")

    def _tail(self, name: str) -> str:
        log = self.base / f"{name}.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def _mlflow_up(self) -> bool:
        with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=5) as r:
            return r.status == 200

    def _nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [
            n.__dict__ for n in list_nodes(address=self.dashboard, raise_on_missing_output=False)
        ]

    def _alive_ids(self) -> set[str]:
        return {n["node_id"] for n in self._nodes() if n["state"] == "ALIVE"}

    def _alive_nodes(self) -> int:
        return len(self._alive_ids())

    def _node_ids(self) -> tuple[str, str | None]:
        head = second = None
        for n in self._nodes():
            if n["state"] != "ALIVE":
                continue
            if n["is_head_node"]:
                head = n["node_id"]
            elif "second" in (n.get("resources_total") or {}):
                second = n["node_id"]
        return head, second

    def train_worker_nodes(self) -> dict[str, str]:
        """actor id -> node id of every Ray Train worker this cluster ran."""
        from ray.util.state import list_actors

        actors = list_actors(
            address=self.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
            limit=10000, raise_on_missing_output=False,
        )  # fmt: skip
        return {a.actor_id: a.node_id for a in actors}

    # -- jobs ------------------------------------------------------------------------

    def driver_script(self, code: str) -> dict:
        """Run `code` as a Ray driver of this cluster; it prints 'RESULT <json>'."""
        env = self.env | {"RAY_ADDRESS": f"127.0.0.1:{self.gcs}"}
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
            cwd=self.base,
        )  # fmt: skip
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT ") :])

    def submit(self, name: str, entrypoint: list[str]) -> str:
        """`ray job submit --no-wait` of `entrypoint`; returns the submission id."""
        job = f"{name}-{os.getpid()}-{int(time.time())}"
        runtime_env = {
            "env_vars": {
                "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "RAYPURIFY_THREADS": "1",
                "PYTHONPATH": str(self.repo),
            }
        }
        r = subprocess.run(
            [
                sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                "--address", self.dashboard, "--submission-id", job, "--no-wait",
                "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
            ],
            env=self.env, capture_output=True, text=True, timeout=600, cwd=self.shared,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        return job

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def status(self, job: str) -> str:
        return str(self._client().get_job_status(job).value)

    def wait(self, job: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = self.status(job)
        while status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
            status = self.status(job)
        return status

    def logs(self, job: str) -> str:
        return self._client().get_job_logs(job)

    def record_wall(self, key: str, job: str) -> None:
        info = self._client().get_job_info(job)
        self.walls[key] = round((info.end_time - info.start_time) / 1000, 1)
        print(f"\njob wall times (s): {json.dumps(self.walls)}", file=sys.stderr)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _processes() -> dict[int, str]:
    """pid -> command line of every live (not zombie) process."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st is None or st[0] == "Z":
            continue
        try:
            table[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return table


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    parents = {}
    for p in _processes():
        st = _stat(p)
        if st is not None:
            parents.setdefault(st[1], []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
