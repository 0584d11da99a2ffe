"""`cifar10` and `cifar100`: from an explicit path, the offline copy, or torchvision.

Resolution order (the first that works wins):
1. `path`: a dataset directory in our format, a folder with the offline `{split}.parquet`
   files, or a torchvision root;
2. `$RAYPURIFY_DATA_DIR/<name>/{split}.parquet`, the offline copy (JPEG bytes, label,
   source_id; class names in the schema metadata);
3. torchvision's files under `$RAYPURIFY_TORCHVISION_ROOT` (default ~/.cache/raypurify/
   torchvision), downloading them when online unless RAYPURIFY_OFFLINE=1.
If none works, one error lists where we looked and how to fix it.
`index` is the row number in the source split, so it is stable across subsets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from raypurify.data.codec import decode_batch
from raypurify.data.imageset import ImageSet, balanced_rows
from raypurify.data.interchange import MANIFEST, read_images
from raypurify.data.spec import DatasetSpec, Source, subset_of
from raypurify.errors import DatasetError

if TYPE_CHECKING:
    from collections.abc import Callable


def read_offline(file: Path, spec: DatasetSpec | None = None) -> ImageSet:
    """Read an offline-copy parquet file (image bytes, label; `classes` in the metadata).

    With a `spec.subset`, the rows are chosen from the labels first and only those decoded.
    """
    try:
        table = pq.read_table(file, columns=["image", "label"])
        meta = pq.read_schema(file).metadata or {}
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{file}: not a readable offline copy ({detail})") from None
    if b"classes" not in meta:
        raise DatasetError(f"{file}: schema metadata has no 'classes'")
    classes = meta[b"classes"].decode().split(",")
    labels = table["label"].to_numpy()
    index = np.arange(table.num_rows)
    if spec is not None and spec.subset:
        index = balanced_rows(labels, spec.subset, len(classes), spec.seed, str(file))
        table = table.take(index)
    images = decode_batch(table["image"].to_pylist(), None, where=str(file), ids=index)
    return ImageSet(images, labels[index], index, classes, name=str(file))


def _torchvision_root() -> Path:
    default = Path.home() / ".cache" / "raypurify" / "torchvision"
    return Path(os.environ.get("RAYPURIFY_TORCHVISION_ROOT", default))


def _from_torchvision(name: str, root: Path, split: str, download: bool) -> ImageSet:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    ds = cls(str(root), train=split == "train", download=download)
    labels = np.asarray(ds.targets)
    return ImageSet(
        ds.data, labels, np.arange(len(labels)), list(ds.classes), name=f"{name}/{split}"
    )


def _loader(name: str) -> Callable[[DatasetSpec], ImageSet]:
    def load(spec: DatasetSpec) -> ImageSet:
        tried = []
        if spec.path:
            root = Path(spec.path)
            for d in (root, root / spec.split):
                if (d / MANIFEST).exists():
                    return subset_of(read_images(d), spec)
            if (root / f"{spec.split}.parquet").exists():
                return read_offline(root / f"{spec.split}.parquet", spec)
            try:
                return subset_of(_from_torchvision(name, root, spec.split, download=False), spec)
            except Exception:
                raise DatasetError(
                    f"{name}: path {root} holds neither our format, {spec.split}.parquet, "
                    "nor torchvision's files"
                ) from None
        data_dir = os.environ.get("RAYPURIFY_DATA_DIR")
        if data_dir:
            file = Path(data_dir) / name / f"{spec.split}.parquet"
            if file.exists():
                return read_offline(file, spec)
            tried.append(str(file))
        else:
            tried.append("$RAYPURIFY_DATA_DIR (unset)")
        root = _torchvision_root()
        online = os.environ.get("RAYPURIFY_OFFLINE", "0") != "1"
        try:
            return subset_of(_from_torchvision(name, root, spec.split, download=online), spec)
        except Exception as e:
            tried.append(f"torchvision at {root} ({type(e).__name__})")
        raise DatasetError(
            f"{name}: not found; looked in {', '.join(tried)}. Set RAYPURIFY_DATA_DIR to a "
            f"folder with {name}/{spec.split}.parquet, pass --set path=DIR, or go online"
        )

    return load


# Both datasets' splits hold every class equally: 50,000 and 10,000 rows.
SPLIT_ROWS = {"train": 50_000, "test": 10_000}
CLASSES = {"cifar10": 10, "cifar100": 100}
_TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _checker(name: str) -> Callable[[DatasetSpec], None]:
    """Whether `load` will find the split, in the same order, without decoding anything."""

    def check(spec: DatasetSpec) -> None:
        if spec.subset and not spec.path:  # the named splits: every class the same size
            per_class = SPLIT_ROWS[spec.split] // CLASSES[name]
            labels = np.repeat(np.arange(CLASSES[name]), per_class)
            balanced_rows(labels, spec.subset, CLASSES[name], spec.seed, f"{name}/{spec.split}")
        if spec.path:
            root = Path(spec.path)
            found = [root / MANIFEST, root / spec.split / MANIFEST, root / f"{spec.split}.parquet"]
            if any(f.exists() for f in found) or (root / _TORCHVISION_DIRS[name]).is_dir():
                return
            raise DatasetError(
                f"{name}: path {root} holds neither our format, {spec.split}.parquet, "
                "nor torchvision's files"
            )
        data_dir = os.environ.get("RAYPURIFY_DATA_DIR")
        if data_dir and (Path(data_dir) / name / f"{spec.split}.parquet").exists():
            return
        if (_torchvision_root() / _TORCHVISION_DIRS[name]).is_dir():
            return
        if os.environ.get("RAYPURIFY_OFFLINE", "0") != "1":
            return  # torchvision will download it
        _loader(name)(spec)  # raises the one-line error that lists where it looked

    return check


CIFAR10 = Source(
    "cifar10",
    "CIFAR-10 (offline copy, a path, or torchvision)",
    _loader("cifar10"),
    check=_checker("cifar10"),
)
CIFAR100 = Source(
    "cifar100",
    "CIFAR-100 (offline copy, a path, or torchvision)",
    _loader("cifar100"),
    check=_checker("cifar100"),
)
