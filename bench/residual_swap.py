"""Is it what a purifier passes of a poison, or what it does to the image, that decides?

A classifier trained on JPEG-10's output of TAP-poisoned rows is far more accurate than one
trained on the D-VAE's, and the share of TAP each lets through has not predicted by how
much (docs/RESULTS.md). Each purifier's output on a poisoned row is its output on the clean
original (the base) plus what it passes of the poison (the residual, out(poisoned) -
out(clean)). This benchmark swaps the two parts between the D-VAE and JPEG-10 (or, with
`--other`, a second D-VAE's saved P3s) and trains the classifier through the real pipeline
(Ray Train, the given recipe) on

    D-VAE base + JPEG-10 residual:  round(clip(dvae(clean) + jpeg(poisoned) - jpeg(clean)))
    JPEG-10 base + D-VAE residual:  round(clip(jpeg(clean) + dvae(poisoned) - dvae(clean)))

validating on clean *training* rows outside them (never the test set). The D-VAE's outputs
are P3 of the training rows as bench/p3_passes.py --save writes them; the unswapped sets
are that P3 and JPEG-10 of the rows (`raypurify train --defense jpeg`).

    python bench/p3_passes.py --poison tap10k --clean clean10k --rows 9000 --held 1000 \
        --passes 1 --save p3
    python bench/poison_dose.py --poison tap10k --clean clean10k --rows 9000 --alphas 0,1 \
        --work dose      # writes dose/validation, the 1,000 other clean rows
    python bench/residual_swap.py --poison tap10k --clean clean10k --dvae p3 \
        --validation dose/validation --work swap

Results: bench/results/residual_swap-<poison dir name>[-<label>][-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from in_process import by_index  # noqa: E402

from raypurify.data.imageset import ImageSet  # noqa: E402
from raypurify.data.interchange import read_images, write_images  # noqa: E402
from raypurify.defenses.squeeze import JpegOptions, jpeg  # noqa: E402
from raypurify.training.run import run_training  # noqa: E402


def outputs(
    spec: str, passes: str, poison: str, clean: str, rows: ImageSet
) -> dict[str, np.ndarray]:
    """A purifier's outputs on the poisoned rows and on their clean originals, as floats:
    JPEG-10 of them (`jpeg`) or the P3s bench/p3_passes.py --save wrote to the folder
    `spec` (p3-poisoned-PASSES, p3-clean-PASSES), on the rows of `rows`."""
    if spec == "jpeg":
        inputs = {"poisoned": read_images(poison), "clean": read_images(clean)}
        quality = JpegOptions()
        return {
            w: jpeg(by_index(d, rows.index), quality).astype(np.float64) for w, d in inputs.items()
        }
    saved = {w: read_images(Path(spec) / f"p3-{w}-{passes}") for w in ("poisoned", "clean")}
    for which, data in saved.items():
        if not np.array_equal(data.index, rows.index):
            sys.exit(f"{spec}: its {which} P3 holds other rows than the --dvae folder's")
    return {w: d.images.astype(np.float64) for w, d in saved.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poison", required=True, help="a poisoned dataset (interchange format)")
    ap.add_argument("--clean", required=True, help="the clean dataset it was made from")
    ap.add_argument("--dvae", required=True, help="bench/p3_passes.py --save's folder")
    ap.add_argument(
        "--other", default="jpeg", help="the purifier to swap with: jpeg, or another such folder"
    )
    ap.add_argument("--passes", default="1", help="which of their P3s (p3-*-PASSES)")
    ap.add_argument("--validation", required=True, help="clean training rows outside them")
    ap.add_argument("--work", required=True, help="a new folder for the sets and classifiers")
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--label", default="", help="the result file's variant name")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work: {work} is not empty; give a new folder (each run writes its own sets)")
    rows = read_images(Path(args.dvae) / f"p3-clean-{args.passes}")
    out = {
        f"JPEG-{JpegOptions().quality}" if spec == "jpeg" else f"D-VAE ({Path(spec).name})": (
            outputs(spec, args.passes, args.poison, args.clean, rows)
        )
        for spec in (args.dvae, args.other)
    }
    results = []
    for base, residual in (tuple(out), tuple(reversed(out))):
        name = f"{base} base + {residual} residual"
        images = out[base]["clean"] + out[residual]["poisoned"] - out[residual]["clean"]
        train = work / re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
        write_images(ImageSet(images, rows.labels, rows.index, rows.classes), train)
        metrics = run_training(
            str(train),
            args.validation,
            str(train) + "-classifier",
            recipe_name=args.recipe,
            num_cpus=args.num_cpus,
        )
        results.append({"training set": name, "val_accuracy": metrics["accuracy"]})
    notes = (
        f"Poison {args.poison}, {len(rows)} rows; P3s p3-*-{args.passes}; recipe "
        f"{args.recipe}; validation {args.validation}."
    )
    tag = f"-{args.label}" if args.label else ""
    columns = ["training set", "val_accuracy"]
    write_results(f"residual_swap-{Path(args.poison).name}{tag}", results, columns, notes)


if __name__ == "__main__":
    main()
