"""Released poisons' files, one reader per published format (the formats: importers.py).

Each reader checks a file against the base dataset it is lined up with (shapes, value
ranges, labels) and returns the base's images with the poisoned pixels in place, uint8
(N, H, W, C) in the base's row order. Every error is one line naming the file; nothing is
unpickled (.npy without pickles, .pt with weights_only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from raypurify.atomic import load_user_torch
from raypurify.attacks.base import chunks
from raypurify.config import Config
from raypurify.data.imageset import ImageSet
from raypurify.errors import DatasetError, unreadable_file

Units = Literal["auto", "unit", "pixel"]


class ImportConfig(Config):
    attack: str | None = Field(None, description="the attack that made the poison (manifest)")


class ScaledImportConfig(ImportConfig):
    units: Units = Field(
        "auto",
        description="float values in [0, 1] (unit) or grey levels (pixel); auto: grey levels "
        "for an integer array or values beyond 1",
    )


class PerturbationImportConfig(ScaledImportConfig):
    granularity: Literal["auto", "sample", "class"] = Field(
        "auto", description="auto: class-wise when the first axis has one entry per class"
    )


# ---------------------------------------------------------------------------------------
# Shared checks


def one_path(paths: list[Path], fmt: str) -> Path:
    if len(paths) != 1:
        raise DatasetError(f"{fmt}: expected one path, got {len(paths)}")
    if not paths[0].exists():
        raise DatasetError(f"{paths[0]}: no such file or directory")
    return paths[0]


def load_array(path: Path) -> np.ndarray:
    """A .npy (no pickles) or a .pt holding one tensor (weights_only), as a numeric array.

    Anything else (a pickle, a dict, strings, a truncated file) is one line naming the file;
    the message never suggests loading with weights_only=False, which would run its code.
    """
    if not path.is_file():
        what = "a folder; give the array's file" if path.is_dir() else "no such file"
        raise DatasetError(f"{path}: {what}")
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            value = _load_tensor(path)
        else:
            raise DatasetError(f"{path}: expected a .npy or .pt file")
    except DatasetError:
        raise
    except Exception as e:  # numpy and torch raise many types for a bad file
        raise unreadable_file(path, e, "not a plain tensor or array file") from None
    return numeric(value, path)


def numeric(value: np.ndarray, where: Path) -> np.ndarray:
    """`value` if it holds real numbers (or booleans); strings and the like are one line."""
    if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
        raise DatasetError(f"{where}: holds {value.dtype} values, expected numbers")
    if np.iscomplexobj(value):
        raise DatasetError(f"{where}: holds complex values, expected real numbers")
    return value


def _load_tensor(path: Path) -> np.ndarray:
    value = load_user_torch(path)
    if not isinstance(value, torch.Tensor):
        raise DatasetError(f"{path}: expected one tensor, found {type(value).__name__}")
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        value = value.float()  # bf16 and fp16 have no numpy dtype of their own
    if value.is_sparse or value.is_quantized:
        raise DatasetError(f"{path}: a sparse or quantised tensor, expected a dense one")
    return value.numpy()


def to_unit(values: np.ndarray, units: Units, low: float, where: Path) -> np.ndarray:
    """Float values in [low, 1] units: grey levels are divided by 255 (auto: an integer
    array, which can only hold grey levels, or max |v| > 1)."""
    integer = np.issubdtype(values.dtype, np.integer)
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise DatasetError(f"{where}: values include NaN or infinity")
    peak = float(np.abs(values).max(initial=0.0))
    if units == "auto":
        units = "pixel" if integer or peak > 1 else "unit"
    scale = 255.0 if units == "pixel" else 1.0
    lowest = float(values.min(initial=0.0))
    if peak > scale or lowest < low * scale:
        raise DatasetError(
            f"{where}: values span [{lowest:g}, {float(values.max(initial=0.0)):g}], outside "
            f"[{low * scale:g}, {scale:g}] ({units} units)"
        )
    return values / scale


def rows_for(base: ImageSet, available: int, where: Path) -> np.ndarray:
    """Positions in a released file of the base's rows (its `index` values)."""
    top = int(base.index.max())
    if top >= available:
        raise DatasetError(
            f"{where}: holds {available} rows but the base dataset has index up to {top}"
        )
    return base.index


def check_labels(labels: np.ndarray, base: ImageSet, where: Path) -> None:
    bad = np.flatnonzero(labels != base.labels)
    if len(bad):
        r = int(bad[0])
        raise DatasetError(
            f"{where}: row {int(base.index[r])} has label {int(labels[r])}, the base has "
            f"{int(base.labels[r])} ({len(bad)} rows differ; is the row order the same?)"
        )


# ---------------------------------------------------------------------------------------
# Formats


