"""The purification trace: what each defence output kept of the poison, on real files."""

from __future__ import annotations

import numpy as np
import pytest

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import write_images
from raypurify.experiments.trace import (
    class_parts,
    energy_share,
    markdown,
    psnr,
    share_kept,
    trace,
)


def poison_kept(clean, poisoned, out):
    """The trace's poison kept: the change share_kept finds of delta = poisoned - clean."""
    return share_kept(out - clean.astype(np.float64), poisoned - clean.astype(np.float64))


def class_share(clean, poisoned, labels):
    """The trace's class-wise share: delta's energy in its class-wise part."""
    delta = poisoned - clean.astype(np.float64)
    return energy_share(class_parts(delta, labels)[0], delta)


def images(seed: int, n: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (n, 8, 8, 3), dtype=np.uint8)


def test_poison_kept_measures_the_share_of_the_poison_left():
    clean = images(0).astype(np.int16)
    delta = np.random.default_rng(1).choice([-8, 8], clean.shape)
    assert poison_kept(clean, clean + delta, clean + delta) == pytest.approx(1.0)
    assert poison_kept(clean, clean + delta, clean) == pytest.approx(0.0)
    assert poison_kept(clean, clean + delta, clean + delta // 2) == pytest.approx(0.5)
    assert poison_kept(clean, clean + delta, clean - delta) == pytest.approx(-1.0)
    assert poison_kept(clean, clean, clean + delta) is None  # no poison: nothing to keep


def test_class_share_is_the_part_of_the_poison_in_its_class_means():
    rng = np.random.default_rng(3)
    clean = images(0, n=3000).astype(np.int16)
    labels = np.arange(len(clean)) % 3
    pattern = rng.choice([-8, 8], (3, *clean.shape[1:]))  # one pattern per class
    noise = rng.choice([-8, 8], clean.shape)  # a fresh pattern per image
    assert class_share(clean, clean + pattern[labels], labels) == pytest.approx(1.0)
    # per-image noise: its class means are noise over 1,000 rows, energy share ~ 1/1000
    assert class_share(clean, clean + noise, labels) == pytest.approx(1e-3, abs=5e-4)
    # half of each: the class-wise half holds half the energy
    assert class_share(clean, clean + pattern[labels] + noise, labels) == pytest.approx(
        0.5, abs=0.01
    )
    assert class_share(clean, clean, labels) is None


def test_the_parts_of_a_poison_are_kept_apart():
    """An output that removed a poison's class-wise part and kept the rest: the split says so
    where the overall figure only says 'most of it'."""
    rng = np.random.default_rng(4)
    labels = np.arange(600) % 3
    delta = rng.choice([-8.0, 8.0], (3, 8, 8, 3))[labels] + rng.normal(0, 8, (600, 8, 8, 3))
    means, rest = class_parts(delta, labels)
    assert np.abs(means[labels == 0][0] - delta[labels == 0].mean(0)).max() < 1e-9
    assert np.abs(means[labels == 0] - means[labels == 0][0]).max() == 0  # one per class
    assert share_kept(rest, means) == pytest.approx(0.0, abs=1e-9)  # orthogonal parts
    assert share_kept(rest, rest) == pytest.approx(1.0)
    assert share_kept(np.zeros_like(delta), np.zeros_like(delta)) is None


def test_psnr_is_none_for_identical_images_and_falls_with_the_error():
    clean = images(0)
    assert psnr(clean, clean) is None
    assert psnr(clean, clean + 1) == pytest.approx(10 * np.log10(255.0**2))
    assert psnr(clean, clean + 4) < psnr(clean, clean + 1)


def record(kind, name, path, row, column=None, outputs=None):
    result = {"path": str(path)}
    if outputs:
        result["outputs"] = {k: {"path": str(v)} for k, v in outputs.items()}
    meta = {"row": row} if column is None else {"row": row, "column": column}
    return {"kind": kind, "name": name, "meta": meta, "result": result}


def test_trace_follows_the_poison_through_each_output_in_the_store(tmp_path):
    """A poison removed by half at P1 and fully at P3; a transform that keeps it; rows shuffled
    on disk, so matching must go by the `index` column."""
    clean = images(0)
    delta = np.random.default_rng(1).choice([-8, 8], (3, *clean.shape[1:]))[np.arange(60) % 3]
    delta = delta.astype(np.int16)  # one pattern per class (labels are index % 3)

    def write(pixels, name, order=None):
        order = np.arange(len(clean)) if order is None else order
        data = ImageSet(pixels[order].astype(np.uint8), order % 3, order, ["a", "b", "c"])
        return write_images(data, tmp_path / name, rows_per_file=25).path

    shuffled = np.random.default_rng(2).permutation(len(clean))
    paths = {
        "clean": write(clean, "clean"),
        "poison": write(clean + delta, "poison", shuffled),
        "p1": write(clean + delta // 2, "p1"),
        "p3": write(clean, "p3", shuffled),
        "kept": write(clean + delta, "kept"),
    }
    records = [
        record("data", "data/clean", paths["clean"], "clean"),
        record("poison", "poison/x", paths["poison"], "x"),
        record(
            "purify",
            "purify/x/dvae",
            paths["p3"],
            "x",
            "dvae",
            {"p1": paths["p1"], "p3": paths["p3"]},
        ),
        record("defend", "defend/x/none", paths["kept"], "x", "none"),
        record("defend", "defend/clean/none", paths["clean"], "clean", "none"),
    ]
    found = {(e["row"], e["output"]): e for e in trace(records)}
    assert set(found) == {("x", "dvae P1"), ("x", "dvae P3"), ("x", "none"), ("clean", "none")}
    assert found[("x", "dvae P1")]["kept"] == pytest.approx(0.5)
    assert found[("x", "dvae P3")]["kept"] == pytest.approx(0.0)
    assert found[("x", "dvae P3")]["psnr"] is None  # P3 is the clean set itself
    assert found[("x", "none")]["kept"] == pytest.approx(1.0)
    assert found[("clean", "none")]["kept"] is None
    assert found[("x", "none")]["class_share"] == pytest.approx(1.0)  # labels read by index
    assert found[("x", "dvae P1")]["kept_classwise"] == pytest.approx(0.5)
    assert found[("x", "dvae P1")]["kept_rest"] is None  # a class-wise poison has no rest
    assert found[("clean", "none")]["class_share"] is None
    table = "\n".join(markdown(list(found.values()), ["clean", "x"]))
    assert "on 60 training rows" in table
    assert "| x | 1.00 | 0.50 / " in table and "| clean | - | " in table
    assert "| x | dvae P1 | 1.00 | 0.50 | - |" in table  # stage 1 by part
    untraced = "\n".join(markdown([found[("x", "dvae P1")]], ["clean", "x"]))
    assert "| x | 1.00 | 0.50 / " in untraced and "| clean |" not in untraced
