"""Which part of a finished purification's P3 carries the shortcut a classifier learns?

The purification trace's "kept" is a linear share of the poison, and a classifier can learn
a shortcut from a part of P3 that this share hardly weighs (docs/RESULTS.md, "Which part of
the EM sample-wise P3 the classifier learns"). This probe takes a purification the pipeline
made (its folder: stage1.pt, stage2.pt, config.json and p3/), the poison it purified and the
clean originals. It runs the same two stages on the clean originals as the pipeline's passes
do (P1 = round(x - p_hat1(x)), x2 = x1 - p_hat2(x1) in float, P3 = round(x_hat(x2)), z =
mu), so that r = P3 - P3(clean) is what the poison changed in the output, and writes
training sets that each keep one part of the pipeline's P3:

- p3: P3 itself;
- p3-minus-classwise: P3 without the class means of P3 - clean (its class-wise part: one
  pattern per class, which includes what the stage-1 subtraction of the class-conditional
  p_hat writes into every image of a class); clean+classwise: the clean originals with only
  that part;
- p3-clean: the purifier's output on the clean originals (its blur, no poison);
- p3-clean+residual-low, -high: P3(clean) plus r's spatial frequencies below or from --cut
  cycles per image (plus the whole of r is P3 itself); -half: plus r / 2;
- with `--refit-stage2 SEED`, p3-refit: P3 from another stage 2, trained in process as the
  pipeline trains it but from seed SEED, on the purification's stored P1; p3-average: the
  mean of the two stage-2 models' reconstructions (whether the shortcut lies in what one
  trained model passes or in what any stage 2 passes);

and `validation/`: --val-rows class-balanced clean training rows outside the run's rows
(from --validation, e.g. the whole training set: `raypurify datasets export cifar10`).
`--train` trains the classifier (Ray Train, --recipe, --seed) on the named sets and reports
its accuracy on the validation rows; the test set is never read. It also reports, for each
part, its size (rms in 1/255) and that of its class-wise part, and per band of spatial
frequency the poison's and r's energy and the share of the poison's band that r passes.

    python bench/p3_parts.py --purify STORE/purify/em-sample_d-vae-*/purify \\
        --poison STORE/poison/em-sample-*/data --clean clean10k --validation train50k \\
        --out parts --train p3,p3-minus-classwise,p3-clean --seed 2 --label ems-seed2

Results: bench/results/p3_parts[-<label>][-<cpu kind>].{json,md} and, with --train,
p3_parts[-<label>]-classifier[-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import in_process as ip  # noqa: E402
from common import write_results  # noqa: E402
from p3_passes import BANDS  # noqa: E402

from raypurify.data.imageset import ImageSet  # noqa: E402
from raypurify.data.interchange import read_images, write_images  # noqa: E402
from raypurify.defenses.dvae.config import PurifyConfig  # noqa: E402
from raypurify.defenses.dvae.model import DVAE  # noqa: E402
from raypurify.defenses.dvae.stage import build  # noqa: E402
from raypurify.experiments.trace import (  # noqa: E402
    class_parts,
    frequency_parts,
    radial_frequency,
    share_kept,
)
from raypurify.training.run import run_training  # noqa: E402


def load_stages(folder: Path, num_classes: int, size: int) -> tuple[PurifyConfig, list[DVAE]]:
    """The purification's config and its two trained stage models (weights_only)."""
    cfg = PurifyConfig.model_validate(json.loads((folder / "config.json").read_text()))
    models = []
    for name in ("stage1.pt", "stage2.pt"):
        model = build(cfg, num_classes, size)
        model.load_state_dict(torch.load(folder / name, map_location="cpu", weights_only=True))
        models.append(model.to(ip.DEV).eval())
    return cfg, models