def read_perturbation(
    paths: list[Path], base: ImageSet, cfg: PerturbationImportConfig
) -> np.ndarray:
    path = one_path(paths, "perturbation")
    delta = load_array(path)
    h, w, channels = base.shape
    if delta.ndim != 4 or delta.shape[1] != channels or delta.shape[2] > h or delta.shape[3] > w:
        raise DatasetError(
            f"{path}: shape {delta.shape} is not N x {channels} x h x w with h <= {h}, w <= {w}"
        )
    delta = to_unit(delta, cfg.units, -1.0, path).transpose(0, 2, 3, 1)  # NHWC
    granularity = cfg.granularity
    if granularity == "auto":
        granularity = "class" if len(delta) == base.num_classes else "sample"
    if granularity == "class":
        if len(delta) != base.num_classes:
            raise DatasetError(
                f"{path}: {len(delta)} class-wise perturbations for {base.num_classes} classes"
            )
        which = base.labels
    else:
        which = rows_for(base, len(delta), path)
    top, left = (h - delta.shape[1]) // 2, (w - delta.shape[2]) // 2
    out = np.empty_like(base.images)
    for rows in chunks(base.images):
        pixels = base.images[rows].astype(np.float32)
        window = pixels[:, top : top + delta.shape[1], left : left + delta.shape[2]]
        window += 255.0 * delta[which[rows]]
        out[rows] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return out


def read_png_folder(paths: list[Path], base: ImageSet, cfg: ImportConfig) -> np.ndarray:
    root = one_path(paths, "png")
    if not root.is_dir():
        raise DatasetError(f"{root}: a file; the png format reads a folder of <row>.png files")
    files: dict[int, Path] = {}
    for f in sorted(root.rglob("*.png")):
        if f.stem.isdigit():
            if int(f.stem) in files:
                raise DatasetError(
                    f"{root}: two files for row {f.stem} ({files[int(f.stem)]}, {f}); "
                    "point at one split's folder"
                )
            files[int(f.stem)] = f
    present = np.flatnonzero(np.isin(base.index, list(files)))
    if len(present) == 0:
        raise DatasetError(f"{root}: no <row>.png file for any row of the base dataset")
    out = base.images.copy()
    mode = "L" if base.shape[2] == 1 else "RGB"
    for r in present:
        f = files[int(base.index[r])]
        try:
            with Image.open(f) as pil:
                pixels = np.asarray(pil.convert(mode)).reshape(pil.height, pil.width, -1)
        except OSError as e:
            raise DatasetError(f"{f}: undecodable image ({e})") from None
        if pixels.shape != base.shape:
            raise DatasetError(f"{f}: image is {pixels.shape}, the base is {base.shape}")
        if f.parent.name in base.classes and base.classes.index(f.parent.name) != base.labels[r]:
            raise DatasetError(
                f"{f}: in class folder '{f.parent.name}', the base labels row "
                f"{int(base.index[r])} '{base.classes[base.labels[r]]}'"
            )
        out[r] = pixels
    return out


def images_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    base: ImageSet,
    units: Units,
    where: Path,
    labels_where: Path,
) -> np.ndarray:
    """The base's rows of released (N, H, W, C) images checked against the base's labels."""
    images, labels = numeric(images, where), numeric(labels, labels_where)
    if images.ndim != 4 or images.shape[1:] != base.shape:
        raise DatasetError(f"{where}: images have shape {images.shape}, expected N x {base.shape}")
    if labels.ndim == 2:  # one-hot
        if labels.shape[1] != base.num_classes:
            raise DatasetError(
                f"{labels_where}: {labels.shape[1]} label columns for {base.num_classes} classes"
            )
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(
            f"{labels_where}: labels {labels.shape} do not match {len(images)} images"
        )
    rows = rows_for(base, len(images), where)
    check_labels(labels[rows].astype(np.int64), base, labels_where)
    picked = images[rows]
    if picked.dtype == np.uint8:
        return picked
    return np.rint(to_unit(picked, units, 0.0, where) * 255).astype(np.uint8)


def read_npz(paths: list[Path], base: ImageSet, cfg: ScaledImportConfig) -> np.ndarray:
    path = one_path(paths, "npz")
    try:  # the file opened here: np.load leaves its own open when a zip is bad
        with path.open("rb") as f, np.load(f, allow_pickle=False) as arrays:
            keys = set(arrays.files)
            pair = next((p for p in (("data", "targets"), ("x", "y")) if set(p) <= keys), None)
            if pair is None:
                raise DatasetError(f"{path}: needs keys data/targets or x/y, has {sorted(keys)}")
            images, labels = arrays[pair[0]], arrays[pair[1]]
    except DatasetError:
        raise
    except Exception as e:  # not a zip, a truncated member, a pickled array...
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{path}: unreadable as .npz ({detail})") from None
    return images_from_arrays(images, labels, base, cfg.units, path, path)


def ntga_files(paths: list[Path]) -> tuple[Path, Path]:
    """The x and y arrays: two paths, or the one x_*.npy / y_*.npy pair (train preferred)."""
    for p in paths:
        if not p.exists():
            raise DatasetError(f"{p}: no such file or directory")
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) != 1 or not paths[0].is_dir():
        raise DatasetError("ntga: give a folder with x_*.npy and y_*.npy, or the two files")

    def pick(prefix: str) -> Path:
        found = sorted(paths[0].glob(f"{prefix}_*.npy"))
        train = [f for f in found if f.name.startswith(f"{prefix}_train")]
        found = train or found
        if len(found) != 1:
            names = ", ".join(f.name for f in found) or "none"
            raise DatasetError(f"{paths[0]}: expected one {prefix}_*.npy, found {names}")
        return found[0]

    return pick("x"), pick("y")


def read_ntga(paths: list[Path], base: ImageSet, cfg: ScaledImportConfig) -> np.ndarray:
    x, y = ntga_files(paths)
    return images_from_arrays(load_array(x), load_array(y), base, cfg.units, x, y)
