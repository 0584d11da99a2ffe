"""The storage root every node must see, checked before a job writes anything.

Everything a job writes (the step store, Ray Train checkpoints, Tune results, exported
datasets) lives under the `--out` the user gives: that is the storage root. On one machine
any path works. On a cluster the driver and the Ray workers run on different nodes, and
each writes its part (a worker its checkpoint, the driver the step record that names it)
straight into that root, so it must be the same directory on every node: NFS, a shared
PVC, a bucket mounted so that it renames (below). A path on the driver's own disk
"works" until a worker on another node writes its checkpoint to *its* disk and the
driver finds nothing, an hour into a run. So every entry point that writes joins Ray
through `join_cluster(out)`, which calls `check_shared(out, "--out")` and
`check_tracking` right after joining: with more than one alive node it refuses, in one
line, a relative path (it resolves against each process's working directory, which under
`ray job submit` is a per-job copy on the head) and a path that some node cannot see.
Visibility is tested, not guessed from the path: the driver writes a marker file with a
random token into the directory and a tiny zero-CPU task pinned to each alive node reads
it back.

URIs (s3://, gs://) are refused with a hint to mount them: Ray Train and Tune accept them
through pyarrow's filesystems, but the step store and the interchange datasets are plain
directories. `check_tracking(uri)` does the same for MLflow: workers log from their own
processes, so on several nodes a SQLite file (each worker's own) is refused in favour of a
tracking server.

Every output is written under a temporary name and renamed into place (atomic.py), so
the root must also rename files and non-empty directories. Some bucket mounts cannot:
Mountpoint for S3 does not rename on general-purpose buckets, and gcsfuse renames a
directory of a flat bucket only up to its `--rename-dir-limit` (0 unless set).
`renames_work` tries both in the root before a multi-node job starts, so such a mount is
refused in one line instead of failing when the first finished step is moved into place.

Nodes that join later (an autoscaler adding workers) are not checked: they come from the
same node template, which is where the shared mount belongs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from raypurify.errors import ConfigError

MARKER_PREFIX = ".raypurify-shared-check-"
RENAME_PREFIX = ".raypurify-rename-check-"
SCRATCH = ".scratch"  # under the storage root: temporary work Ray workers write on a cluster
# A marker written on one NFS client can take a moment to appear on another (attribute
# caches); a node is declared blind only after this many seconds of looking.
LOOK_SECONDS = 3.0
_root: Path | None = None  # the storage root join_cluster last checked in this process


def is_uri(path: str | Path) -> bool:
    """Whether `path` is a URI (s3://, gs://, file://...) rather than a filesystem path."""
    return "://" in str(path)


def alive_nodes() -> list[dict]:
    """The alive nodes of the Ray cluster this process is connected to ([] without Ray)."""
    import ray

    if not ray.is_initialized():
        return []
    return [n for n in ray.nodes() if n.get("Alive")]


def multi_node() -> bool:
    """Whether the connected Ray cluster has more than one alive node."""
    return len(alive_nodes()) > 1


def _looks(path: str, name: str, token: str, seconds: float) -> bool:
    """On a node: whether the marker `name` in `path` holds `token` (looked for `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if (Path(path) / name).read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def unseen_by(path: str | Path, *, seconds: float = LOOK_SECONDS) -> list[str]:
    """The alive nodes (by IP and id prefix) that do not see directory `path` as this
    process does; [] when every node does. `path` must exist and be writable here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory = Path(path)
    token = secrets.token_hex(16)
    name = f"{MARKER_PREFIX}{token[:8]}"
    marker = directory / name
    marker.write_text(token)
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(_looks)
        nodes = alive_nodes()
        refs = [
            look.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(directory), name, token, seconds)
            for n in nodes
        ]
        blind = []
        for node, ref in zip(nodes, refs, strict=True):
            try:
                seen = ray.get(ref, timeout=120 + seconds)
            except ray.exceptions.NodeDiedError:
                continue  # gone meanwhile: it will write nothing
            except ray.exceptions.GetTimeoutError:
                seen = False  # cannot even run a zero-CPU task: not a node to write from
            if not seen:
                blind.append(f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})")
        return blind
    finally:
        marker.unlink(missing_ok=True)


