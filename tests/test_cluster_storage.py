"""raypurify.storage on a local Ray (one node): what the check refuses without a cluster,
and that its node probe really reads the marker on the node. The multi-node refusals (a
relative path, a folder one node does not see, a SQLite tracking store) are exercised on a
real two-node cluster in test_cluster_multinode.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from raypurify import storage
from raypurify.errors import ConfigError


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from raypurify.runtime import init_ray

    started = not ray.is_initialized()
    os.environ.pop("RAY_ADDRESS", None)
    # On a loaded box a node's agents can take longer than Ray's 30 s to register.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    for attempt in range(3):
        try:
            init_ray(1)
            break
        except Exception:  # noqa: BLE001 ("node timed out during startup": try once more)
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("uri", ["s3://bucket/out", "gs://b/x", "file:///tmp/x"])
def test_uri_refused_in_one_line(uri):
    with pytest.raises(ConfigError) as e:
        storage.check_shared(uri, "--out")
    msg = str(e.value)
    assert msg.startswith("--out: ") and uri in msg and "\n" not in msg


def test_without_ray_only_resolves(tmp_path, monkeypatch):
    import ray

    # As a process that never joined Ray sees it, even when the session's Ray is up.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert storage.check_shared("rel/out", "--out") == tmp_path / "rel" / "out"
    assert not (tmp_path / "rel").exists()  # nothing created without a cluster to check
    assert storage.check_tracking("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_one_node_accepts_relative_and_local(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not storage.multi_node()
    assert len(storage.alive_nodes()) == 1
    assert storage.check_shared("out", "--out") == tmp_path / "out"
    assert storage.check_tracking("sqlite:///x.db") == "sqlite:///x.db"


def test_probe_reads_the_marker_on_every_node(local_ray, tmp_path):
    assert storage.unseen_by(tmp_path) == []
    assert not list(tmp_path.iterdir()), "the marker must be removed"


def test_probe_reports_a_node_that_reads_another_token(local_ray, tmp_path):
    """The task on the node compares the token, not just the file's existence: a stale
    marker with the same name but other content (another folder of the same name on the
    node's own disk) does not count as seen."""
    import ray

    name = f"{storage.MARKER_PREFIX}deadbeef"
    (tmp_path / name).write_text("another token")
    look = ray.remote(num_cpus=0)(storage._looks)
    assert ray.get(look.remote(str(tmp_path), name, "the driver's token", 0.5)) is False
    assert ray.get(look.remote(str(tmp_path), name, "another token", 0.5)) is True
    assert ray.get(look.remote(str(tmp_path / "missing"), name, "x", 0.5)) is False


def test_unwritable_root_is_one_line(local_ray, tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(ConfigError) as e:
        storage.visible_everywhere(target / "sub", "--out")
    assert str(e.value).startswith(f"--out: cannot write to {target / 'sub'}")
    assert "\n" not in str(e.value)


def test_visible_everywhere_creates_the_root(local_ray, tmp_path):
    root = tmp_path / "a" / "b"
    assert storage.visible_everywhere(root, "--out") == root
    assert root.is_dir() and not list(root.iterdir())


def mount_without(kind: str, monkeypatch) -> None:
    """Make os.replace fail as a bucket mount does: EXDEV for a directory (gcsfuse at its
    default --rename-dir-limit of 0), ENOTSUP for anything (Mountpoint for S3)."""
    real = os.replace

    def replace(src, dst):
        if kind == "anything" or Path(src).is_dir():
            err = errno.ENOTSUP if kind == "anything" else errno.EXDEV
            raise OSError(err, os.strerror(err))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(("kind", "what"), [("directory", "a directory"), ("anything", "a file")])
def test_a_root_that_cannot_rename_is_refused_in_one_line(
    local_ray, tmp_path, monkeypatch, kind, what
):
    """The check runs after the visibility probe, and leaves nothing in the root."""
    mount_without(kind, monkeypatch)
    with pytest.raises(ConfigError) as e:
        storage.visible_everywhere(tmp_path, "--out")
    msg = str(e.value)
    assert msg.startswith(f"--out: {tmp_path} cannot rename {what} (") and "\n" not in msg
    assert "--rename-dir-limit" in msg
    assert not list(tmp_path.iterdir())


def test_renames_work_on_a_local_disk(tmp_path):
    storage.renames_work(tmp_path, "--out")
    assert not list(tmp_path.iterdir())


def test_scratch_on_one_node_is_a_system_temp_dir_removed_after(local_ray, tmp_path):
    import tempfile

    storage.join_cluster(tmp_path / "out")
    with storage.scratch() as work:
        (work / "state.pt").write_bytes(b"x")
        assert work.parent == Path(tempfile.gettempdir())
    assert not work.exists()
    assert not (tmp_path / "out" / storage.SCRATCH).exists()  # nothing left in --out