def stage2_output(stage2: DVAE, x1: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """x_hat(x2), x2 = x1 - p_hat2(x1) kept in float: P3 before rounding."""
    x2 = ip.apply(stage2, x1, labels, ip.subtract)
    return ip.apply(stage2, x2, labels, ip.reconstruct)


def purify(stages: list[DVAE], images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """P3 of `images` as the pipeline forms it (P1 stored as uint8, x2 kept in float)."""
    stage1, stage2 = stages
    x1 = ip.as_input(ip.to_uint8(ip.apply(stage1, ip.as_input(images), labels, ip.subtract)))
    return ip.to_uint8(stage2_output(stage2, x1, labels))


def refit_stage2(
    cfg: PurifyConfig, seed: int, folder: Path, stages: list[DVAE], poisoned: ImageSet
) -> tuple[np.ndarray, np.ndarray]:
    """(P3 of a stage 2 trained anew from `seed` on the stored P1, the mean of its and the
    purification's own stage 2's reconstructions), both rounded, in the rows of `poisoned`."""
    p1 = ip.by_index(read_images(folder / "p1"), poisoned.index)
    labels, x1 = poisoned.labels, ip.as_input(p1)
    cfg = PurifyConfig.model_validate({**cfg.to_dict(), "seed": seed})
    refit = ip.train_stage(cfg, cfg.stage2, p1, labels, poisoned.num_classes)
    own, other = (stage2_output(stage2, x1, labels) for stage2 in (refit, stages[1]))
    return ip.to_uint8(own), ip.to_uint8((own + other) / 2)


SETS = (
    "p3",
    "p3-minus-classwise",
    "clean+classwise",
    "p3-clean",
    "p3-clean+residual-low",
    "p3-clean+residual-high",
    "p3-clean+residual-half",
)
REFIT_SETS = ("p3-refit", "p3-average")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)))


def band_rows(delta: np.ndarray, residual: np.ndarray) -> list[dict]:
    """Per band: the poison's and the residual's share of their energy, and the share of
    the poison's band that the residual passes (<F(r), F(delta)> / <F(delta), F(delta)>)."""
    radius = radial_frequency(*delta.shape[1:3])
    fd, fr = (np.fft.fft2(x, axes=(1, 2)) for x in (delta, residual))
    total_d, total_r = np.sum(np.abs(fd) ** 2), np.sum(np.abs(fr) ** 2)
    rows = []
    for lo, hi in BANDS:
        band = (radius >= lo) & (radius < hi)
        energy_d = np.sum(np.abs(fd) ** 2 * band)
        rows.append(
            {
                "part": f"band {lo}-{min(hi, delta.shape[1] // 2)} cycles",
                "poison_share": float(energy_d / total_d),
                "residual_share": float(np.sum(np.abs(fr) ** 2 * band) / total_r),
                "response": float(np.sum((fr * fd.conj()).real * band) / energy_d),
            }
        )
    return rows


