"""How much of a poison can a purifier leave before the classifier learns the shortcut?

A purifier's output keeps some share of the poison (the purification trace's "kept"). This
benchmark puts a known share alpha of a poison back onto a base set and trains the
classifier on it through the real pipeline (Ray Train, the given recipe), validating on
clean *training* rows outside the set, never the test set:

    images = round(clip(base + alpha * (poisoned - clean)))

With the clean originals as the base (the default) it is the poison's dose-response at this
recipe; with a purifier's output on the clean rows as the base (`--base`, e.g. P3 of the clean
rows from bench/p3_passes.py --save) it adds the purifier's blur, which is what a classifier
trained on purified data sees. Rows are the base's (without one, the
rows bench/p3_passes.py trains on); validation rows are the clean set's rows
that are not in the base.

`--part` splits the poison in two: `class` keeps only its mean over each class's rows (the
part a class-conditional decoder such as D-VAE's D_p, told only the label, can learn and
subtract), `sample` only what is left, each image's own deviation from that mean. Whether
a sample-wise poison's shortcut survives in its per-image part says whether stage 1 could
remove it without the latent z carrying the poison. `low` and `high` split it by spatial
frequency instead, below and from `--cut` cycles per image: which band carries the
shortcut says whether a purifier that keeps the image's low frequencies must also remove
the poison there.

    python bench/p3_passes.py --poison tap3500 --clean clean3500 --save p3
    python bench/poison_dose.py --poison tap3500 --clean clean3500 --base p3/p3-clean-1 --work dose
    python bench/poison_dose.py --poison tap3500 --clean clean3500 --part sample --alphas 1 \
        --work dose-sample --label sample

Results: bench/results/poison_dose-<poison dir name>[-<label>][-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from in_process import by_index, positions, probe_split  # noqa: E402

from raypurify.data.imageset import ImageSet  # noqa: E402
from raypurify.data.interchange import read_images, write_images  # noqa: E402
from raypurify.experiments.trace import class_parts, frequency_parts  # noqa: E402
from raypurify.training.run import run_training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poison", required=True, help="a poisoned dataset (interchange format)")
    ap.add_argument("--clean", required=True, help="the clean dataset it was made from")
    ap.add_argument("--base", help="the images alpha * poison is added to (default: clean)")
    ap.add_argument("--rows", type=int, default=2500, help="rows, without --base")
    ap.add_argument("--alphas", default="0,0.1,0.2,0.3,0.5,1", help="shares of the poison")
    ap.add_argument("--work", required=True, help="a new folder for the sets and classifiers")
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--label", default="", help="the result file's variant name")
    ap.add_argument(
        "--part",
        choices=("whole", "class", "sample", "low", "high"),
        default="whole",
        help="the poison, its per-class mean, each image's deviation from that mean, or its "
        "spatial frequencies below or from --cut",
    )
    ap.add_argument("--cut", type=float, default=8, help="cycles per image, for low/high")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work: {work} is not empty; give a new folder (each run writes its own sets)")
    poisoned, clean = read_images(args.poison), read_images(args.clean)
    if args.base:
        base = read_images(args.base)
        index, base_images, labels = base.index, base.images, base.labels
    else:  # the rows bench/p3_passes.py trains on
        order, _ = probe_split(len(poisoned), args.rows, 0)
        index, labels = poisoned.index[order], poisoned.labels[order]
        base_images = by_index(clean, index)
    whole = by_index(poisoned, index).astype(np.float64) - by_index(clean, index)
    class_wise, rest = class_parts(whole, labels)
    low, high = frequency_parts(whole, args.cut)
    parts = {"whole": whole, "class": class_wise, "sample": rest, "low": low, "high": high}
    delta = parts[args.part]
    energy = float((delta**2).sum() / max((whole**2).sum(), 1e-12))
    held = np.setdiff1d(clean.index, index)
    val = work / "validation"
    at = positions(clean, held)
    write_images(ImageSet(clean.images[at], clean.labels[at], held, clean.classes), val)
    results = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        images = np.clip(np.round(base_images + alpha * delta), 0, 255).astype(np.uint8)
        train = work / f"alpha-{alpha:g}"
        write_images(ImageSet(images, labels, index, clean.classes), train)
        metrics = run_training(
            str(train),
            str(val),
            str(work / f"classifier-alpha-{alpha:g}"),
            recipe_name=args.recipe,
            num_cpus=args.num_cpus,
        )
        results.append(
            {"alpha": alpha, "val_accuracy": metrics["accuracy"], "wall_s": metrics["wall_s"]}
        )
    notes = (
        f"Poison {args.poison} ({args.part}"
        + (f", cut at {args.cut:g} cycles" if args.part in ("low", "high") else "")
        + f") on {args.base or 'the clean originals'}, "
        f"{energy:.3f} of its energy, {len(index)} rows; "
        f"recipe {args.recipe}; validation on {len(held)} clean training rows outside them."
    )
    tag = f"-{args.label}" if args.label else ""
    write_results(
        f"poison_dose-{Path(args.poison).name}{tag}",
        results,
        ["alpha", "val_accuracy", "wall_s"],
        notes,
    )


if __name__ == "__main__":
    main()
