"""The interchange format: exact round trips, one-line errors for bad data, atomic writes.

Everything runs for real: real CIFAR-10 images through a real local Ray (Ray Data) and
in-process; bad datasets are built with pyarrow directly, then corrupted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypurify.data import registry
from raypurify.data.codec import encode_batch, encode_png
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import (
    FORMAT,
    MANIFEST,
    finalize,
    open_dataset,
    read_images,
    schema,
    write_images,
)
from raypurify.data.interchange_ray import imageset_to_ray, read_ray, write_ray, write_ray_images
from raypurify.data.spec import DatasetSpec
from raypurify.errors import DatasetError, RaypurifyError, user_error

CLASSES = ["cat", "dog", "emu"]
INT64 = pa.int64()


def small_set(n=12, shape=(8, 8, 3), seed=0, poisoned=False, first_index=100) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    index = np.arange(first_index, first_index + n)
    flags = rng.random(n) < 0.5 if poisoned else None
    return ImageSet(images, labels, index, list(CLASSES), flags, name="small")


def sorted_by_index(data: ImageSet) -> ImageSet:
    return data.take(np.argsort(data.index, kind="stable"))


def assert_same(a: ImageSet, b: ImageSet) -> None:
    a, b = sorted_by_index(a), sorted_by_index(b)
    assert a.images.shape == b.images.shape
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.index, b.index)
    assert a.classes == b.classes
    if a.poisoned is None:
        assert b.poisoned is None
    else:
        assert np.array_equal(a.poisoned, b.poisoned)


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.fixture(scope="module")
def cifar1000(cifar10_dir) -> ImageSet:
    return registry.load(DatasetSpec(name="cifar10", subset=1000))


def test_the_ray_source_streams_each_file_in_blocks_of_bounded_size(
    ray_session, tmp_path, monkeypatch
):
    """read_ray plans its read tasks from the manifest (no sampling); a file larger than a
    block is streamed in several blocks that name their file, and every row comes back
    once."""
    from raypurify.data import ray_source

    data = small_set(n=30)
    info = write_images(data, tmp_path / "d", rows_per_file=12)
    assert len(info.files) == 3
    per_row = max(f.stat().st_size // 12 for f in info.files[:2])
    monkeypatch.setattr(ray_source, "BLOCK_BYTES", 5 * per_row)  # about 5 rows a block
    blocks = list(ray_source.read_rows(info).iter_batches(batch_size=None, batch_format="numpy"))
    assert len(blocks) >= 6 and max(len(b["index"]) for b in blocks) <= 6
    index = np.concatenate([b["index"] for b in blocks])
    assert sorted(index) == sorted(data.index)  # every row, once
    files = {str(f) for f in info.files}
    assert {p for b in blocks for p in b["path"]} == files
    rows = read_ray(info.path).take_all()
    back = ImageSet(
        np.stack([r["image"] for r in rows]),
        np.array([r["label"] for r in rows]),
        np.array([r["index"] for r in rows]),
        data.classes,
    )
    assert_same(back, data)


@pytest.mark.parametrize("fused_write_cpus", [0, 64], ids=["encode-apart", "encode-fused"])
def test_files_have_bounded_row_groups_and_reads_split_by_them(
    ray_session, tmp_path, monkeypatch, fused_write_cpus
):
    """Both writers bound a file's row groups, and the Ray source plans a read task per
    ROWS_PER_TASK rows of whole row groups (decoding then spreads over the CPUs instead of
    one task per file); a Ray write gathers its encoding's rows into full files, whether
    the encoding runs in tasks of its own (a cluster of more than FUSED_WRITE_CPUS CPUs)
    or fused into the write. Every row comes back once."""
    from raypurify.data import interchange, interchange_ray, ray_source

    monkeypatch.setattr(interchange_ray, "FUSED_WRITE_CPUS", fused_write_cpus)
    monkeypatch.setattr(interchange, "ROWS_PER_GROUP", 4)
    monkeypatch.setattr(interchange, "ROWS_PER_FILE", 20)
    monkeypatch.setattr(interchange_ray, "ENCODE_ROWS", 3)
    monkeypatch.setattr(ray_source, "ROWS_PER_TASK", 8)
    data = small_set(n=30)
    local = write_images(data, tmp_path / "local", rows_per_file=20)
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in local.files] == [5, 3]
    assert [r for _, r in ray_source.row_group_chunks(str(local.files[0]))] == [8, 8, 4]
    assert len(ray_source.InterchangeSource(local).get_read_tasks(1)) == 5  # 8+8+4, 8+2

    ray = write_ray(read_ray(local.path), tmp_path / "ray", classes=data.classes, shape=data.shape)
    rows = [pq.ParquetFile(f).metadata.num_rows for f in ray.files]
    assert sum(rows) == 30 and len(rows) <= 2  # 3-row encode blocks gathered into files
    groups = [pq.ParquetFile(f).metadata.row_group(g) for f in ray.files for g in range(2)]
    assert max(g.num_rows for g in groups) <= 4
    assert ray.sha256 == local.sha256
    assert_same(sorted_by_index(read_images(ray.path)), sorted_by_index(data))


def test_cifar_subset_is_real_and_balanced(cifar1000):
    assert len(cifar1000) == 1000
    assert cifar1000.shape == (32, 32, 3)
    assert cifar1000.classes[0] == "airplane" and len(cifar1000.classes) == 10
    assert np.array_equal(cifar1000.class_counts(), np.full(10, 100))
    assert len(np.unique(cifar1000.index)) == 1000


def test_cifar_round_trip_through_ray_data(ray_session, cifar1000, tmp_path):
    # A `poisoned` flag on some rows, as an attack would set it, travels along too.
    flags = np.random.default_rng(0).random(len(cifar1000)) < 0.3
    data = cifar1000.replace(cifar1000.images, poisoned=flags)
    out = tmp_path / "cifar"
    info = write_ray(
        imageset_to_ray(data, rows_per_block=300),
        out,
        classes=data.classes,
        shape=data.shape,
        config={"dataset": {"name": "cifar10", "subset": 1000}},
        parents=[{"source": "cifar10", "split": "train"}],
    )
    assert info.rows == 1000
    assert info.shape == (32, 32, 3)
    assert info.classes == data.classes
    assert info.has_poisoned
    assert info.manifest["config"] == {"dataset": {"name": "cifar10", "subset": 1000}}
    assert info.manifest["parents"] == [{"source": "cifar10", "split": "train"}]

    # Back through Ray Data.
    rows = sorted(read_ray(out).take_all(), key=lambda r: int(r["index"]))
    assert len(rows) == 1000
    back = ImageSet(
        np.stack([r["image"] for r in rows]),
        np.array([r["label"] for r in rows]),
        np.array([r["index"] for r in rows]),
        data.classes,
        np.array([r["poisoned"] for r in rows]),
    )
    assert back.images.dtype == np.uint8
    assert_same(back, data)

    # And in-process.
    assert_same(read_images(out), data)

    # The content hash depends on neither the writer nor how rows are split into files.
    local = write_images(data, tmp_path / "local", rows_per_file=300)
    assert len(local.files) == 4
    assert local.sha256 == info.sha256


def test_write_images_round_trip_with_poisoned_column(tmp_path):
    data = small_set(n=25, poisoned=True)
    assert data.poisoned.any() and not data.poisoned.all()
    info = write_images(data, tmp_path / "ds", rows_per_file=10)
    assert info.rows == 25
    assert [f.name for f in info.files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert info.manifest["files"] == [f.name for f in info.files]
    assert info.has_poisoned
    back = read_images(tmp_path / "ds")
    assert_same(back, data)
    assert back.poisoned.dtype == bool


def test_write_images_round_trip_one_channel(tmp_path):
    data = small_set(n=9, shape=(6, 5, 1))
    info = write_images(data, tmp_path / "gray")
    assert info.shape == (6, 5, 1)
    assert info.manifest["channels"] == 1
    back = read_images(tmp_path / "gray")
    assert back.images.shape == (9, 6, 5, 1)
    assert_same(back, data)
    assert back.poisoned is None


def test_manifest_fields_and_lineage(tmp_path):
    data = small_set()
    a = write_images(data, tmp_path / "a", config={"attack": {"eps": 8}, "seed": 1})
    b = write_images(data, tmp_path / "b", config={"attack": {"eps": 8}, "seed": 1})
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m["format"] == FORMAT
    assert m["rows"] == 12
    assert (m["height"], m["width"], m["channels"]) == (8, 8, 3)
    assert m["classes"] == CLASSES
    assert m["config"] == {"attack": {"eps": 8}, "seed": 1}
    assert m["parents"] == []
    assert m["has_poisoned"] is False
    assert len(m["sha256"]) == 64
    # Same data, same hash; the id is the hash's prefix.
    assert a.sha256 == b.sha256
    assert a.id == a.sha256[:16]

    # Any change to pixels, labels, index or the poisoned flags changes the hash.
    pixels = data.images.copy()
    pixels[3, 2, 1, 0] ^= 1
    variants = {
        "pixels": data.replace(pixels),
        "labels": ImageSet(data.images, (data.labels + 1) % 3, data.index, CLASSES),
        "index": ImageSet(data.images, data.labels, data.index + 1, CLASSES),
        "poisoned": data.replace(data.images, poisoned=np.zeros(len(data), bool)),
    }
    for name, variant in variants.items():
        assert write_images(variant, tmp_path / name).sha256 != a.sha256, name

    # Lineage: a child dataset records its parents' ids.
    child = write_images(data, tmp_path / "child", parents=[a.lineage(), {"source": "x"}])
    assert child.manifest["parents"] == [
        {"id": a.id, "sha256": a.sha256, "path": str(tmp_path / "a")},
        {"source": "x"},
    ]
    assert open_dataset(tmp_path / "child").manifest["parents"][0]["id"] == a.id


# ---------------------------------------------------------------------------------------
# Bad inputs: one-line DatasetError naming the file (and row)


def write_part(
    directory: Path,
    blobs,
    labels,
    index,
    *,
    shape=(8, 8, 3),
    name="part-00000.parquet",
    label_type: pa.DataType = INT64,
    drop: str | None = None,
) -> Path:
    """A parquet file in the interchange schema (metadata included), possibly corrupted."""
    directory.mkdir(parents=True, exist_ok=True)
    sch = schema(CLASSES, shape, poisoned=False)
    cols = {
        "image": pa.array(blobs, pa.binary()),
        "label": pa.array(labels, label_type),
        "index": pa.array(np.asarray(index, np.int64)),
    }
    fields = [pa.field(k, v.type) for k, v in cols.items()]
    if drop:
        del cols[drop]
        fields = [f for f in fields if f.name != drop]
    table = pa.table(cols, schema=pa.schema(fields, metadata=sch.metadata))
    path = directory / name
    pq.write_table(table, path)
    return path


def hand_manifest(directory: Path, files: list[Path], rows: int, shape=(8, 8, 3)) -> None:
    """A manifest written by hand, for files `finalize` would (rightly) refuse."""
    manifest = {
        "format": FORMAT,
        "rows": rows,
        "sha256": "0" * 64,
        "classes": CLASSES,
        "height": shape[0],
        "width": shape[1],
        "channels": shape[2],
        "files": [f.name for f in files],
        "config": {},
        "parents": [],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))


def good_blobs(n=6, shape=(8, 8, 3)):
    return encode_batch(np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8))


def ray_user_error(path) -> RaypurifyError:
    with pytest.raises(Exception) as caught:
        read_ray(path).take_all()
    err = user_error(caught.value)
    assert isinstance(err, DatasetError), f"no DatasetError behind {type(caught.value)}"
    return err


def test_user_error_unwraps_a_ray_task_error(ray_session):
    import ray

    @ray.remote
    def fail():
        raise DatasetError("x.parquet: row 3 (index 7): label 12 outside [0, 10)")

    with pytest.raises(DatasetError) as caught:
        ray.get(fail.remote())
    # Ray's wrapper subclasses DatasetError, but its message is a whole traceback.
    assert "\n" in str(caught.value)
    err = user_error(caught.value)
    assert type(err) is DatasetError
    assert str(err) == "x.parquet: row 3 (index 7): label 12 outside [0, 10)"
    assert user_error(RuntimeError("not ours")) is None


def test_undecodable_image_bytes(ray_session, tmp_path):
    blobs = good_blobs()
    blobs[3] = b"\x89PNG but not really"
    part = write_part(tmp_path / "d", blobs, [0, 1, 2, 0, 1, 2], np.arange(10, 16))
    finalize(tmp_path / "d", config=None, parents=[])

    with pytest.raises(DatasetError) as e:
        read_images(tmp_path / "d")
    msg = one_line(e.value)
    assert msg.startswith(f"{part}: row 3 (index 13): undecodable image bytes")

    msg = one_line(ray_user_error(tmp_path / "d"))
    assert msg.startswith(f"{part}: row with index 13: undecodable image bytes")


def test_label_outside_range(ray_session, tmp_path):
    part = write_part(tmp_path / "d", good_blobs(), [0, 1, 2, 0, 3, 2], np.arange(10, 16))
    finalize(tmp_path / "d", config=None, parents=[])

    with pytest.raises(DatasetError) as e:
        read_images(tmp_path / "d")
    assert one_line(e.value) == f"{part}: row 4 (index 14): label 3 outside [0, 3)"

    msg = one_line(ray_user_error(tmp_path / "d"))
    assert msg == f"{part}: row with index 14: label 3 outside [0, 3)"


def test_negative_label(tmp_path):
    part = write_part(tmp_path / "d", good_blobs(), [0, -1, 2, 0, 1, 2], np.arange(6))
    finalize(tmp_path / "d", config=None, parents=[])
    with pytest.raises(DatasetError, match=r"row 1 \(index 1\): label -1 outside \[0, 3\)") as e:
        read_images(tmp_path / "d")
    assert one_line(e.value).startswith(str(part))


def test_mixed_image_shapes(tmp_path):
    blobs = good_blobs()
    blobs[2] = encode_png(np.zeros((16, 16, 3), np.uint8))
    part = write_part(tmp_path / "d", blobs, [0, 1, 2, 0, 1, 2], np.arange(20, 26))
    finalize(tmp_path / "d", config=None, parents=[])
    with pytest.raises(DatasetError) as e:
        read_images(tmp_path / "d")
    assert one_line(e.value) == (
        f"{part}: row 2 (index 22): image is 16x16x3, the dataset's images are 8x8x3"
    )


def test_mixed_shapes_across_files(tmp_path):
    d = tmp_path / "d"
    write_part(d, good_blobs(3), [0, 1, 2], [0, 1, 2], name="part-00000.parquet")
    second = write_part(
        d,
        good_blobs(3, (4, 4, 3)),
        [0, 1, 2],
        [3, 4, 5],
        shape=(4, 4, 3),
        name="part-00001.parquet",
    )
    with pytest.raises(DatasetError) as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value) == f"{second}: schema metadata differs from the other files"
    assert not (d / MANIFEST).exists()


def test_empty_dataset(tmp_path):
    d = tmp_path / "empty"
    part = write_part(d, [], [], [])
    with pytest.raises(DatasetError) as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value) == f"{d}: dataset is empty (0 rows)"

    # A manifest that admits 0 rows, or claims rows the files lack, is refused too.
    hand_manifest(d, [part], rows=0)
    with pytest.raises(DatasetError, match=r"dataset is empty \(0 rows\)") as e:
        open_dataset(d)
    assert str(d) in one_line(e.value)
    hand_manifest(d, [part], rows=5)
    with pytest.raises(DatasetError, match=r"dataset is empty \(0 rows\)") as e:
        read_images(d)
    assert str(d) in one_line(e.value)

    # No parquet file at all.
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no rows were written"):
        finalize(tmp_path / "none", config=None, parents=[])

    # And an empty ImageSet cannot even be built for write_images.
    with pytest.raises(DatasetError, match=r"dataset is empty \(0 rows\)"):
        ImageSet(np.zeros((0, 8, 8, 3), np.uint8), [], [], CLASSES)


def test_manifest_rows_disagree_with_files(tmp_path):
    d = tmp_path / "d"
    part = write_part(d, good_blobs(), [0, 1, 2, 0, 1, 2], np.arange(6))
    hand_manifest(d, [part], rows=7)
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert one_line(e.value) == f"{d}: manifest says 7 rows, files hold 6"


def test_missing_column(tmp_path):
    d = tmp_path / "d"
    part = write_part(d, good_blobs(), [0, 1, 2, 0, 1, 2], np.arange(6), drop="label")
    with pytest.raises(DatasetError) as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value) == f"{part}: missing column 'label'"

    hand_manifest(d, [part], rows=6)
    for reader in (open_dataset, read_images):
        with pytest.raises(DatasetError) as e:
            reader(d)
        assert one_line(e.value) == f"{part}: missing column 'label'"


def test_wrong_column_type(tmp_path):
    d = tmp_path / "d"
    labels = ["0", "1", "2", "0", "1", "2"]
    part = write_part(d, good_blobs(), labels, np.arange(6), label_type=pa.string())
    with pytest.raises(DatasetError) as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value) == f"{part}: column 'label' has type string, expected int64"

    hand_manifest(d, [part], rows=6)
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert one_line(e.value) == f"{part}: column 'label' has type string, expected int64"


def test_missing_schema_metadata(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    table = pa.table({"image": good_blobs(2), "label": [0, 1], "index": [0, 1]})
    pq.write_table(table, d / "part-00000.parquet")
    with pytest.raises(DatasetError, match="no 'raypurify' schema metadata") as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value).startswith(str(d / "part-00000.parquet"))


def test_duplicated_index(tmp_path):
    d = tmp_path / "d"
    part = write_part(d, good_blobs(), [0, 1, 2, 0, 1, 2], [5, 6, 7, 6, 8, 9])
    with pytest.raises(DatasetError) as e:
        finalize(d, config=None, parents=[])
    assert one_line(e.value) == f"{d}: index 6 appears more than once"
    assert not (d / MANIFEST).exists()

    hand_manifest(d, [part], rows=6)
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert one_line(e.value) == f"{part}: index 6 appears more than once"


def test_duplicated_index_across_files(tmp_path):
    d = tmp_path / "d"
    a = write_part(d, good_blobs(3), [0, 1, 2], [1, 2, 3], name="part-00000.parquet")
    b = write_part(d, good_blobs(3), [0, 1, 2], [4, 3, 5], name="part-00001.parquet")
    with pytest.raises(DatasetError, match="index 3 appears more than once"):
        finalize(d, config=None, parents=[])
    hand_manifest(d, [a, b], rows=6)
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert one_line(e.value) == f"{d}: index 3 appears more than once"


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "nope")
    assert one_line(e.value) == f"{tmp_path / 'nope'}: no such dataset directory"
    d = tmp_path / "half"
    write_part(d, good_blobs(), [0, 1, 2, 0, 1, 2], np.arange(6))
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert one_line(e.value) == f"{d}: not a complete dataset (no {MANIFEST})"
    write_images(small_set(), tmp_path / "root" / "test")  # a root of splits
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "root")
    assert one_line(e.value).endswith(
        f"it holds the split(s) test: name one, e.g. {tmp_path / 'root' / 'test'}"
    )
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        open_dataset(d)


def test_file_listed_in_manifest_but_missing(tmp_path):
    info = write_images(small_set(n=20), tmp_path / "d", rows_per_file=10)
    info.files[1].unlink()
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "d")
    assert one_line(e.value) == f"{info.files[1]}: listed in the manifest but missing"


# ---------------------------------------------------------------------------------------
# Atomic writes


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    first = write_images(small_set(seed=1), out)
    with pytest.raises(RaypurifyError) as e:
        write_images(small_set(seed=2), out)
    assert one_line(e.value) == f"{out} already exists; pass --overwrite to replace it"
    assert open_dataset(out).sha256 == first.sha256
    assert_same(read_images(out), small_set(seed=1))

    second = write_images(small_set(seed=2, n=7), out, overwrite=True)
    assert second.sha256 != first.sha256
    assert_same(read_images(out), small_set(seed=2, n=7))
    # Nothing staged is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fused_write_cpus", [0, 64], ids=["encode-apart", "encode-fused"])
def test_one_pass_writes_each_image_column_as_a_dataset(
    ray_session, tmp_path, monkeypatch, fused_write_cpus
):
    """A purification pass's rows carry P3 (`image`) and P2 (`p2`): one pass over them
    writes both datasets, each with its own config, labels, index and flags; a rerun
    onto an existing output is refused before any work, and leaves both as they were."""
    from raypurify.data import interchange_ray

    monkeypatch.setattr(interchange_ray, "FUSED_WRITE_CPUS", fused_write_cpus)
    data = small_set(n=30, poisoned=True)
    ds = imageset_to_ray(data, rows_per_block=7).map_batches(
        lambda b: b | {"p2": 255 - b["image"]}, batch_format="numpy"
    )
    outputs = {"image": tmp_path / "p3", "p2": tmp_path / "p2"}
    configs = {"image": {"output": "p3"}, "p2": {"output": "p2"}}
    kw = {"classes": data.classes, "shape": data.shape, "configs": configs}
    written = write_ray_images(ds, outputs, **kw)
    assert written["image"].manifest["config"] == {"output": "p3"}
    assert written["p2"].manifest["config"] == {"output": "p2"}
    assert_same(read_images(outputs["image"]), data)
    assert_same(read_images(outputs["p2"]), data.replace(255 - data.images, poisoned=data.poisoned))

    (tmp_path / "p3").rename(tmp_path / "p3-kept")
    outputs["image"] = tmp_path / "p3-kept"
    before = {c: open_dataset(o).sha256 for c, o in outputs.items()}
    with pytest.raises(RaypurifyError, match="already exists"):
        write_ray_images(ds, {"image": tmp_path / "p3-new", "p2": outputs["p2"]}, **kw)
    assert {c: open_dataset(o).sha256 for c, o in outputs.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p2", "p3-kept"]


def test_ray_write_refuses_existing_output(ray_session, tmp_path):
    out = tmp_path / "out"
    first = write_images(small_set(seed=1), out)
    data = small_set(seed=3)
    with pytest.raises(RaypurifyError, match="already exists"):
        write_ray(imageset_to_ray(data), out, classes=CLASSES, shape=data.shape)
    assert open_dataset(out).sha256 == first.sha256
    info = write_ray(imageset_to_ray(data), out, classes=CLASSES, shape=data.shape, overwrite=True)
    assert_same(read_images(info.path), data)


def failing_pipeline(data: ImageSet):
    """A Ray Dataset whose map_batches raises on the second batch (10 rows per batch)."""
    first_batch = set(data.index[:10].tolist())

    def maybe_fail(batch):
        if not set(batch["index"].tolist()) <= first_batch:
            raise RuntimeError("second batch")  # a builtin: workers can unpickle it
        return batch

    ds = imageset_to_ray(data, rows_per_block=10)
    return ds.map_batches(maybe_fail, batch_format="numpy", batch_size=10)


def test_ray_write_runs_a_lazy_pipeline_once(ray_session, tmp_path):
    """Writing must not execute the pipeline twice (e.g. to learn its schema): in a
    purification pass each execution is a full model inference over the dataset."""
    data = small_set(n=40)
    seen = tmp_path / "seen"
    seen.mkdir()

    def mark(batch):
        for i in batch["index"].tolist():  # one file per execution of a row
            (seen / f"{i}-{len(list(seen.glob(f'{i}-*')))}").touch()
        return batch

    ds = imageset_to_ray(data, rows_per_block=10).map_batches(mark, batch_format="numpy")
    info = write_ray(ds, tmp_path / "out", classes=CLASSES, shape=data.shape)
    assert_same(read_images(info.path), data)
    assert len(list(seen.iterdir())) == len(data)


def test_crashed_ray_write_leaves_nothing(ray_session, tmp_path):
    data = small_set(n=40)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="second batch"):
        write_ray(failing_pipeline(data), out, classes=CLASSES, shape=data.shape)
    assert not out.exists()
    with pytest.raises(DatasetError):
        open_dataset(out)
    # Nothing complete anywhere (the staging directory is removed; a write task still in
    # flight when the pipeline failed may leave a stray part file, never a manifest).
    assert not list(tmp_path.rglob(MANIFEST))


def test_crashed_ray_overwrite_keeps_original(ray_session, tmp_path):
    out = tmp_path / "out"
    original = small_set(seed=5)
    first = write_images(original, out)
    data = small_set(n=40, seed=6)
    with pytest.raises(Exception, match="second batch"):
        write_ray(failing_pipeline(data), out, classes=CLASSES, shape=data.shape, overwrite=True)
    assert open_dataset(out).sha256 == first.sha256
    assert_same(read_images(out), original)
    assert list(tmp_path.rglob(MANIFEST)) == [out / MANIFEST]


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import pyarrow.parquet as pq
    from raypurify.data.imageset import ImageSet
    from raypurify.data.interchange import write_images

    real_write = pq.write_table
    written = []

    def write_then_die(table, where, **kwargs):
        if written:  # the process dies (no cleanup, no exception) before the second file
            os._exit(17)
        real_write(table, where, **kwargs)
        written.append(where)

    pq.write_table = write_then_die
    rng = np.random.default_rng(0)
    data = ImageSet(
        rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 3,
        np.arange(30), ["a", "b", "c"],
    )
    write_images(data, sys.argv[1], rows_per_file=10, overwrite=sys.argv[2] == "1")
    print("finished")
    """
)


def run_crashing_writer(out: Path, overwrite: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(out), "1" if overwrite else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr
    assert "finished" not in proc.stdout
    return proc


def staged_leftovers(parent: Path, out: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_killed_in_process_write_leaves_nothing_readable(tmp_path):
    out = tmp_path / "out"
    run_crashing_writer(out, overwrite=False)
    # The process died after writing the first file into its staging directory...
    (staged,) = staged_leftovers(tmp_path, out)
    assert [p.name for p in staged.iterdir()] == ["part-00000.parquet"]
    # ...and nothing was published at the output path.
    assert not out.exists()
    with pytest.raises(DatasetError):
        open_dataset(out)
    with pytest.raises(DatasetError):
        read_images(out)


def test_killed_in_process_overwrite_keeps_original(tmp_path):
    out = tmp_path / "out"
    original = small_set(seed=9)
    first = write_images(original, out)
    run_crashing_writer(out, overwrite=True)
    assert len(staged_leftovers(tmp_path, out)) == 1
    assert open_dataset(out).sha256 == first.sha256
    assert_same(read_images(out), original)
