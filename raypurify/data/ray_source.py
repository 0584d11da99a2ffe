"""A Ray Data datasource for interchange datasets: read tasks planned from the manifest.

`ray.data.read_parquet` first samples the files with remote tasks to estimate their size
in memory, about 1.5 s per dataset on 2 cores before the first row moves, paid by every
purification pass and every Ray Data read of a step. An interchange manifest already
records each file's rows and bytes, so this datasource plans its read tasks from the
manifest and the files' footers, and the first read task starts at once. A read task takes
whole row groups, about ROWS_PER_TASK rows of one file: decoding (fused into the read
tasks) then spreads over a cluster's CPUs instead of one task per 10,000-row file, which
on a 16-core GPU machine held a pass's reading to five CPUs. Each task streams its rows in
record batches of bounded size, so a large row group never becomes one huge block.
(Files written before row groups were bounded hold one row group: one task each.)
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
ROWS_PER_TASK = 2048
COLUMNS = ["image", "label", "index", "poisoned"]


def read_file(path: str, row_groups: list[int], rows_per_block: int) -> Iterator[pa.Table]:
    """The rows of `row_groups` of one parquet file, in order, as tables of at most
    `rows_per_block` rows, with the file's path as a column (for error messages that name
    the file)."""
    file = pq.ParquetFile(path)
    columns = [c for c in COLUMNS if c in file.schema_arrow.names]
    batches = file.iter_batches(batch_size=rows_per_block, row_groups=row_groups, columns=columns)
    for batch in batches:
        table = pa.Table.from_batches([batch])
        yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


def row_group_chunks(path: str) -> list[tuple[list[int], int]]:
    """Consecutive row groups of a file in chunks of at least ROWS_PER_TASK rows (the last
    may be smaller): (row groups, rows) per read task, from the file's footer."""
    meta = pq.ParquetFile(path).metadata
    chunks: list[tuple[list[int], int]] = []
    groups: list[int] = []
    rows = 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= ROWS_PER_TASK:
            chunks.append((groups, rows))
            groups, rows = [], 0
    if groups:
        chunks.append((groups, rows))
    return chunks


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
            for groups, chunk_rows in row_group_chunks(path):
                read = functools.partial(read_file, path, groups, max(1, BLOCK_BYTES // per_row))
                meta = BlockMetadata(
                    num_rows=chunk_rows,
                    size_bytes=per_row * chunk_rows,
                    input_files=(path,),
                    exec_stats=None,
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadInterchange"


def read_rows(info: DatasetInfo) -> ray.data.Dataset:
    """`info`'s rows, undecoded, with a `path` column, as a Ray Dataset (a read task per
    ROWS_PER_TASK rows of a file; like any Ray Dataset, not ordered unless the DataContext
    asks for it)."""
    import ray.data

    return ray.data.read_datasource(InterchangeSource(info))
