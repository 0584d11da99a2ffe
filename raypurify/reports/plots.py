"""Matplotlib figures logged as artifacts (headless backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike


def confusion_figure(confusion: ArrayLike, classes: list[str]) -> Figure:
    """A row-normalised confusion matrix with counts."""
    c = np.asarray(confusion, dtype=np.float64)
    norm = c / np.maximum(c.sum(1, keepdims=True), 1)
    k = len(classes)
    size = max(4.0, 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    int(c[i, j]),  # type: ignore[arg-type]  # Text str()s any value
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(c) / max(c.sum(), 1)
    ax.set_title(f"accuracy {acc:.2%}")
    fig.tight_layout()
    return fig
