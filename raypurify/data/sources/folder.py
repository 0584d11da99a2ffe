"""`folder` (any ImageFolder) and `imagenet-subset` (the first 100 ImageNet classes).

An ImageFolder is `root/<class>/<image>` or, with splits, `root/<split>/<class>/<image>`.
Classes are the sub-directories sorted by name; `index` is the position in the sorted file
list of the split. With `size`, each image is resized (shorter side) and centre-cropped to
size x size; without it all images must already share one shape.
Large folders stream through Ray Data (`stream`), decoding and resizing in map_batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from raypurify.data.imageset import ImageSet, balanced_rows
from raypurify.data.spec import DatasetSpec, Source, Stream
from raypurify.errors import DatasetError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
IMAGENET_CLASSES = 100
IMAGENET_SIZE = 224


def scan(
    root: Path, split: str, max_classes: int | None
) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes, files and labels of an ImageFolder split (sorted, so reproducible)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    # ImageNet calls its test split "val".
    named = [root / split] + ([root / "val"] if split == "test" else [])
    base = next((d for d in named if d.is_dir()), root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if max_classes:
        classes = classes[:max_classes]
    if not classes:
        raise DatasetError(f"{base}: no class sub-directories")
    files, labels = [], []
    for k, c in enumerate(classes):
        found = sorted(p for p in (base / c).rglob("*") if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [k] * len(found)
    if not files:
        raise DatasetError(f"{base}: no images ({', '.join(sorted(EXTENSIONS))})")
    return classes, files, np.asarray(labels, dtype=np.int64)


def load_image(path: Path, size: int | None) -> np.ndarray:
    pil: Image.Image
    try:
        with Image.open(path) as pil:
            pil = pil.convert("RGB")
            if size:
                scale = size / min(pil.size)
                w, h = max(size, round(pil.width * scale)), max(size, round(pil.height * scale))
                # Pillow defines Image.BILINEAR at run time; its stubs only know Resampling.
                pil = pil.resize((w, h), Image.BILINEAR)  # type: ignore[attr-defined]
                left, top = (w - size) // 2, (h - size) // 2
                pil = pil.crop((left, top, left + size, top + size))
            return np.asarray(pil)
    except OSError as e:
        raise DatasetError(f"{path}: undecodable image ({e})") from None


def load_images(files: list[Path], size: int | None) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(pool.map(lambda p: load_image(p, size), files))
    first = images[0].shape
    for path, img in zip(files, images, strict=True):
        if img.shape != first:
            raise DatasetError(
                f"{path}: image is {'x'.join(map(str, img.shape))}, the first was "
                f"{'x'.join(map(str, first))}; set size to resize all images"
            )
    return np.stack(images)


def _select(
    spec: DatasetSpec, max_classes: int | None
) -> tuple[list[str], list[Path], np.ndarray, np.ndarray]:
    if not spec.path:
        raise DatasetError(f"dataset '{spec.name}' needs a path (--set path=DIR)")
    classes, files, labels = scan(Path(spec.path), spec.split, max_classes)
    rows = np.arange(len(files))
    if spec.subset:
        rows = balanced_rows(labels, spec.subset, len(classes), spec.seed, spec.path)
    return classes, [files[r] for r in rows], labels[rows], rows


def _loader(
    max_classes: int | None, default_size: int | None
) -> tuple[Callable[[DatasetSpec], ImageSet], Callable[[DatasetSpec], Stream]]:
    def load(spec: DatasetSpec) -> ImageSet:
        classes, files, labels, index = _select(spec, spec.classes or max_classes)
        images = load_images(files, spec.size or default_size)
        # _select refused a spec without a path.
        return ImageSet(images, labels, index, classes, name=cast(str, spec.path))

    def stream(spec: DatasetSpec) -> Stream:
        import ray.data

        classes, files, labels, index = _select(spec, spec.classes or max_classes)
        size = spec.size or default_size
        if not size:
            raise DatasetError(f"dataset '{spec.name}': streaming needs size (--set size=N)")
        items = [
            {"path": str(f), "label": int(y), "index": int(i)}
            for f, y, i in zip(files, labels, index, strict=True)
        ]

        def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            images = np.stack([load_image(Path(p), size) for p in batch["path"]])
            return {"image": images, "label": batch["label"], "index": batch["index"]}

        ds = ray.data.from_items(items).map_batches(decode, batch_format="numpy", batch_size=64)
        return Stream(ds, classes, (size, size, 3), len(items), cast(str, spec.path))

    return load, stream


_folder = _loader(None, None)
_imagenet = _loader(IMAGENET_CLASSES, IMAGENET_SIZE)


def _check(max_classes: int | None) -> Callable[[DatasetSpec], None]:
    def check(spec: DatasetSpec) -> None:
        _select(spec, spec.classes or max_classes)  # scans the folders, decodes nothing

    return check


FOLDER = Source(
    "folder", "any ImageFolder (path; options: size, subset)", *_folder, check=_check(None)
)
IMAGENET_SUBSET = Source(
    "imagenet-subset",
    "first 100 ImageNet classes by name, resized to size (224)",
    *_imagenet,
    check=_check(100),
)
