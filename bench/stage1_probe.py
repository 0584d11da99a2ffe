"""Does D-VAE's stage 1 learn a sample-wise poison if it trains longer? (issue 17)

Trains a preset's stage 1 in process (`--preset`, default `cpu`: its model, batch, learning
rates, rate cap and p-hat hinge; `--set` overrides them like `raypurify purify`) on ROWS
poisoned training rows for EPOCHS epochs, and after each epoch in `--evals` forms
P1 = round(clip(x0 - p_hat(x0))) (z = mu, as the pipeline does) on those rows and on HELD
other poisoned rows. Against the clean originals it reports the share of the poison P1
keeps (1 = all of it, 0 = none), of its class-wise part (each image's class mean) and of
the rest, and P1's PSNR: the purification trace's measures (experiments/trace.py). The
x_hat response is the share of the poison in x_hat(poisoned) - x_hat(clean): what the rate
cap lets into the reconstruction, where Eq. 14 leaves it (p_hat can only take the rest). The
cosine schedule runs over all EPOCHS, so a 5-epoch evaluation is mid-schedule, not a
5-epoch stage. It trains in the preset's precision (`auto`: bf16 where that is faster,
runtime.use_bf16; RAYPURIFY_PRECISION=fp32 forces fp32) and measures in fp32.

    python bench/stage1_probe.py --poison STORE/poison/tap-*/data --clean STORE/data/clean-*/data

Results: bench/results/stage1_probe-<attack>[-<label>][-<cpu kind>].{json,md}, the label
being `--label` or the preset's name (none for `cpu`); train_s counts from the first epoch,
earlier evaluations included.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from in_process import (  # noqa: E402
    DEV,
    Probe,
    apply,
    as_input,
    probe_parser,
    reconstruct,
    subtract,
    to_uint8,
    train_stage,
)

from raypurify.experiments.trace import class_parts, psnr, share_kept  # noqa: E402
from raypurify.runtime import use_bf16  # noqa: E402


def p1_measures(model, poisoned: np.ndarray, clean: np.ndarray, labels: np.ndarray) -> dict:
    """P1 of `poisoned` by `model`, measured against `clean` (the trace's shares), and the
    share of the poison in the reconstruction's response to it, x_hat(poisoned) -
    x_hat(clean): what the rate cap lets through into x_hat, which p_hat then cannot take."""
    p1 = to_uint8(apply(model, as_input(poisoned), labels, subtract)).astype(np.float64)
    delta = poisoned.astype(np.float64) - clean
    class_wise, rest = class_parts(delta, labels)
    change = p1 - clean
    xhat = [
        apply(model, as_input(images), labels, reconstruct).permute(0, 2, 3, 1).double().numpy()
        * 255
        for images in (poisoned, clean)
    ]
    return {
        "kept": share_kept(change, delta),
        "class_part_kept": share_kept(change, class_wise),
        "rest_kept": share_kept(change, rest),
        "xhat_response": share_kept(xhat[0] - xhat[1], delta),
        "p1_db": psnr(clean, p1.astype(np.uint8)),
    }


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--evals", default="5,10,20,40", help="epochs after which to measure P1")
    args = ap.parse_args()
    probe = Probe.load(args)
    cfg, poisoned, originals, train, held = (
        probe.cfg,
        probe.poisoned,
        probe.originals,
        probe.train,
        probe.held,
    )
    stage = cfg.stage1
    evals = {int(e) for e in args.evals.split(",")}
    rows, start = [], time.perf_counter()

    def measure(epoch: int, model: torch.nn.Module) -> None:
        if epoch not in evals:
            return
        seconds = time.perf_counter() - start
        for name, r in (("training rows", train), ("held-out rows", held)):
            m = p1_measures(model, poisoned.images[r], originals[r], poisoned.labels[r])
            rows.append({"epoch": epoch, "rows": name, **m, "train_s": seconds})

    labels = poisoned.labels[train]
    train_stage(
        cfg, stage, poisoned.images[train], labels, poisoned.num_classes, args.epochs, measure
    )
    amp = use_bf16(cfg.precision, DEV)
    share = class_parts(poisoned.images[train].astype(np.float64) - originals[train], labels)
    notes = (
        f"Poison {args.poison}: class-wise share of its energy on the training rows "
        f"{float((share[0] ** 2).sum() / ((share[0] + share[1]) ** 2).sum()):.3f}. "
        f"Stage 1 of the {args.preset} preset (overrides: {args.set or 'none'}), "
        f"{args.rows} training rows, cosine over {args.epochs} epochs, in process, "
        f"{'bf16' if amp else 'fp32'}, on {DEV.type}."
    )
    columns = [
        "epoch",
        "rows",
        "kept",
        "class_part_kept",
        "rest_kept",
        "xhat_response",
        "p1_db",
        "train_s",
    ]
    attack = Path(args.poison).resolve().parent.name.rsplit("-", 1)[0]  # the store's step
    default = "" if args.preset == "cpu" else args.preset
    label = default if args.label is None else args.label
    tag = f"-{label}" if label else ""
    write_results(f"stage1_probe-{attack}{tag}", rows, columns, notes)


if __name__ == "__main__":
    main()
