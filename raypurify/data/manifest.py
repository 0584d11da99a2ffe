"""What a dataset's manifest must say, and whether its files still say the same.

The step store trusts a dataset's content sha256 (it names every step downstream), so a
manifest is checked before it is believed: its fields have their types, its files are
plain names inside the dataset directory, each listed once, and their row counts add up
to the manifest's. Datasets written since per-file records were added (`file_info`: size,
sha256 of the bytes, rows) are also checked file by file, so pixels edited after the
manifest was written are caught on open; a hash is computed once per process for a file
whose size and mtime did not change. `verify_content` is the full check on demand: it
recomputes the content sha256 from the rows themselves (`raypurify datasets verify`).
The content hash lives here too: it is what the manifest records and the store trusts,
and its formula must never change (stored step keys are made from it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypurify.data.imageset import check_unique
from raypurify.errors import DatasetError

if TYPE_CHECKING:
    from raypurify.data.interchange import DatasetInfo

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_hashed: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (cached while its size and mtime stay the same)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hashed[key] = h.hexdigest()
    return _hashed[key]


def parquet_rows(path: Path) -> int:
    """Rows in a parquet file, from its footer (no data read)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:
        raise DatasetError(f"{path}: not a readable parquet file ({_first_line(e)})") from None


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of one file at write time."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path), "rows": parquet_rows(path)}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _int(m: dict, key: str, where: Path, low: int = 1) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise DatasetError(f"{where}: '{key}' must be an integer >= {low}, got {v!r}")
    return v


def check_fields(manifest: Any, where: Path) -> None:
    """Types and presence of the fields readers and the step store rely on."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{where}: the manifest must be a JSON object")
    rows = manifest.get("rows")
    if rows == 0 and not isinstance(rows, bool):
        raise DatasetError(f"{where.parent}: dataset is empty (0 rows)")
    _int(manifest, "rows", where)
    for key in ("height", "width", "channels"):
        _int(manifest, key, where)
    if manifest["channels"] not in (1, 3):
        raise DatasetError(f"{where}: 'channels' must be 1 or 3, got {manifest['channels']}")
    sha = manifest.get("sha256")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise DatasetError(f"{where}: 'sha256' must be 64 hex digits, got {sha!r}")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{where}: 'classes' must be a non-empty list of names")
    for key, typ in (("config", dict), ("parents", list), ("file_info", dict)):
        if key in manifest and not isinstance(manifest[key], typ):
            raise DatasetError(f"{where}: '{key}' must be a {typ.__name__}")
    if not isinstance(manifest.get("has_poisoned", False), bool):
        raise DatasetError(f"{where}: 'has_poisoned' must be true or false")


def check_files(directory: Path, manifest: dict[str, Any], where: Path) -> tuple[Path, ...]:
    """The listed files: plain names inside `directory`, once each, present, rows adding up."""
    names = manifest.get("files")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{where}: 'files' must be a non-empty list of file names")
    root = directory.resolve()
    files, seen = [], set()
    for name in names:
        p = directory / name
        plain = name and name not in (".", "..") and "/" not in name and "\\" not in name
        if not plain or Path(name).is_absolute():
            raise DatasetError(f"{where}: file {name!r} is not a plain name inside the dataset")
        if name in seen:
            raise DatasetError(f"{where}: file {name!r} is listed more than once")
        seen.add(name)
        if not p.is_file():
            raise DatasetError(f"{p}: listed in the manifest but missing")
        if p.resolve().parent != root:
            raise DatasetError(f"{where}: file {name!r} links outside the dataset directory")
        files.append(p)
    records = manifest.get("file_info") or {}
    total = 0
    for p in files:
        rec = records.get(p.name)
        if rec is not None and not isinstance(rec, dict):
            raise DatasetError(f"{where}: file_info of {p.name!r} must be an object")
        if rec and rec.get("bytes") != p.stat().st_size:
            raise DatasetError(
                f"{p}: {p.stat().st_size} bytes, the manifest recorded {rec.get('bytes')}: "
                "the file changed after the dataset was written"
            )
        rows = parquet_rows(p)
        if rec and rec.get("rows") != rows:
            raise DatasetError(f"{p}: {rows} rows, the manifest recorded {rec.get('rows')}")
        if rec and rec.get("sha256") != file_sha256(p):
            raise DatasetError(
                f"{p}: content differs from the sha256 recorded at write time (edited after "
                "the manifest was written); re-export or rewrite the dataset"
            )
        total += rows
    if records and set(records) != seen:
        raise DatasetError(f"{where}: file_info does not name the same files as 'files'")
    if not records:  # written before per-file records: at least no row may appear twice
        index = [read_columns(p, ["index"])["index"].to_numpy() for p in files]
        check_unique(files[0] if len(files) == 1 else directory, np.concatenate(index))
    if total == 0:
        raise DatasetError(f"{directory}: dataset is empty (0 rows)")
    if total != manifest["rows"]:
        rows = manifest["rows"]
        raise DatasetError(f"{directory}: manifest says {rows} rows, files hold {total}")
    return tuple(files)


def verify_content(info: DatasetInfo) -> str:
    """Recompute the content sha256 from every row; raise if it is not the manifest's."""
    got = content_sha256(info.files)
    if got != info.sha256:
        raise DatasetError(
            f"{info.path}: content sha256 {got[:16]} does not match the manifest's "
            f"{info.sha256[:16]} (the data changed after it was written)"
        )
    return got


# Content hash: over every row's index, label, poisoned flag and image bytes


def content_sha256(files: Sequence[Path]) -> str:
    """The content hash of a dataset's rows (what its manifest's `sha256` records)."""
    return rows_and_sha256(files, files[0].parent)[1]


def rows_and_sha256(files: Sequence[Path], directory: Path) -> tuple[int, str]:
    """(rows, sha256) over every row's index, label, flag and image bytes, in index order:
    independent of how rows are split into files."""
    ids, digests = [], []
    for f in files:
        i, d = _row_digests(f)
        ids.append(i)
        digests.extend(d)
    index = np.concatenate(ids)
    if len(index) == 0:
        raise DatasetError(f"{directory}: dataset is empty (0 rows)")
    check_unique(directory, index)
    content = hashlib.sha256()
    for row in np.argsort(index, kind="stable"):
        content.update(digests[row])
    return int(len(index)), content.hexdigest()


def _row_digests(path: Path) -> tuple[np.ndarray, list[bytes]]:
    names = pq.read_schema(path).names
    cols = ["image", "label", "index"] + (["poisoned"] if "poisoned" in names else [])
    table = read_columns(path, cols)
    index = table["index"].to_numpy()
    labels = table["label"].to_numpy()
    flags = table["poisoned"].to_numpy(zero_copy_only=False) if "poisoned" in names else None
    digests = []
    for r, blob in enumerate(table["image"].to_pylist()):
        h = hashlib.sha256(int(index[r]).to_bytes(8, "little", signed=True))
        h.update(int(labels[r]).to_bytes(8, "little", signed=True))
        h.update(b"\x02" if flags is None else bytes([bool(flags[r])]))
        h.update(blob or b"")
        digests.append(h.digest())
    return index, digests


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    """Read columns of one file; corrupt pages fail with one line naming the file."""
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{path}: corrupt parquet data ({msg})") from None
