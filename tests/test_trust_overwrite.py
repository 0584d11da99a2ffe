"""`--overwrite` replaces only what this project wrote, never an input nor a folder holding
one, and a killed writer's staging directory is cleaned up by the next write of the same
target (but never a live writer's, nor one from another host); a write that fails keeps
the last good file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from raypurify.cli import main
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import open_dataset, write_images
from raypurify.errors import RaypurifyError

CLASSES = ["a", "b", "c"]


def small_set(n=30, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ImageSet(images, np.arange(n) % 3, np.arange(n), CLASSES)


def users_folder(root: Path) -> Path:
    mine = root / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2,3")
    return mine


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_a_users_folder(tmp_path, capsys):
    mine = users_folder(tmp_path)
    before = snapshot(mine)
    with pytest.raises(RaypurifyError, match="not written by raypurify"):
        write_images(small_set(), mine, overwrite=True)
    good = write_images(small_set(), tmp_path / "good").path
    for argv in (
        ["datasets", "export", str(good), "--out", str(mine), "--overwrite"],
        ["train", "--data", str(good), "--test", str(good), "--out", str(mine), "--overwrite"],
        ["purify", "--data", str(good), "--out", str(mine), "--overwrite", "--preset", "cpu"],
    ):
        assert main(argv) == 2, argv
        assert "not written by" in capsys.readouterr().err
        assert snapshot(mine) == before


def test_overwrite_never_replaces_the_input_or_its_folder(tmp_path, mlflow_uri, capsys):
    data = tmp_path / "runs" / "data"
    sha = write_images(small_set(), data).sha256
    for out in (data, data.parent):
        argv = ["poison", "--attack", "lsp", "--data", str(data), "--out", str(out)]
        assert main([*argv, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "the input" in err and "choose another --out" in err
        assert open_dataset(data).sha256 == sha


def test_overwrite_replaces_our_own_dataset(tmp_path):
    out = tmp_path / "out"
    write_images(small_set(seed=1), out)
    info = write_images(small_set(seed=2), out, overwrite=True)
    assert open_dataset(out).sha256 == info.sha256
    # A run's --out (train, purify) may replace a dataset too, with --overwrite only.
    from raypurify.atomic import check_claim

    assert check_claim(out, {"run": 1}, overwrite=True) == "replace"
    with pytest.raises(RaypurifyError, match="holds a dataset; .* --overwrite"):
        check_claim(out, {"run": 1})


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import pyarrow.parquet as pq
    from raypurify.data.imageset import ImageSet
    from raypurify.data.interchange import write_images

    def die(table, where, **kwargs):  # killed while writing its first file
        os._exit(9)

    pq.write_table = die
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 3,
        np.arange(30), ["a", "b", "c"],
    )
    write_images(data, sys.argv[1])
    """
)


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def test_a_killed_writers_staging_is_cleaned_on_the_next_write(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], timeout=120)
    assert proc.returncode == 9
    (stale,) = leftovers(out)
    assert stale.is_dir() and not out.exists()

    # A live writer's staging directory (this process's parent stands in for one) and one
    # written from another host (shared storage) are left alone.
    live = tmp_path / f".export.tmp-0badc0de-{os.getppid()}-{socket.gethostname()}"
    remote = tmp_path / ".export.tmp-0badc0de-4194000-some-other-host"
    unrelated = tmp_path / ".exports.tmp-0badc0de-1-x"
    for d in (live, remote, unrelated):
        d.mkdir()

    write_images(small_set(), out)
    assert not stale.exists()
    assert live.exists() and remote.exists() and unrelated.exists()
    assert open_dataset(out).rows == 30
    from raypurify.atomic import clean_stale

    assert clean_stale(out) == []


def test_a_replaced_output_is_kept_until_its_successor_is_in_place(tmp_path):
    """A writer killed between its two renames leaves the old output as `.NAME.old-*` and
    no NAME: that copy is never cleaned away; once NAME exists again, it is."""
    from raypurify.atomic import clean_stale

    out = tmp_path / "out"
    old = write_images(
        small_set(seed=1), tmp_path / f".out.old-0badc0de-4194000-{socket.gethostname()}"
    )
    assert clean_stale(out) == [] and old.path.exists()
    write_images(small_set(seed=2), out)
    assert not old.path.exists() and open_dataset(out).rows == 30


def test_a_checkpoint_or_record_that_fails_to_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    """A save that fails midway (here an object torch cannot pickle, after the file was
    opened) raises, keeps the previous file as it was and leaves no staging file."""
    import torch

    from raypurify.atomic import save_torch, write_bytes

    ckpt = tmp_path / "state.pt"
    save_torch(ckpt, {"epoch": 3})
    with pytest.raises(Exception, match="pickle|lambda"):
        save_torch(ckpt, {"epoch": 4, "hook": lambda: None})
    assert torch.load(ckpt, weights_only=True) == {"epoch": 3}

    record = tmp_path / "step.json"
    write_bytes(record, b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_bytes(record, b"new")
    monkeypatch.undo()
    assert record.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "step.json"]
