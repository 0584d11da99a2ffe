"""The paper-style image figure: for each attack, a clean image, its poisoned version, the
perturbation (amplified), and the D-VAE's P1 and P3. Each attack's rows show images of
different classes, so a class-wise poison shows as a different pattern per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raypurify.data.codec import decode_image
from raypurify.data.interchange import open_dataset
from raypurify.experiments.spec import ExperimentSpec
from raypurify.reports.images import amplify, to_uint8

PER_ATTACK = 2


def images_by_index(path: str | Path, wanted: np.ndarray) -> np.ndarray:
    """Decode only the rows whose `index` is in `wanted`, in that order."""
    info = open_dataset(path)
    found: dict[int, np.ndarray] = {}
    for f in info.files:
        t = pq.read_table(f, columns=["image", "index"])
        ids = t["index"].to_numpy()
        for r in np.flatnonzero(np.isin(ids, wanted)):
            found[int(ids[r])] = decode_image(t["image"][int(r)].as_py(), info.shape[2])
    return np.stack([found[int(i)] for i in wanted])


def examples(path: str | Path, per_attack: int = PER_ATTACK) -> tuple[np.ndarray, list[str]]:
    """Indices of up to `per_attack` rows of the dataset's first file, each of another
    class (the lowest index of each class, classes in order), and those classes' names."""
    info = open_dataset(path)
    t = pq.read_table(info.files[0], columns=["index", "label"])
    index, label = t["index"].to_numpy(), t["label"].to_numpy()
    order = np.argsort(index, kind="stable")
    found, first = np.unique(label[order], return_index=True)  # each class's lowest index
    return index[order][first[:per_attack]], [info.classes[int(c)] for c in found[:per_attack]]


def pipeline_figure(spec: ExperimentSpec, records: list[dict[str, Any]], path: Path) -> Path | None:
    from raypurify.reports.plots import plt

    by_name = {r["name"]: r for r in records}
    clean = by_name.get("data/clean")
    dvae_cols = [d.column for d in spec.defenses if d.name == "dvae"]
    if clean is None:
        return None
    panels: list[tuple[list[str], dict[str, np.ndarray]]] = []
    for a in spec.attacks:
        poison = by_name.get(f"poison/{a.row}")
        purify = by_name.get(f"purify/{a.row}/{dvae_cols[0]}") if dvae_cols else None
        if poison is None:
            continue
        ids, classes = examples(poison["result"]["path"])
        x = images_by_index(clean["result"]["path"], ids)
        xp = images_by_index(poison["result"]["path"], ids)
        row = {
            "clean": x,
            "poisoned": xp,
            "perturbation (amplified)": to_uint8(amplify(xp.astype(np.float32) - x)),
        }
        if purify is not None:
            pdir = Path(purify["result"]["purify_dir"])
            for name in ("p1", "p3"):
                if (pdir / name).exists():
                    row[name.upper()] = images_by_index(pdir / name, ids)
        panels.append(([f"{a.row}\n{c}" for c in classes], row))
    if not panels:
        return None
    # mypy solves max() from list()'s context (an iterable of str), not from the rows.
    titles = list(max((p[1] for p in panels), key=len))  # type: ignore[arg-type]
    n_rows = sum(len(p[1]["clean"]) for p in panels)
    fig, axes = plt.subplots(
        n_rows, len(titles), figsize=(1.6 * len(titles), 1.6 * n_rows), squeeze=False
    )
    r = 0
    for labels, row in panels:
        for k, label in enumerate(labels):
            for j, title in enumerate(titles):
                ax = axes[r, j]
                ax.axis("off")
                if title in row:
                    ax.imshow(
                        row[title][k].squeeze(), cmap="gray" if row[title].shape[-1] == 1 else None
                    )
                if r == 0:
                    ax.set_title(title, fontsize=8)
            axes[r, 0].text(-4, 16, label, ha="right", va="center", fontsize=8)
            r += 1
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
