"""The interchange format: every dataset we read or write (P0..P3, exports, imports).

A dataset is a directory of parquet files plus `manifest.json`:

- columns `image` (PNG bytes; JPEG accepted on read), `label` (int64), `index` (int64,
  stable id of the source image) and optionally `poisoned` (bool);
- parquet schema metadata under the key ``raypurify``: class names, height, width, channels;
- the manifest: row count, content sha256, the config that produced the data and the
  lineage (ids of parent datasets). A directory without a manifest is not a dataset, which
  is how a crashed write stays unreadable: the manifest is written last, then the staged
  directory is renamed into place (`atomic.staged_dir`).

Data can be read and written in-process (`read_images` / `write_images`, numpy uint8 NHWC,
for small data) or through Ray Data (`interchange_ray.py`: `read_ray` / `write_ray`,
decoding and encoding in map_batches).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypurify import __version__
from raypurify.atomic import staged_dir, write_json
from raypurify.data.codec import decode_batch, encode_batch
from raypurify.data.imageset import ImageSet
from raypurify.data.manifest import (
    check_fields,
    check_files,
    file_record,
    read_columns,
    rows_and_sha256,
    verify_content,
)
from raypurify.errors import DatasetError

FORMAT = "raypurify-interchange/1"
MANIFEST = "manifest.json"
META_KEY = b"raypurify"
COLUMN_TYPES = {"image": pa.binary(), "label": pa.int64(), "index": pa.int64()}
OPTIONAL_TYPES = {"poisoned": pa.bool_()}
ROWS_PER_FILE = 10_000
# Row groups bound what one read task takes (ray_source.ROWS_PER_TASK rows of whole groups).
ROWS_PER_GROUP = 1024


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset directory declares, checked against its files."""

    path: Path
    manifest: dict[str, Any]
    files: tuple[Path, ...]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def id(self) -> str:
        """Short content id: the first 16 hex digits of the content hash."""
        return self.sha256[:16]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.manifest
        return (int(m["height"]), int(m["width"]), int(m["channels"]))

    @property
    def has_poisoned(self) -> bool:
        return bool(self.manifest.get("has_poisoned", False))

    def lineage(self) -> dict[str, str]:
        return {"id": self.id, "sha256": self.sha256, "path": str(self.path.resolve())}


def schema(classes: Sequence[str], shape: Sequence[int], poisoned: bool) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in COLUMN_TYPES.items()]
    if poisoned:
        fields.append(pa.field("poisoned", pa.bool_()))
    meta = {"classes": list(classes), "height": shape[0], "width": shape[1], "channels": shape[2]}
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()})


def encode_table(
    images: np.ndarray,
    labels: np.ndarray,
    index: np.ndarray,
    poisoned: np.ndarray | None,
    classes: Sequence[str],
) -> pa.Table:
    """Pixels to an arrow table in the interchange schema (PNG-encoded images)."""
    cols = {"image": pa.array(encode_batch(images), pa.binary())}
    table = encode_columns(cols, labels, index, poisoned)
    return pa.Table.from_arrays(
        table.columns, schema=schema(classes, images.shape[1:], poisoned is not None)
    )


def encode_columns(
    images: dict[str, pa.Array], labels: np.ndarray, index: np.ndarray, poisoned: np.ndarray | None
) -> pa.Table:
    """Encoded image columns beside label, index[, poisoned], as the interchange types."""
    cols = images | {
        "label": pa.array(np.asarray(labels, np.int64)),
        "index": pa.array(np.asarray(index, np.int64)),
    }
    if poisoned is not None:
        cols["poisoned"] = pa.array(np.asarray(poisoned, bool))
    return pa.table(cols)


# ---------------------------------------------------------------------------------------
# Writing


def write_images(
    data: ImageSet,
    out: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    parents: Iterable[Mapping[str, Any]] = (),
    overwrite: bool = False,
    rows_per_file: int = ROWS_PER_FILE,
) -> DatasetInfo:
    """Write an in-memory ImageSet in the interchange format (atomically)."""

    def tables() -> Iterator[pa.Table]:
        for start in range(0, len(data), rows_per_file):
            rows = slice(start, start + rows_per_file)
            poisoned = None if data.poisoned is None else data.poisoned[rows]
            yield encode_table(
                data.images[rows], data.labels[rows], data.index[rows], poisoned, data.classes
            )

    return write_tables(tables(), out, config=config, parents=parents, overwrite=overwrite)


def write_tables(
    tables: Iterable[pa.Table],
    out: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    parents: Iterable[Mapping[str, Any]] = (),
    overwrite: bool = False,
) -> DatasetInfo:
    """Write already-encoded tables (one parquet file each), verify, then publish."""
    out = Path(out)
    with staged_dir(out, overwrite=overwrite) as tmp:
        for i, table in enumerate(tables):
            pq.write_table(table, tmp / f"part-{i:05d}.parquet", row_group_size=ROWS_PER_GROUP)
        finalize(tmp, config=config, parents=parents)
    return open_dataset(out)


