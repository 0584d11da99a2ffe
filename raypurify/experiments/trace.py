"""How much of each poison a defence leaves behind, and what it costs the images.

For every finished defence output (a transform's set, the plain VAE's reconstruction, and
D-VAE's P1, P2 and P3) this compares a seeded sample of training rows with their clean
originals x, given the poisoned rows x0 = x + delta:
- PSNR (dB) of the output against x: the price the defence makes every image pay;
- poison kept: the least-squares coefficient of the output's change on the poison,
  <out - x, delta> / <delta, delta> over the sample. 1 when the defence left the poison as
  it was, 0 when what remains is uncorrelated with it, 0.3 when 30 % of it survives.
  out - x also holds what the defence does to the clean image; a poison computed from the
  images can line up with that, and then it counts too (grayscale on NTGA: 0.98, of which
  0.40 is the colour it takes out of the clean images, docs/RESULTS.md).
Read along D-VAE's P1 -> P2 -> P3 this shows which stage removes a poison: the stage-1
subtraction of p_hat (paper Algorithm 1) or the stage-2 reconstruction.

Each attack row also gets its poison's class-wise share: the part of delta's energy in
its per-class mean. Stage 1's D_p sees the same rate-capped z as the reconstruction
decoder plus the class embedding u_y, and whatever of the poison z carries the
reconstruction decoder takes first (that lowers both squared errors of Eq. 14, p_hat only
the second). So p_hat holds what the label explains of the poison beyond the blurred
image, and the per-class mean is the simplest such part: a poison whose share is near 0
(a fresh pattern per image) mostly passes stage 1 and is left to stage 2's rate cap. Over
a sample of n rows per class, noise with no class part still shows a share of about 1/n.

And its share at fine spatial frequencies (HIGH_BAND cycles per image and up), with what each
output kept below and from there. A sample-wise poison crafted by gradient steps lies mostly
there, where a natural image holds little energy and a classifier still finds its shortcut;
JPEG's quantiser drops small coefficients there, while a reconstruction sharp enough to
keep the image's detail passes a small perturbation about as it passes that detail
(docs/RESULTS.md, "Where in the spectrum TAP passes").

These are diagnostics of an experiment, which holds the clean images a defender does not:
they explain a table and must never be used to choose a setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raypurify.data.interchange import open_dataset
from raypurify.reports.figures import images_by_index

SAMPLE = 2000  # rows per comparison: enough for two decimals, cheap to decode
STAGES = ("p1", "p2", "p3")
HIGH_BAND = 8.0  # cycles per image: for 32-px images, the finest three quarters of the radii


def psnr(clean: np.ndarray, out: np.ndarray) -> float | None:
    """PSNR (dB) of uint8 images against their clean originals; None when identical."""
    mse = np.mean((out.astype(np.float64) - clean) ** 2)
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def share_kept(change: np.ndarray, part: np.ndarray) -> float | None:
    """<change, part> / <part, part>: how much of `part` a change from the clean images
    holds (1 = all of it, 0 = none); None for an empty part."""
    energy = float(np.sum(part * part))
    return None if energy == 0 else float(np.sum(change * part) / energy)


def class_parts(delta: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """delta split into its class-wise part (each row's class mean) and the rest."""
    means = np.zeros_like(delta, dtype=np.float64)
    for c in np.unique(labels):
        means[labels == c] = delta[labels == c].mean(0)
    return means, delta - means


def energy_share(part: np.ndarray, whole: np.ndarray) -> float | None:
    """The share of `whole`'s energy in `part`, one of its orthogonal parts; None when
    `whole` is empty."""
    energy = float(np.sum(whole * whole))
    return None if energy == 0 else float(np.sum(part * part)) / energy


def radial_frequency(height: int, width: int) -> np.ndarray:
    """Each spatial frequency's distance from zero in cycles per image, shaped (1, H, W, 1)
    to mask the spectra np.fft.fft2 gives of (N, H, W, C) images (axes 1, 2)."""
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    return np.hypot(*np.meshgrid(fy, fx, indexing="ij"))[None, :, :, None]


def frequency_parts(delta: np.ndarray, cut: float = HIGH_BAND) -> tuple[np.ndarray, np.ndarray]:
    """`delta` (N, H, W, C) split into its spatial frequencies below `cut` cycles per image
    and the rest (orthogonal parts that add up to `delta`)."""
    below = radial_frequency(*delta.shape[1:3]) < cut
    low = np.fft.ifft2(np.fft.fft2(delta, axes=(1, 2)) * below, axes=(1, 2)).real
    return low, delta - low


def labels_by_index(path: str | Path, wanted: np.ndarray) -> np.ndarray:
    """The labels of the rows whose `index` is in `wanted`, in that order."""
    info = open_dataset(path)
    found: dict[int, int] = {}
    for f in info.files:
        t = pq.read_table(f, columns=["label", "index"])
        found.update(zip(t["index"].to_pylist(), t["label"].to_pylist(), strict=True))
    return np.array([found[int(i)] for i in wanted])


def sample_rows(path: str | Path, n: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """A seeded sample of a dataset's row indexes, sorted."""
    info = open_dataset(path)
    ids = np.concatenate(
        [pq.read_table(f, columns=["index"])["index"].to_numpy() for f in info.files]
    )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=min(n, len(ids)), replace=False))


