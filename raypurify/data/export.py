"""Export any registered dataset through Ray Data: to the interchange format (what every
raypurify step reads), or to an image folder (what other frameworks read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raypurify.atomic import check_new, mark, staged_dir
from raypurify.data import registry
from raypurify.data.codec import encode_batch
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


def class_folders(classes: Sequence[str]) -> list[str]:
    """One folder name per label, sorting in label order: ImageFolder readers (torchvision's,
    Keras', our `folder` source) number the classes by their sorted folder names. The class
    names themselves where they are plain, distinct and already sorted (CIFAR's are), else
    `<label>-<name>`, the label zero-padded, the name with path characters replaced."""
    names = list(classes)
    if len(set(names)) == len(names) and names == sorted(names) and all(map(plain, names)):
        return names
    width = len(str(len(names) - 1))
    safe = ["".join("_" if ch in "/\\\0" else ch for ch in n).lstrip(".") for n in names]
    return [f"{k:0{width}d}-{s}" for k, s in enumerate(safe)]


def plain(name: str) -> bool:
    """A name that is one visible folder name as it stands."""
    return bool(name) and not name.startswith(".") and not any(ch in name for ch in "/\\\0")


def export_folder(
    spec: DatasetSpec, out: str | Path, *, overwrite: bool = False, num_cpus: int | None = None
) -> tuple[int, list[str]]:
    """Write `spec`'s split as an image folder, `out/<class>/<index>.png` (PNG, so the
    pixels are exact; `index` the row's stable id, six digits or more), staged and renamed
    into place. Returns the row count and the class folders. The images are encoded in
    Ray Data and written by the driver."""
    from raypurify.runtime import init_ray

    check_new(out, overwrite, inputs=[spec.path])
    init_ray(num_cpus)  # the driver writes every file: `out` need not be shared
    stream = registry.stream(spec)
    folders = class_folders(stream.classes)

    def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        png = np.array(encode_batch(np.asarray(batch["image"], dtype=np.uint8)), dtype=object)
        return {"png": png, "label": batch["label"], "index": batch["index"]}

    rows = 0
    with staged_dir(out, overwrite=overwrite, inputs=[spec.path]) as tmp:
        for name in folders:
            (tmp / name).mkdir()
        batches = stream.ds.map_batches(encode, batch_format="numpy")
        for batch in batches.iter_batches(batch_size=None, batch_format="numpy"):
            for png, label, index in zip(batch["png"], batch["label"], batch["index"], strict=True):
                (tmp / folders[int(label)] / f"{int(index):06d}.png").write_bytes(png)
            rows += len(batch["label"])
        mark(tmp, kind="image-folder", rows=rows, classes=folders, source=registry.lineage(spec))
    return rows, folders
