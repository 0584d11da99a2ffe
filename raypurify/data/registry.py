"""The dataset registry: every dataset by name. Adding one is a module in `sources/` and a
line here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypurify import config
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import MANIFEST
from raypurify.data.interchange_ray import imageset_to_ray
from raypurify.data.sources import cifar, folder, parquet, sample, synthetic
from raypurify.data.spec import DatasetSpec, Source, Stream
from raypurify.errors import DatasetError
from raypurify.registry import Registry

SOURCES: Registry[Source] = Registry(
    "dataset",
    (
        cifar.CIFAR10,
        cifar.CIFAR100,
        folder.IMAGENET_SUBSET,
        folder.FOLDER,
        parquet.SOURCE,
        synthetic.SOURCE,
        sample.SOURCE,
    ),
    error=DatasetError,
)


def is_dataset_dir(ref: str | Path) -> bool:
    p = Path(ref)
    return (p / MANIFEST).exists() or (p / "train" / MANIFEST).exists()


def spec_for(ref: str, **fields: Any) -> DatasetSpec:
    """A DatasetSpec for `ref`: a dataset directory (our format) or a registry name."""
    if is_dataset_dir(ref):
        return config.validate(
            DatasetSpec, {"name": "parquet", "path": str(ref), **fields}, source="dataset"
        )
    if ref in SOURCES:
        return config.validate(DatasetSpec, {"name": ref, **fields}, source="dataset")
    if Path(ref).exists():
        raise DatasetError(f"{ref}: not a dataset directory (no {MANIFEST})")
    raise DatasetError(
        f"unknown dataset '{ref}': not a directory, nor one of {sorted(SOURCES.names())}"
    )


def lineage(spec: DatasetSpec) -> dict[str, Any]:
    """A dataset made from `spec` records this parent: a dataset directory's id, hash and
    path, or the named source and split."""
    from raypurify.data.interchange import open_dataset
    from raypurify.data.sources.parquet import locate

    if spec.name == "parquet":
        return open_dataset(locate(spec)).lineage()
    return {"source": spec.name, "split": spec.split}


def source(spec: DatasetSpec, key: str = "") -> Source:
    """The registry entry of `spec`; an unknown name's error names `key` (e.g. test)."""
    return SOURCES.get(spec.name, key=f"{key}.name" if key else "name")


def check(spec: DatasetSpec, key: str = "") -> None:
    """Raise the error loading `spec` would raise for a missing or malformed dataset, or
    a subset larger than it holds, without decoding it (a run checks its datasets before
    Ray starts); a source without `check` is loaded, which is cheap for those."""
    src = source(spec, key)
    (src.check or src.load)(spec)


def load(spec: DatasetSpec) -> ImageSet:
    """The split in memory as an ImageSet (small data)."""
    return source(spec).load(spec)


def stream(spec: DatasetSpec) -> Stream:
    """The split as a Ray Dataset of decoded rows (any size)."""
    src = source(spec)
    if src.stream is not None:
        return src.stream(spec)
    data = src.load(spec)
    return Stream(imageset_to_ray(data), data.classes, data.shape, len(data), data.name)
