"""The paper's analyses, as experiment steps.

- Disentanglement check (paper Table 1): add the stage-1 D-VAE's learned p_hat(x0) to the
  *clean* images and train on that. If p_hat carries the poison, accuracy collapses as it
  does on the real poisoned set.
- UE detection (paper Table 8): score each training image by its stage-1 p_hat, split the
  scores into two groups without labels (Otsu's threshold), and compare with the
  `poisoned` column. Two statistics: the l2 norm of p_hat (the paper's), and the cosine
  between p_hat and its class's mean p_hat, which is high when a class shares a pattern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from raypurify.data.interchange import DatasetInfo, open_dataset, read_images, write_images
from raypurify.defenses.dvae.config import PurifyConfig
from raypurify.defenses.dvae.passes import perturbations
from raypurify.distributed import use_gpu

if TYPE_CHECKING:
    from raypurify.experiments.actions import Context
    from raypurify.experiments.steps import Step


def stage1_perturbations(
    poison_path: str, purify_dir: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, labels, p_hat) of the stage-1 model over the poisoned set, by index."""
    pdir = Path(purify_dir)
    cfg = PurifyConfig.model_validate(json.loads((pdir / "config.json").read_text()))
    return perturbations(open_dataset(poison_path), pdir / "stage1.pt", cfg, use_gpu(cfg.device))


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """The cut between two groups of 1-D scores that maximises between-group variance."""
    hist, edges = np.histogram(scores, bins=bins)
    p = hist / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centers)
    total = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[1:][np.argmax(between)])


def detection_scores(p_hat: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    flat = p_hat.reshape(len(p_hat), -1).astype(np.float64)
    norm = np.linalg.norm(flat, axis=1)
    cosine = np.zeros(len(flat))
    for c in np.unique(labels):
        rows = labels == c
        mean = flat[rows].mean(0)
        cosine[rows] = flat[rows] @ mean / (norm[rows] * np.linalg.norm(mean) + 1e-12)
    return {"norm": norm, "class_cosine": cosine}


def detection_metrics(scores: dict[str, np.ndarray], poisoned: np.ndarray) -> dict[str, Any]:
    out = {}
    for name, s in scores.items():
        threshold = otsu_threshold(s)
        pred = s > threshold
        tp = int((pred & poisoned).sum())
        precision = tp / max(int(pred.sum()), 1)
        recall = tp / max(int(poisoned.sum()), 1)
        out[name] = {
            "threshold": threshold,
            "accuracy": float((pred == poisoned).mean()),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        }
    return out


def detect_poisoned(poison_path: str | Path, purify_dir: str | Path) -> dict[str, Any]:
    """Detection metrics for a partly poisoned set from its stage-1 p_hat."""
    index, labels, p_hat = stage1_perturbations(str(poison_path), str(purify_dir))
    data = read_images(poison_path)
    flags = None if data.poisoned is None else data.poisoned[np.argsort(data.index)]
    if flags is None or not flags.any() or flags.all():
        state = "every row is" if flags is not None and flags.all() else "no row is"
        return {"note": f"detection needs a mix of poisoned and clean rows; {state} poisoned"}
    return detection_metrics(detection_scores(p_hat, labels), flags)


def write_clean_plus_phat(
    clean_path: str | Path, poison_path: str | Path, purify_dir: str | Path, out: str | Path
) -> DatasetInfo:
    """The disentanglement check's training set: clean images + the stage-1 p_hat(x0)."""
    index, _, p_hat = stage1_perturbations(str(poison_path), str(purify_dir))
    data = read_images(clean_path)
    data = data.take(np.argsort(data.index))
    data = data.take(np.flatnonzero(np.isin(data.index, index)))
    x = data.images.astype(np.float32) / 255 + p_hat.transpose(0, 2, 3, 1)
    mixed = data.replace(np.clip(np.round(x * 255), 0, 255).astype(np.uint8), poisoned=None)
    parents = [open_dataset(p).lineage() for p in (clean_path, poison_path)]
    return write_images(
        mixed,
        out,
        overwrite=True,
        parents=parents,
        config={"analysis": "clean + p_hat", "purify_dir": str(purify_dir)},
    )


# Experiment steps ------------------------------------------------------------------------


def detect(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    poison, purified = step.inputs
    # Inputs have finished (their result set) before a step runs.
    found = detect_poisoned(
        cast(dict[str, Any], poison.result)["path"],
        cast(dict[str, Any], purified.result)["purify_dir"],
    )
    return {"row": step.meta["row"], **found}


def clean_plus_phat(step: Step, directory: Path, ctx: Context) -> dict[str, Any]:
    clean, poison, purified = step.inputs
    # Inputs have finished (their result set) before a step runs.
    info = write_clean_plus_phat(
        cast(dict[str, Any], clean.result)["path"],
        cast(dict[str, Any], poison.result)["path"],
        cast(dict[str, Any], purified.result)["purify_dir"],
        directory / "data",
    )
    return {"path": str(info.path), "sha256": info.sha256, "rows": info.rows}
