"""Interchange datasets through Ray Data: decoded rows in, datasets out (`interchange.py`
has the format, its manifest and the in-process reads and writes).

`read_ray` decodes a dataset in map_batches over read tasks planned from its manifest
(`ray_source.py`); `write_ray` and `write_ray_images` PNG-encode a Ray Dataset's rows and
write them through the same staged directory, verification and manifest as every write;
`imageset_to_ray` hands an in-memory ImageSet to Ray Data. The file layout (rows per file
and per row group) is the format's, read from `interchange` at each write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raypurify.atomic import staged_dir
from raypurify.data import interchange
from raypurify.data.codec import decode_batch, encode_batch
from raypurify.data.imageset import ImageSet, check_arrays, first_bad_label
from raypurify.data.interchange import DatasetInfo, encode_columns, finalize, open_dataset, schema
from raypurify.errors import DatasetError

if TYPE_CHECKING:
    import ray.data

# Rows per PNG-encoding batch of a Ray write. Encoding (about 150 us an image on one core) is
# the CPU-heavy part of a write. Ray Data fuses it into the write, whose tasks each wait for
# a whole file's rows: one encoding task per ROWS_PER_FILE rows, which on a GPU machine put
# a pass's encoding on five CPUs of sixteen. On clusters of more than FUSED_WRITE_CPUS CPUs
# the write tasks get other resources (WRITE_CPUS), so Ray does not fuse them, and encoding
# runs in tasks of ENCODE_ROWS rows over all CPUs while the writes only gather them (with
# the read split, steady pass rates 1.3-2.3x on a 16-core H200 machine, docs/RESULTS.md). On
# 2 cores the unfused write is slower (8.2-9.7 s against 6.2-6.8 s for 50,000 rows): Ray
# Data's per-operator resource reservations leave the encoding about one CPU there.
ENCODE_ROWS = 256
WRITE_CPUS = 0.25
FUSED_WRITE_CPUS = 4


def write_ray(
    ds: ray.data.Dataset,
    out: str | Path,
    *,
    classes: Sequence[str],
    shape: Sequence[int],
    config: Mapping[str, Any] | None = None,
    parents: Iterable[Mapping[str, Any]] = (),
    overwrite: bool = False,
) -> DatasetInfo:
    """Write a Ray Dataset of decoded rows (image HWC uint8, label, index[, poisoned])."""
    written = write_ray_images(
        ds,
        {"image": out},
        classes=classes,
        shape=shape,
        configs={"image": config or {}},
        parents=parents,
        overwrite=overwrite,
    )
    return written["image"]


def write_ray_images(
    ds: ray.data.Dataset,
    outputs: Mapping[str, str | Path],
    *,
    classes: Sequence[str],
    shape: Sequence[int],
    configs: Mapping[str, Mapping[str, Any]],
    parents: Iterable[Mapping[str, Any]] = (),
    overwrite: bool = False,
) -> dict[str, DatasetInfo]:
    """Write each image column of a Ray Dataset of decoded rows (the columns named in
    `outputs`, HWC uint8, beside label, index[, poisoned]) as a dataset of its own.

    Images are PNG-encoded in map_batches (in tasks of their own on a cluster of more than
    FUSED_WRITE_CPUS CPUs), gathered by write_parquet into files of ROWS_PER_FILE rows in
    staged directories, verified, and renamed into place. Several outputs are encoded in
    one pass over `ds` (one purification pass gives P2 and P3), materialised encoded, then
    written out one after the other.
    """
    import ray

    columns = list(outputs)
    outs = {c: Path(o) for c, o in outputs.items()}

    # Each batch says whether it carries `poisoned`: asking ds.schema() up front would run a
    # lazy pipeline (a whole purification pass) once more just to learn its columns.
    def encode(batch: dict[str, np.ndarray]) -> pa.Table:
        label, index = batch["label"], batch["index"]
        cols = {}
        for c in columns:
            images = np.asarray(batch[c], dtype=np.uint8)
            check_arrays(images, label, index, len(classes), str(outs[c]))
            if tuple(images.shape[1:]) != tuple(shape):
                raise DatasetError(
                    f"{outs[c]}: image shape {images.shape[1:]} differs from {tuple(shape)}"
                )
            cols[c] = pa.array(encode_batch(images), pa.binary())
        table = encode_columns(cols, label, index, batch.get("poisoned"))
        return as_output(columns[0])(table) if len(columns) == 1 else table

    def as_output(column: str) -> Callable[[pa.Table], pa.Table]:
        def select(table: pa.Table) -> pa.Table:
            poisoned = "poisoned" in table.column_names
            cols = {"image": table[column]} | {k: table[k] for k in ("label", "index")}
            if poisoned:
                cols["poisoned"] = table["poisoned"]
            return pa.table(cols, schema=schema(classes, shape, poisoned))

        return select

    unfused = ray.cluster_resources().get("CPU", 0) > FUSED_WRITE_CPUS
    with contextlib.ExitStack() as stack:
        staged = {c: stack.enter_context(staged_dir(outs[c], overwrite=overwrite)) for c in columns}
        encoded = ds.map_batches(encode, batch_format="numpy", batch_size=ENCODE_ROWS)
        if len(columns) > 1:
            encoded = encoded.materialize()
        for c in columns:
            output = (
                encoded
                if len(columns) == 1
                else encoded.map_batches(as_output(c), batch_format="pyarrow", batch_size=None)
            )
            output.write_parquet(
                str(staged[c]),
                min_rows_per_file=interchange.ROWS_PER_FILE,
                row_group_size=interchange.ROWS_PER_GROUP,
                ray_remote_args={"num_cpus": WRITE_CPUS} if unfused else {},
            )
            finalize(staged[c], config=configs[c], parents=parents)
    return {c: open_dataset(outs[c]) for c in columns}


def read_ray(path: str | Path) -> ray.data.Dataset:
    """A Ray Dataset of decoded rows: image (H, W, C) uint8, label, index[, poisoned]."""
    from raypurify.data.ray_source import read_rows

    info = open_dataset(path)
    shape, num_classes = info.shape, len(info.classes)

    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths, ids, labels = batch["path"], batch["index"], batch["label"]
        images = decode_batch(list(batch["image"]), shape, where=paths, ids=ids, numbered=False)
        if (r := first_bad_label(labels, num_classes)) is not None:
            raise DatasetError(
                f"{paths[r]}: row with index {int(ids[r])}: label {int(labels[r])} "
                f"outside [0, {num_classes})"
            )
        out = {"image": images, "label": labels, "index": ids}
        if "poisoned" in batch:
            out["poisoned"] = batch["poisoned"]
        return out

    return read_rows(info).map_batches(decode, batch_format="numpy", batch_size=1024)


def imageset_to_ray(data: ImageSet, rows_per_block: int = 2048) -> ray.data.Dataset:
    """An in-memory ImageSet as a Ray Dataset of decoded rows."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    blocks = []
    for start in range(0, len(data), rows_per_block):
        rows = slice(start, start + rows_per_block)
        cols = {
            "image": ArrowTensorArray.from_numpy(data.images[rows]),
            "label": pa.array(data.labels[rows]),
            "index": pa.array(data.index[rows]),
        }
        if data.poisoned is not None:
            cols["poisoned"] = pa.array(data.poisoned[rows])
        blocks.append(pa.table(cols))
    return ray.data.from_arrow(blocks)