def defence_outputs(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, dataset path) of each output of a finished defend or purify step."""
    column, result = record["meta"]["column"], record["result"]
    stages = [(s, result["outputs"][s]["path"]) for s in STAGES if s in result.get("outputs", {})]
    if len(stages) > 1:  # D-VAE: every stage's set
        return [(f"{column} {s.upper()}", path) for s, path in stages]
    return [(column, result["path"])]


def trace(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (row, defence output): its PSNR against clean and the poison it kept."""
    by_name = {r["name"]: r for r in records if r.get("result")}
    if "data/clean" not in by_name:
        return []
    clean_path = by_name["data/clean"]["result"]["path"]
    ids = sample_rows(clean_path)
    clean = images_by_index(clean_path, ids)
    labels = labels_by_index(clean_path, ids)
    # Each poisoned row's delta = x0 - x, with its class-wise part and the rest and its
    # parts below and from HIGH_BAND, read once.
    poisons: dict[str, tuple[np.ndarray, ...]] = {}
    entries = []
    for r in records:
        if r["kind"] not in ("defend", "purify") or not r.get("result"):
            continue
        row = r["meta"]["row"]
        if row != "clean" and row not in poisons:
            poison = by_name.get(f"poison/{row}")
            if poison is None:
                continue
            delta = images_by_index(poison["result"]["path"], ids).astype(np.float64) - clean
            poisons[row] = (delta, *class_parts(delta, labels), *frequency_parts(delta))
        for label, path in defence_outputs(r):
            if tuple(open_dataset(path).shape) != clean.shape[1:]:
                continue  # grayscale and resizing defences change the image space
            out = images_by_index(path, ids)
            entry = {"row": row, "output": label, "rows": len(ids), "psnr": psnr(clean, out)}
            entry.update(kept=None, class_share=None)  # the clean row has no poison
            if row in poisons:  # how much of the poison, and of each part, the output kept
                delta, means, rest, low, high = poisons[row]
                change = out.astype(np.float64) - clean
                entry.update(
                    kept=share_kept(change, delta),
                    class_share=energy_share(means, delta),
                    kept_classwise=share_kept(change, means),
                    kept_rest=share_kept(change, rest),
                    high_share=energy_share(high, delta),
                    kept_low=share_kept(change, low),
                    kept_high=share_kept(change, high),
                )
            entries.append(entry)
    return entries


def markdown(entries: list[dict[str, Any]], rows: list[str]) -> list[str]:
    """The trace as a table: rows as in the results table (those with a defence output: a
    clean row of no defence but `none` has nothing to trace), a column per output."""
    if not entries:
        return []
    outputs = list(dict.fromkeys(e["output"] for e in entries))
    cell = {(e["row"], e["output"]): e for e in entries}
    traced = {e["row"] for e in entries}
    out = [
        f"Purification trace on {entries[0]['rows']:,} training rows against their clean "
        "originals: poison kept (1 = untouched, 0 = removed) / PSNR in dB, and the share of "
        "the poison that is class-wise (in its per-class mean, which stage 1's class "
        "embedding can hold). A diagnostic; it needs the clean images and chooses nothing:",
        "",
        "| attack | class-wise share | " + " | ".join(outputs) + " |",
        "|---|---:|" + "---:|" * len(outputs),
    ]
    share = {e["row"]: e.get("class_share") for e in entries}
    for row in (r for r in rows if r in traced):
        vals = ["-" if share[row] is None else f"{share[row]:.2f}"]
        for o in outputs:
            e = cell.get((row, o))
            if e is None:
                vals.append("")
                continue
            kept = "-" if e["kept"] is None else f"{e['kept']:.2f}"
            db = "inf" if e["psnr"] is None else f"{e['psnr']:.1f}"
            vals.append(f"{kept} / {db}")
        out.append(f"| {row} | " + " | ".join(vals) + " |")
    return [*out, "", *stage1_parts(entries, rows), *by_band(entries, rows)]


def stage1_parts(entries: list[dict[str, Any]], rows: list[str]) -> list[str]:
    """What D-VAE's stage 1 (P1) kept of each part of each poison: its class-wise part and
    the rest (what differs from image to image)."""
    found = [e for e in entries if e["output"].endswith(" P1") and "kept_rest" in e]
    if not found:
        return []
    out = [
        "Stage 1 by part of the poison (kept, 1 = untouched): the class-wise part (each "
        "image's class mean) and the rest (what differs from image to image):",
        "",
        "| attack | output | class-wise share | class-wise part kept | the rest kept |",
        "|---|---|---:|---:|---:|",
    ]
    order = {r: i for i, r in enumerate(rows)}
    for e in sorted(found, key=lambda e: order.get(e["row"], len(order))):
        vals = [e["class_share"], e["kept_classwise"], e["kept_rest"]]
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
        out.append(f"| {e['row']} | {e['output']} | {cells} |")
    return [*out, ""]


def by_band(entries: list[dict[str, Any]], rows: list[str]) -> list[str]:
    """What each output kept of each poison below HIGH_BAND and from there on."""
    found = [e for e in entries if e.get("high_share") is not None]
    if not found:
        return []
    outputs = list(dict.fromkeys(e["output"] for e in found))
    cell = {(e["row"], e["output"]): e for e in found}
    share = {e["row"]: e["high_share"] for e in found}
    out = [
        f"By spatial frequency: the share of the poison's energy at {HIGH_BAND:g} cycles per "
        "image and up (where a sample-wise poison's shortcut mostly lies), and what each "
        f"output kept of the poison below / from {HIGH_BAND:g} cycles:",
        "",
        f"| attack | share at {HIGH_BAND:g}+ cycles | " + " | ".join(outputs) + " |",
        "|---|---:|" + "---:|" * len(outputs),
    ]
    for row in (r for r in rows if r in share):
        vals = [f"{share[row]:.2f}"]
        for o in outputs:
            e = cell.get((row, o))
            parts = () if e is None else (e["kept_low"], e["kept_high"])
            vals.append(" / ".join("-" if v is None else f"{v:.2f}" for v in parts))
        out.append(f"| {row} | " + " | ".join(vals) + " |")
    return [*out, ""]
