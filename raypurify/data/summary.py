"""`datasets show`: row count, class histogram, pixel statistics and a sample grid."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from raypurify.atomic import write_bytes
from raypurify.data.interchange import MANIFEST, DatasetInfo, iter_images, open_dataset
from raypurify.errors import DatasetError
from raypurify.reports.images import class_rows, grid

PER_CLASS = 8
GRID_TAG = "raypurify-grid"  # a PNG text key: the grid of the dataset it names


@dataclass
class Summary:
    info: DatasetInfo
    class_counts: np.ndarray
    poisoned: int | None
    mean: np.ndarray  # per channel, in [0, 255]
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    grid: str  # its path, or why it was not written

    def lines(self) -> list[str]:
        i = self.info
        h, w, c = i.shape
        out = [
            f"dataset   {i.path}  (id {i.id})",
            f"rows      {i.rows}   images {h}x{w}x{c}   classes {len(i.classes)}"
            + ("" if self.poisoned is None else f"   poisoned {self.poisoned}"),
            "classes:",
        ]
        peak = max(1, int(self.class_counts.max()))
        for k, (name, n) in enumerate(zip(i.classes, self.class_counts, strict=True)):
            out.append(f"  {k:>3} {name:<14} {n:>7}  {'#' * round(30 * n / peak)}")
        chans = "RGB" if c == 3 else "L"
        for label, v in (
            ("mean", self.mean),
            ("std", self.std),
            ("min", self.low),
            ("max", self.high),
        ):
            out.append(
                f"pixel {label:<4} "
                + "  ".join(f"{ch} {x:7.2f}" for ch, x in zip(chans, v, strict=True))
            )
        parents = ", ".join(
            p.get("id") or p.get("source", "?") for p in i.manifest.get("parents", [])
        )
        out.append(f"lineage   {parents or '-'}")
        out.append(f"grid      {self.grid}")
        return out


def grid_target(info: DatasetInfo, asked: str | Path | None) -> tuple[Path | None, str]:
    """Where the grid goes, decided before any row is read: a new file, or a grid this
    command wrote (its PNG carries GRID_TAG), never a file in a dataset directory. A
    `--grid` that fails these is an error; the default place, beside the dataset, is
    skipped instead (the summary still prints), with the reason."""
    here = info.path.resolve()
    path = Path(asked) if asked else here.parent / f"{here.name}-grid.png"
    if not path.parent.is_dir():
        problem = f"folder {path.parent} does not exist"
    elif path.is_dir():
        problem = "is a folder; give a .png file path"
    elif (path.parent / MANIFEST).exists():
        problem = "inside a dataset directory"
    elif path.exists() and not is_grid(path):
        problem = "exists, and is not a grid `datasets show` wrote"
    elif not os.access(path.parent, os.W_OK):
        problem = f"folder {path.parent} is not writable"
    else:
        return path, ""
    if asked:
        raise DatasetError(f"--grid {path}: {problem}")
    return None, f"not written ({path}: {problem}; pass --grid FILE)"


def is_grid(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return GRID_TAG in getattr(im, "text", {})
    except (OSError, ValueError):
        return False


def summarize(path: str | Path, grid_path: str | Path | None = None) -> Summary:
    """Stream the dataset once (file by file) and save a grid of examples per class."""
    info = open_dataset(path)
    target, skipped = grid_target(info, grid_path)
    counts = np.zeros(len(info.classes), np.int64)
    c = info.shape[2]
    total, sq = np.zeros(c), np.zeros(c)
    low, high = np.full(c, 255.0), np.zeros(c)
    poisoned = 0 if info.has_poisoned else None
    examples: dict[int, list[np.ndarray]] = {k: [] for k in range(min(10, len(info.classes)))}
    with tqdm(total=info.rows, desc="reading", unit="img", leave=False) as bar:
        for chunk in iter_images(info.path, info=info):
            counts += chunk.class_counts()
            px = chunk.images.reshape(-1, c).astype(np.float64)
            total += px.sum(0)
            sq += (px**2).sum(0)
            low, high = np.minimum(low, px.min(0)), np.maximum(high, px.max(0))
            if poisoned is not None:
                poisoned += int(cast(np.ndarray, chunk.poisoned).sum())  # has_poisoned
            for r in class_rows(chunk.labels, chunk.num_classes, PER_CLASS):
                k = int(chunk.labels[r])
                if len(examples[k]) < PER_CLASS:
                    examples[k].append(chunk.images[r])
            bar.update(len(chunk))
    n = info.rows * info.shape[0] * info.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0))
    tiles = [img for k in sorted(examples) for img in examples[k]]
    scale = max(1, 64 // info.shape[0])
    if target is not None:
        png, tag = io.BytesIO(), PngInfo()
        tag.add_text(GRID_TAG, str(info.path))
        image = Image.fromarray(grid(np.stack(tiles), ncol=PER_CLASS, scale=scale))
        image.save(png, format="PNG", pnginfo=tag)
        write_bytes(target, png.getvalue())
    return Summary(info, counts, poisoned, mean, std, low, high, str(target or skipped))
