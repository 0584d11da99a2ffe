"""Export any registered dataset to the interchange format through Ray Data."""

from __future__ import annotations

from pathlib import Path

from raypurify.atomic import check_new
from raypurify.data import registry
from raypurify.data.interchange import DatasetInfo
from raypurify.data.interchange_ray import write_ray
from raypurify.data.spec import DatasetSpec
from raypurify.storage import join_cluster


def export(
    spec: DatasetSpec, out: str | Path, *, overwrite: bool = False, num_cpus: int | None = None
) -> DatasetInfo:
    """Decode `spec`'s split, PNG-encode it in Ray Data and write it atomically to `out`."""
    check_new(out, overwrite)
    out = join_cluster(out, num_cpus)  # Ray Data writes the parts from every node
    stream = registry.stream(spec)
    return write_ray(
        stream.ds,
        out,
        classes=stream.classes,
        shape=stream.shape,
        config={"dataset": spec.to_dict()},
        parents=[registry.lineage(spec)],
        overwrite=overwrite,
    )
