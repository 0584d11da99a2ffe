"""Smoke-run the paper presets (cifar10-paper, cifar100-paper, imagenet100-paper) through
the same code path as a full run, with sizes cut so each finishes in minutes on a CPU.

    python scripts/smoke_paper_presets.py [--out /tmp/smoke] [--only cifar10-paper]

CIFAR-100 and the ImageNet subset are not on this machine, so their smoke runs use stand-ins
with the same shapes: `synthetic` with 100 classes at 32 px, and a generated ImageFolder of
100 classes at 224 px. Every attack, defence and classifier of the preset runs; only the
counts (images, epochs, PGD steps, surrogate epochs) are cut.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raypurify.experiments import load_spec
from raypurify.experiments.runner import run_experiment

CUT_ATTACKS = {
    "em": [
        "max_rounds=1",
        "train_steps=1",
        "pgd_steps=1",
        "batch_size=32",
        "surrogate_options={width: 8}",
        "surrogate=fast-resnet",
    ],
    "tap": ["steps=1", "restarts=1", "surrogate_overrides=[epochs=1, batch_size=32]"],
    "ntga": ["steps=1"],
}
CUT_DVAE = "[stage1.epochs=1, stage2.epochs=1, stage1.batch_size=32, stage2.batch_size=32]"


def image_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    """A small ImageFolder with train/ and val/ splits of random-noise images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.JPEG", quality=90)
    return root


def cuts(name: str, spec, data_root: Path) -> list[str]:
    sets = ["classifiers.0.overrides=[epochs=1, batch_size=32]"]
    for i, a in enumerate(spec.attacks):
        for o in CUT_ATTACKS.get(a.name, []):
            sets.append(f"attacks.{i}.options.{o.split('=')[0]}={o.split('=', 1)[1]}")
    for i, d in enumerate(spec.defenses):
        if d.name == "dvae":
            sets.append(f"defenses.{i}.options.overrides={CUT_DVAE}")
    if name == "cifar100-paper":
        sets += [
            "dataset={name: synthetic, classes: 100, rows: 400}",
            "test={name: synthetic, split: test, classes: 100, rows: 200}",
        ]
    elif name == "imagenet100-paper":
        sets += [
            f"dataset.path={data_root}",
            f"test.path={data_root}",
            "dataset.subset=200",
            "test.subset=100",
        ]
    else:
        sets += ["dataset.subset=200", "test.subset=100"]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="smoke-"))
    folder = image_folder(out / "imagenet-standin", classes=100, per_class=3, size=224)
    for name in args.only or ["cifar10-paper", "cifar100-paper", "imagenet100-paper"]:
        spec = load_spec(name, cuts(name, load_spec(name), folder))
        start = time.perf_counter()
        results = run_experiment(spec, out / name)
        print(
            f"{name}: {len(results['cells'])} cells in {time.perf_counter() - start:.0f} s "
            f"-> {out / name / 'results.md'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
