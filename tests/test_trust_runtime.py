"""Imports over the protocol's budget need an explicit flag and the budget is recorded
either way; a local Ray started by raypurify listens on the loopback interface only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from raypurify.cli import main
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import open_dataset, write_images

CLASSES = ["a", "b", "c"]


@pytest.fixture
def base(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(40, 216, (30, 8, 8, 3), dtype=np.uint8)
    return write_images(ImageSet(images, np.arange(30) % 3, np.arange(30), CLASSES), tmp_path / "b")


def import_argv(base, noise, out, *extra):
    return [
        "poison", "import", "--format", "perturbation", "--from", str(noise),
        "--base", str(base.path), "--out", str(out), *extra,
    ]  # fmt: skip


def test_over_budget_import_needs_a_flag_and_records_its_budget(base, tmp_path, mlflow_uri, capsys):
    big = tmp_path / "big.npy"
    # l_inf 40/255 and l2 2.2: over every budget of the protocol (l_inf 8/255, l2 1, l0 1)
    np.save(big, np.full((30, 3, 8, 8), 40 / 255, np.float32))
    out = tmp_path / "out"
    assert main(import_argv(base, big, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-over-budget" in err and "linf" in err
    assert not out.exists()

    assert main(import_argv(base, big, out, "--allow-over-budget")) == 0
    config = open_dataset(out).manifest["config"]
    assert config["budget"]["linf_255"] == pytest.approx(40)
    assert config["budget_check"]["within"] is False
    assert config["budget_check"]["allowed_over"] is True

    small = tmp_path / "small.npy"
    np.save(small, np.full((30, 3, 8, 8), 8 / 255, np.float32))
    ok = tmp_path / "ok"
    assert main(import_argv(base, small, ok, "--set", "attack=em")) == 0
    config = open_dataset(ok).manifest["config"]
    assert config["budget"]["linf_255"] == pytest.approx(8)
    assert config["budget_check"] == {
        "limits": {"linf": pytest.approx(8 / 255)},
        "within": True,
        "fits": ["linf"],
        "allowed_over": False,
    }


LISTENERS = textwrap.dedent(
    """
    import json, os, ray
    from raypurify.runtime import init_ray

    def tree(root):
        children = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = set(), [root]
        while todo:
            p = todo.pop()
            out.add(p)
            todo.extend(children.get(p, []))
        return out

    def socket_inodes(pids):
        found = set()
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        found.add(link[8:-1])
            except OSError:
                continue
        return found

    def listening(inodes):
        addrs = []
        for table in ("tcp", "tcp6"):
            for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                    addrs.append(f[1].split(":")[0])
        return addrs

    init_ray(1)
    ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
    from ray._private.authentication.authentication_utils import get_authentication_mode_name
    from ray._raylet import get_authentication_mode

    auth = get_authentication_mode_name(get_authentication_mode())
    print(json.dumps({"listening": sorted(listening(socket_inodes(tree(os.getpid())))),
                      "auth": auth}))
    ray.shutdown()
    """
)

# /proc/net/tcp{,6} addresses in hex: 127.0.0.1, and ::ffff:127.0.0.1 and ::1 in tcp6.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.ray  # starts its own local Ray
def test_local_ray_listens_on_loopback_only_with_token_auth_and_no_notice_of_it_or_its_start():
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    for _ in range(3):  # Ray gives its raylet 30 s to register: a loaded machine may miss it
        proc = subprocess.run(
            [sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300, env=env
        )
        if "timed out during startup" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    found = report["listening"]
    assert len(found) >= 3  # GCS, raylet, a worker, agents
    assert set(found) <= LOOPBACK, found
    assert report["auth"] == "token"  # Ray's default for a new local cluster, kept
    assert "Token authentication is enabled" not in proc.stderr  # ...without its notice
    assert "Started a local Ray instance" not in proc.stderr  # nor Ray's INFO line
