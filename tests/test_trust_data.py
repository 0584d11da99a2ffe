"""Dataset integrity: a manifest is checked before the step store trusts its content id.

Files stay inside the dataset and are listed once, row counts match the manifest on open,
content edited after the manifest was written is caught (per-file size and sha256 on open,
the full content hash on demand), and the content id itself is what it always was, so
stores written before these checks are still reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypurify.cli import main
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import MANIFEST, open_dataset, read_images, write_images
from raypurify.errors import DatasetError

CLASSES = ["a", "b", "c"]


def small_set(n=30, seed=0, poisoned=False) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    flags = np.arange(n) % 2 == 0 if poisoned else None
    return ImageSet(images, np.arange(n) % 3, np.arange(n), CLASSES, poisoned=flags)


def edit(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m.update(changes)
    (d / MANIFEST).write_text(json.dumps(m))


def repaint(d: Path, drop_file_info: bool = False) -> None:
    """Change one pixel in place after the manifest was written (same rows, same schema)."""
    data = read_images(d)
    images = data.images.copy()
    images[3, 2, 2, 0] ^= 1
    other = write_images(data.replace(images), d.parent / "repainted")
    part = d / "part-00000.parquet"
    part.write_bytes((other.path / "part-00000.parquet").read_bytes())
    if drop_file_info:
        m = json.loads((d / MANIFEST).read_text())
        del m["file_info"]
        (d / MANIFEST).write_text(json.dumps(m))


def test_content_id_is_unchanged_by_the_new_records(tmp_path):
    """The same rows hash to the id the code before per-file records computed (measured
    with that code), so every stored step key stays valid."""
    info = write_images(small_set(poisoned=True), tmp_path / "x", rows_per_file=7)
    assert info.sha256 == "8599186435880b3de0f2a9d50fcf471af067f103de0a4c56849eb8d2055f81a7"
    assert set(info.manifest["file_info"]) == {f.name for f in info.files}
    for f in info.files:
        assert info.manifest["file_info"][f.name]["bytes"] == f.stat().st_size


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_files_outside_the_dataset_are_not_read(tmp_path, where):
    d = write_images(small_set(), tmp_path / "d").path
    other = write_images(small_set(seed=5), tmp_path / "other").path
    outside = other / "part-00000.parquet"
    if where == "relative":
        edit(d, files=["../other/part-00000.parquet"])
    elif where == "absolute":
        edit(d, files=[str(outside)])
    else:
        (d / "part-00000.parquet").unlink()
        os.symlink(outside, d / "part-00000.parquet")
    with pytest.raises(DatasetError, match="not a plain name|links outside"):
        open_dataset(d)


def test_a_file_listed_twice_is_refused(tmp_path):
    d = write_images(small_set(), tmp_path / "d").path
    edit(d, files=["part-00000.parquet", "part-00000.parquet"], rows=60, file_info={})
    with pytest.raises(DatasetError, match="listed more than once"):
        open_dataset(d)


def test_a_file_copied_under_a_second_name_is_refused_without_file_records(tmp_path):
    """A manifest from before per-file records cannot tell a copy by its bytes; the rows'
    indices can: the same row twice is refused on open."""
    import shutil

    d = write_images(small_set(), tmp_path / "d").path
    shutil.copy(d / "part-00000.parquet", d / "part-00001.parquet")
    edit(d, files=["part-00000.parquet", "part-00001.parquet"], rows=60, file_info={})
    with pytest.raises(DatasetError, match="index 0 appears more than once"):
        open_dataset(d)


def test_row_counts_are_checked_on_open(tmp_path):
    d = write_images(small_set(), tmp_path / "d").path
    edit(d, rows=29, file_info={})
    with pytest.raises(DatasetError, match="manifest says 29 rows, files hold 30"):
        open_dataset(d)  # before any reader (Ray Data's included) streams the rows


def test_pixels_edited_after_the_manifest_are_caught_on_open(tmp_path):
    d = write_images(small_set(), tmp_path / "d").path
    sha = open_dataset(d).sha256
    repaint(d)
    assert pq.ParquetFile(d / "part-00000.parquet").metadata.num_rows == 30
    with pytest.raises(DatasetError, match="differ|changed after"):
        open_dataset(d)
    assert json.loads((d / MANIFEST).read_text())["sha256"] == sha


def test_full_check_on_demand_catches_edits_in_a_legacy_dataset(tmp_path, capsys):
    """A manifest without per-file records opens, but `verify` recomputes the content id."""
    good = write_images(small_set(), tmp_path / "good").path
    assert main(["datasets", "verify", str(good)]) == 0
    assert open_dataset(good).id in capsys.readouterr().out

    d = write_images(small_set(), tmp_path / "d").path
    repaint(d, drop_file_info=True)
    open_dataset(d)  # only the cheap checks: sizes and hashes were not recorded
    with pytest.raises(DatasetError, match="does not match the manifest"):
        open_dataset(d, verify=True)
    assert main(["datasets", "verify", str(d)]) == 2
    assert "does not match" in capsys.readouterr().err
