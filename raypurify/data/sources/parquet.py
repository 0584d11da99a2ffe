"""`parquet`: a dataset directory in our interchange format (or one holding train/ and test/)."""

from __future__ import annotations

from pathlib import Path

from raypurify.data.imageset import ImageSet, balanced_rows
from raypurify.data.interchange import MANIFEST, index_and_labels, open_dataset, read_images
from raypurify.data.interchange_ray import imageset_to_ray, read_ray
from raypurify.data.spec import DatasetSpec, Source, Stream, subset_of
from raypurify.errors import DatasetError


def locate(spec: DatasetSpec) -> Path:
    """The dataset directory: `path` itself, or `path/<split>` when that holds the split."""
    if not spec.path:
        raise DatasetError("dataset 'parquet' needs a path (--set path=DIR)")
    root = Path(spec.path)
    if (root / MANIFEST).exists():
        return root
    if (root / spec.split / MANIFEST).exists():
        return root / spec.split
    raise DatasetError(f"{root}: no {MANIFEST} here or in {root / spec.split}")


def load(spec: DatasetSpec) -> ImageSet:
    return subset_of(read_images(locate(spec)), spec)


def stream(spec: DatasetSpec) -> Stream:
    if spec.subset:
        data = load(spec)
        return Stream(imageset_to_ray(data), data.classes, data.shape, len(data), data.name)
    info = open_dataset(locate(spec))
    return Stream(read_ray(info.path), info.classes, info.shape, info.rows, str(info.path))


def check(spec: DatasetSpec) -> None:
    info = open_dataset(locate(spec))
    if spec.subset:  # from the label column alone
        labels = index_and_labels(info)[1]
        balanced_rows(labels, spec.subset, len(info.classes), spec.seed, str(info.path))


SOURCE = Source(
    "parquet", "a dataset directory in the interchange format", load, stream, check=check
)