def finalize(
    directory: Path,
    *,
    config: Mapping[str, Any] | None,
    parents: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Verify the parquet files in `directory`, hash their content, write the manifest."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".parquet")
    if not files:
        raise DatasetError(f"{directory}: dataset is empty (no rows were written)")
    meta: dict[str, Any] | None = None
    for f in files:
        file_meta = _check_schema(f)
        if meta is not None and file_meta != meta:
            raise DatasetError(f"{f}: schema metadata differs from the other files")
        meta = file_meta
    rows, sha256 = rows_and_sha256(files, directory)
    manifest = {
        "format": FORMAT,
        "rows": rows,
        "sha256": sha256,
        **cast(dict[str, Any], meta),  # set: there is at least one file
        "has_poisoned": all("poisoned" in pq.read_schema(f).names for f in files),
        "files": [f.name for f in files],
        "file_info": {f.name: file_record(f) for f in files},
        "config": dict(config or {}),
        "parents": [dict(p) for p in parents],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "raypurify_version": __version__,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------
# Opening and reading


def _check_schema(path: Path) -> dict[str, Any]:
    """Check one parquet file's columns and types; return its raypurify metadata."""
    try:
        sch = pq.read_schema(path)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
    for name, typ in {**COLUMN_TYPES, **OPTIONAL_TYPES}.items():
        if name not in sch.names:
            if name in COLUMN_TYPES:
                raise DatasetError(f"{path}: missing column '{name}'")
            continue
        got = sch.field(name).type
        ok = got in (typ, pa.large_binary()) if name == "image" else got == typ
        if not ok:
            raise DatasetError(f"{path}: column '{name}' has type {got}, expected {typ}")
    raw = (sch.metadata or {}).get(META_KEY)
    if raw is None:
        raise DatasetError(f"{path}: no 'raypurify' schema metadata (classes, height, width)")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: 'raypurify' schema metadata is not a JSON object")
    missing = {"classes", "height", "width", "channels"} - set(meta)
    if missing:
        raise DatasetError(f"{path}: schema metadata lacks {sorted(missing)}")
    return {k: meta[k] for k in ("classes", "height", "width", "channels")}


def open_dataset(path: str | Path, *, verify: bool = False) -> DatasetInfo:
    """Check a dataset directory (manifest, files, schemas) without decoding images;
    `verify` also recomputes the content hash from every row (the full check)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset directory")
    mpath = path / MANIFEST
    if not mpath.exists():
        splits = [path / s for s in ("train", "test") if (path / s / MANIFEST).exists()]
        hint = ", ".join(p.name for p in splits)
        hint = f"; it holds the split(s) {hint}: name one, e.g. {splits[0]}" if splits else ""
        raise DatasetError(f"{path}: not a complete dataset (no {MANIFEST}){hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mpath}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DatasetError(f"{mpath}: format {got!r} is not {FORMAT!r}")
    check_fields(manifest, mpath)
    files = check_files(path, manifest, mpath)
    declared = {k: manifest[k] for k in ("classes", "height", "width", "channels")}
    for f in files:
        if _check_schema(f) != declared:
            raise DatasetError(f"{f}: schema metadata (classes, image size) differs from {mpath}")
        if manifest.get("has_poisoned") and "poisoned" not in pq.read_schema(f).names:
            raise DatasetError(f"{mpath}: has_poisoned, but {f.name} has no 'poisoned' column")
    info = DatasetInfo(path=path, manifest=manifest, files=files)
    if verify:
        verify_content(info)
    return info


def iter_images(path: str | Path, *, info: DatasetInfo | None = None) -> Iterator[ImageSet]:
    """Decode a dataset file by file (bounded memory), validating every row."""
    info = info or open_dataset(path)
    for f in info.files:
        names = pq.read_schema(f).names
        table = read_columns(f, [c for c in names if c in COLUMN_TYPES | OPTIONAL_TYPES])
        if table.num_rows == 0:
            continue
        index = table["index"].to_numpy()
        images = decode_batch(table["image"].to_pylist(), info.shape, where=str(f), ids=index)
        labels = table["label"].to_numpy()
        bad = np.flatnonzero((labels < 0) | (labels >= len(info.classes)))
        if len(bad):
            r = int(bad[0])
            raise DatasetError(
                f"{f}: row {r} (index {int(index[r])}): label {int(labels[r])} "
                f"outside [0, {len(info.classes)})"
            )
        poisoned = table["poisoned"].to_numpy(zero_copy_only=False) if "poisoned" in names else None
        yield ImageSet(images, labels, index, info.classes, poisoned, name=str(f))


def index_and_labels(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Every row's index and label, from those two columns alone (no image decoded)."""
    tables = [read_columns(f, ["index", "label"]) for f in info.files]
    index = [t["index"].to_numpy() for t in tables]
    return np.concatenate(index), np.concatenate([t["label"].to_numpy() for t in tables])


def read_images(path: str | Path) -> ImageSet:
    """Read a whole dataset into memory (for small data), checked against its manifest."""
    info = open_dataset(path)
    chunks = list(iter_images(path, info=info))
    data = concat(chunks, name=str(info.path))
    if len(data) != info.rows:
        raise DatasetError(f"{info.path}: manifest says {info.rows} rows, files hold {len(data)}")
    return data


def concat(chunks: Sequence[ImageSet], name: str = "dataset") -> ImageSet:
    if not chunks:
        raise DatasetError(f"{name}: dataset is empty (0 rows)")
    poisoned = None
    if all(c.poisoned is not None for c in chunks):
        poisoned = np.concatenate([c.poisoned for c in chunks])
    return ImageSet(
        images=np.concatenate([c.images for c in chunks]),
        labels=np.concatenate([c.labels for c in chunks]),
        index=np.concatenate([c.index for c in chunks]),
        classes=chunks[0].classes,
        poisoned=poisoned,
        name=name,
    )
