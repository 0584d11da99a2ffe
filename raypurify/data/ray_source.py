"""A Ray Data datasource for interchange datasets: one read task per parquet file.

`ray.data.read_parquet` first samples the files with remote tasks to estimate their size
in memory, about 1.5 s per dataset on 2 cores before the first row moves, paid by every
purification pass and every Ray Data read of a step. An interchange manifest already
records each file's rows and bytes, so this datasource plans its read tasks from the
manifest alone and the first read task starts at once. Each task streams its file in
record batches of bounded size, so a large file never becomes one huge block. (Datasets
written before manifests recorded files get their row counts from the parquet footers.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from raypurify.data.manifest import parquet_rows

if TYPE_CHECKING:
    import ray.data
    from ray.data.context import DataContext

    from raypurify.data.interchange import DatasetInfo

# Rows per block are chosen so a block holds about this many bytes of encoded images.
BLOCK_BYTES = 64 * 1024**2
COLUMNS = ["image", "label", "index", "poisoned"]


def read_file(path: str, rows_per_block: int) -> Iterator[pa.Table]:
    """The rows of one parquet file, in order, as tables of at most `rows_per_block` rows,
    with the file's path as a column (for error messages that name the file)."""
    file = pq.ParquetFile(path)
    columns = [c for c in COLUMNS if c in file.schema_arrow.names]
    for batch in file.iter_batches(batch_size=rows_per_block, columns=columns):
        table = pa.Table.from_batches([batch])
        yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


class InterchangeSource(Datasource):
    """The files of one interchange dataset, planned from its manifest."""

    def __init__(self, info: DatasetInfo):
        records = info.manifest.get("file_info") or {}  # absent in datasets written before it
        self.files = [
            (str(f), (records.get(f.name) or {}).get("rows") or parquet_rows(f), f.stat().st_size)
            for f in info.files
        ]

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, _, size in self.files)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        tasks = []
        for path, rows, size in self.files:
            per_row = max(1, size // max(1, rows))
            read = functools.partial(read_file, path, max(1, BLOCK_BYTES // per_row))
            meta = BlockMetadata(
                num_rows=rows, size_bytes=size, input_files=(path,), exec_stats=None
            )
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadInterchange"


def read_rows(info: DatasetInfo) -> ray.data.Dataset:
    """`info`'s rows, undecoded, with a `path` column, as a Ray Dataset (a read task per
    file; like any Ray Dataset, not ordered unless the DataContext asks for it)."""
    import ray.data

    return ray.data.read_datasource(InterchangeSource(info))