def write_parts(args: argparse.Namespace, out: Path) -> None:
    """Write the sets and the validation rows to `out`, and the parts' measures to
    bench/results."""
    folder = Path(args.purify)
    poisoned = read_images(args.poison)
    stored = read_images(folder / "p3")
    clean = ip.by_index(read_images(args.clean), poisoned.index).astype(np.float64)
    labels = poisoned.labels
    p3 = ip.by_index(stored, poisoned.index).astype(np.float64)
    cfg, stages = load_stages(folder, poisoned.num_classes, poisoned.shape[0])
    torch.manual_seed(cfg.seed)
    p3_clean = purify(stages, clean.astype(np.uint8), labels).astype(np.float64)

    delta, residual = poisoned.images - clean, p3 - p3_clean
    classwise, _ = class_parts(p3 - clean, labels)
    low, high = frequency_parts(residual, args.cut)
    sets = {
        "p3": p3,
        "p3-minus-classwise": p3 - classwise,
        "clean+classwise": clean + classwise,
        "p3-clean": p3_clean,
        "p3-clean+residual-low": p3_clean + low,
        "p3-clean+residual-high": p3_clean + high,
        "p3-clean+residual-half": p3_clean + residual / 2,
    }
    if args.refit_stage2 is not None:
        refit, average = refit_stage2(cfg, args.refit_stage2, folder, stages, poisoned)
        sets |= {"p3-refit": refit.astype(np.float64), "p3-average": average.astype(np.float64)}
    for name, images in sets.items():
        pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
        write_images(poisoned.replace(pixels, poisoned=None), out / name)
    pool = read_images(args.validation)
    outside = pool.take(np.flatnonzero(~np.isin(pool.index, poisoned.index)))
    write_images(outside.balanced_subset(args.val_rows, seed=0), out / "validation")

    parts = {
        "the poison (P0 - clean)": delta,
        "P3 - clean": p3 - clean,
        "P3(clean) - clean (the purifier alone)": p3_clean - clean,
        "r = P3 - P3(clean) (the poison's effect)": residual,
    }
    if args.refit_stage2 is not None:
        parts["P3 of the refit stage 2 - clean"] = sets["p3-refit"] - clean
        parts["their average - clean"] = sets["p3-average"] - clean
    rows = [
        {
            "part": name,
            "rms": rms(x),
            "classwise_rms": rms(class_parts(x, labels)[0]),
            "poison_kept": share_kept(x, delta),
        }
        for name, x in parts.items()
    ]
    redo = np.abs(purify(stages, poisoned.images, labels).astype(np.float64) - p3)
    tag = f"-{args.label}" if args.label else ""
    notes = (
        f"Purification {folder} of {args.poison}, {len(labels)} rows; rms in 1/255, poison_kept "
        "<part, poison> / <poison, poison>. The stages rerun on the "
        f"poisoned rows reproduce the stored P3 to within {redo.max():.0f}/255 "
        f"({np.mean(redo > 0):.3f} of values differ)."
    )
    columns = ["part", "rms", "classwise_rms", "poison_kept"]
    columns += ["poison_share", "residual_share", "response"]
    write_results(f"p3_parts{tag}", rows + band_rows(delta, residual), columns, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--purify", required=True, help="a D-VAE purification's output folder")
    ap.add_argument("--poison", required=True, help="the poisoned set it purified")
    ap.add_argument("--clean", required=True, help="the clean set the poison was made from")
    ap.add_argument(
        "--validation", required=True, help="clean training rows to validate on (outside the run's)"
    )
    ap.add_argument("--val-rows", type=int, default=2000)
    ap.add_argument("--out", required=True, help="a new folder for the sets and classifiers")
    ap.add_argument(
        "--refit-stage2", type=int, help="also train another stage 2 from this seed (p3-refit)"
    )
    ap.add_argument("--cut", type=float, default=8, help="cycles per image, for -low/-high")
    ap.add_argument("--train", default="", help="sets to train the classifier on (comma-separated)")
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="the classifier's seed")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--label", default="", help="the result files' variant name")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"--out: {out} is not empty; give a new folder")
    known = SETS + (REFIT_SETS if args.refit_stage2 is not None else ())
    unknown = sorted(set(filter(None, args.train.split(","))) - set(known))
    if unknown:
        sys.exit(f"--train: unknown set {unknown[0]!r} (known: {', '.join(known)})")
    write_parts(args, out)  # its arrays (gigabytes at 10,000 rows) are freed before training

    trained = []
    for name in filter(None, args.train.split(",")):
        metrics = run_training(
            str(out / name),
            str(out / "validation"),
            str(out / f"classifier-{name}"),
            recipe_name=args.recipe,
            overrides=[f"seed={args.seed}"],
            num_cpus=args.num_cpus,
        )
        last = metrics["history"][-1]
        trained.append(
            {
                "set": name,
                "val_accuracy": metrics["accuracy"],
                "train_accuracy": last["train_acc"],
                "wall_s": metrics["wall_s"],
            }
        )
    if trained:
        notes = (
            f"Classifier (recipe {args.recipe}, seed {args.seed}) on each set of {out}, "
            f"validated on {args.val_rows} clean training rows outside the run's rows."
        )
        columns = ["set", "val_accuracy", "train_accuracy", "wall_s"]
        tag = f"-{args.label}" if args.label else ""
        write_results(f"p3_parts{tag}-classifier", trained, columns, notes)


if __name__ == "__main__":
    main()
