"""The purification trace: what each defence output kept of the poison, on real files."""

from __future__ import annotations

import numpy as np
import pytest

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import write_images
from raypurify.experiments.trace import (
    HIGH_BAND,
    class_parts,
    energy_share,
    frequency_parts,
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


def test_frequency_parts_split_a_poison_at_the_band_edge():
    """A smooth gradient lies below HIGH_BAND, a pixel checkerboard (16 cycles) above it; the
    parts are orthogonal and add up to the poison."""
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.cos(2 * np.pi * 2 * x / 32)[None, :, :, None] * np.ones((4, 1, 1, 3))
    checker = ((-1.0) ** (x + y))[None, :, :, None] * np.ones((4, 1, 1, 3))
    low, high = frequency_parts(smooth + checker)
    assert np.allclose(low, smooth) and np.allclose(high, checker)
    assert np.allclose(low + high, smooth + checker)
    assert energy_share(high, smooth + checker) == pytest.approx(2 / 3)  # cos^2 averages 1/2
    assert share_kept(low, high) == pytest.approx(0.0, abs=1e-9)
    # the edge itself: a frequency of HIGH_BAND cycles counts as high
    edge = np.cos(2 * np.pi * HIGH_BAND * x / 32)[None, :, :, None]
    assert np.allclose(frequency_parts(edge)[1], edge)


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


def test_trace_splits_what_an_output_kept_by_spatial_frequency(tmp_path):
    """An output that blurred the poison away from HIGH_BAND up and kept its coarse part: the
    overall figure says 'some of it', the band split says which part."""
    rng = np.random.default_rng(5)
    n = 40
    clean = rng.integers(60, 190, (n, 32, 32, 3)).astype(np.int16)
    y, x = np.mgrid[0:32, 0:32]
    coarse = np.full((1, 32, 32, 1), 6)  # a brightness shift: frequency 0
    fine = 6 * ((-1) ** (x + y))[None, :, :, None]  # a checkerboard: 16 cycles
    delta = np.broadcast_to(coarse + fine, clean.shape).astype(np.int16)

    def write(pixels, name):
        order = np.arange(n)
        data = ImageSet(pixels.astype(np.uint8), order % 2, order, ["a", "b"])
        return write_images(data, tmp_path / name).path

    records = [
        record("data", "data/clean", write(clean, "clean"), "clean"),
        record("poison", "poison/x", write(clean + delta, "poison"), "x"),
        record("defend", "defend/x/blur", write(clean + coarse, "blur"), "x", "blur"),
    ]
    (entry,) = trace(records)
    assert entry["high_share"] == pytest.approx(0.5)
    assert entry["kept_low"] == pytest.approx(1.0)
    assert entry["kept_high"] == pytest.approx(0.0, abs=1e-9)
    assert entry["kept"] == pytest.approx(0.5)
    table = "\n".join(markdown([entry], ["clean", "x"]))
    assert "| x | 0.50 | 1.00 / 0.00 |" in table