def check_shared(path: str | Path, what: str) -> Path:
    """`path` made absolute, after checking that every node of the cluster sees it.

    On a local Ray (one node) any path is fine. With several alive nodes a relative path,
    a URI, or a directory some node does not see raises a one-line ConfigError naming
    `what` (e.g. "--out"). The directory is created if missing. Call it after joining Ray
    and before writing anything; without Ray it only resolves the path.
    """
    text = str(path)
    if is_uri(text):
        raise ConfigError(
            f"{what}: {text} is a URI; give a directory every node mounts (NFS, a shared "
            "volume, or the bucket mounted with gcsfuse/s3fs)"
        )
    if not multi_node():
        return Path(path).resolve()
    if not os.path.isabs(text):
        raise ConfigError(
            f"{what}: {text} is relative; on a cluster of several nodes give an absolute "
            "path on storage every node mounts (e.g. /mnt/results/...)"
        )
    return visible_everywhere(Path(text), what)


def visible_everywhere(directory: Path, what: str) -> Path:
    """`directory`, created if missing, after every alive node has read a marker in it;
    a one-line ConfigError naming `what` otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        blind = unseen_by(directory)
    except OSError as e:
        raise ConfigError(f"{what}: cannot write to {directory} ({e.strerror or e})") from None
    if blind:
        raise ConfigError(
            f"{what}: {directory} is not visible on node(s) {', '.join(blind)}; on a cluster "
            "give a path on storage every node mounts (NFS, a shared volume), not the "
            "driver's disk"
        )
    renames_work(directory, what)
    return directory


def renames_work(directory: Path, what: str) -> None:
    """Check that `directory` renames a file and a non-empty directory (every output is
    staged and renamed into place); a one-line ConfigError naming `what` otherwise. The
    probe is a hidden folder of its own, removed afterwards."""
    probe = directory / f"{RENAME_PREFIX}{secrets.token_hex(4)}"
    staged, done = probe / "staged", probe / "done"
    kind = "a file"
    try:
        staged.mkdir(parents=True)
        (staged / "part.tmp").write_bytes(b"raypurify")
        os.replace(staged / "part.tmp", staged / "part")
        kind = "a directory"
        os.replace(staged, done)
        if (done / "part").read_bytes() != b"raypurify":
            raise OSError(f"the renamed directory reads back wrong under {probe}")
    except OSError as e:
        raise ConfigError(
            f"{what}: {directory} cannot rename {kind} ({e.strerror or e}); outputs are "
            "written under a temporary name and renamed into place, so give NFS or a "
            "shared volume (a bucket mounted with gcsfuse needs --rename-dir-limit; "
            "Mountpoint for S3 does not rename)"
        ) from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def check_tracking(uri: str) -> str:
    """`uri` (an MLflow tracking URI), refused on a multi-node cluster unless it is a server.

    Workers on every node log their own epochs; a SQLite file or a local folder would be
    a different (or a corrupted, shared-over-NFS) store per node.
    """
    if multi_node() and not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI: {uri} is a local store; on a cluster of several nodes set "
            "it to a tracking server (http://HOST:5000, see cluster/README.md)"
        )
    return uri


def join_cluster(
    out: str | Path, num_cpus: int | None = None, *, tracking: str | None = None
) -> Path:
    """Join Ray (a local one unless RAY_ADDRESS names a cluster), then check that `out`
    and the MLflow store (`tracking`, by default the configured one) suit every node;
    returns `out` made absolute. Entry points call it before writing anything."""
    from raypurify.runtime import init_ray
    from raypurify.tracking import tracking_uri

    global _root
    init_ray(num_cpus)
    checked = _root is not None and _root == Path(out).resolve()  # no second node probe
    path = cast(Path, _root) if checked else check_shared(out, "--out")
    check_tracking(tracking or tracking_uri())
    _root = path
    return path


@contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory for what Ray workers write and the driver reads back (a
    surrogate's checkpoints), removed afterwards: the system's temp dir on one node; on a
    cluster of several nodes a folder under the storage root join_cluster checked, since
    a worker's /tmp is not the driver's."""
    base = None
    if multi_node():
        if _root is None:
            raise ConfigError(
                "on a cluster of several nodes this command needs --out on shared storage"
            )
        base = _root / SCRATCH
        base.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raypurify-", dir=base) as tmp:
        yield Path(tmp)
