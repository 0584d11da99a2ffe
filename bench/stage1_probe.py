"""Does D-VAE's stage 1 learn a sample-wise poison if it trains longer? (issue 17)

Trains a preset's stage 1 in process (`--preset`, default `cpu`: its model, batch, learning
rates, rate cap and p-hat hinge; `--set` overrides them like `raypurify purify`) on ROWS
poisoned training rows for EPOCHS epochs, and after each epoch in `--evals` forms
P1 = round(clip(x0 - p_hat(x0))) (z = mu, as the pipeline does) on those rows and on HELD
other poisoned rows. Against the clean originals it reports the share of the poison P1
keeps (1 = all of it, 0 = none), of its class-wise part (each image's class mean) and of
the rest, and P1's PSNR: the purification trace's measures (experiments/trace.py). The
cosine schedule runs over all EPOCHS, so a 5-epoch evaluation is mid-schedule, not a
5-epoch stage. It trains in the preset's precision (`auto`: bf16 where that is faster,
runtime.use_bf16; RAYPURIFY_PRECISION=fp32 forces fp32) and measures in fp32.

    python bench/stage1_probe.py --poison STORE/poison/tap-*/data --clean STORE/data/clean-*/data

Results: bench/results/stage1_probe-<attack>[-<label>][-<cpu kind>].{json,md}, the label
being `--label` or the preset's name (none for `cpu`); train_s counts from the first epoch,
earlier evaluations included.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from raypurify.data.interchange import read_images  # noqa: E402
from raypurify.defenses.dvae.config import preset  # noqa: E402
from raypurify.defenses.dvae.loss import stage_loss  # noqa: E402
from raypurify.defenses.dvae.stage import build  # noqa: E402
from raypurify.experiments.trace import class_parts, psnr, share_kept  # noqa: E402
from raypurify.runtime import autocast, device, use_bf16  # noqa: E402

DEV = device()  # the GPU when there is one


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], channels_last."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return x.contiguous(memory_format=torch.channels_last)


def p1_measures(model, poisoned: np.ndarray, clean: np.ndarray, labels: np.ndarray) -> dict:
    """P1 of `poisoned` by `model`, measured against `clean` (the trace's shares)."""
    model.eval()
    parts = []
    with torch.no_grad():
        for i in range(0, len(labels), 256):
            x = as_input(poisoned[i : i + 256]).to(DEV)
            mu, _ = model.encode(x)
            p_hat = model.perturbation(mu, torch.from_numpy(labels[i : i + 256]).to(DEV)).float()
            p1 = torch.round(torch.clamp(x - p_hat, 0, 1) * 255)
            parts.append(p1.permute(0, 2, 3, 1).cpu().numpy())
    model.train()
    p1 = np.concatenate(parts)
    delta = poisoned.astype(np.float64) - clean
    class_wise, rest = class_parts(delta, labels)
    change = p1 - clean
    return {
        "kept": share_kept(change, delta),
        "class_part_kept": share_kept(change, class_wise),
        "rest_kept": share_kept(change, rest),
        "p1_db": psnr(clean, p1.astype(np.uint8)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poison", required=True, help="a poisoned dataset (interchange format)")
    ap.add_argument("--clean", required=True, help="the clean dataset it was made from")
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--held", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--evals", default="5,10,20,40", help="epochs after which to measure P1")
    ap.add_argument("--preset", default="cpu", help="the purification preset to train")
    ap.add_argument("--set", action="append", default=[], help="override the preset")
    ap.add_argument(
        "--label", help="the result file's variant name (default: the preset; none for cpu)"
    )
    args = ap.parse_args()
    cfg = preset(args.preset, args.set)
    stage = cfg.stage1
    poisoned, clean = read_images(args.poison), read_images(args.clean)
    by_index = np.argsort(clean.index)
    originals = clean.images[by_index[np.searchsorted(clean.index[by_index], poisoned.index)]]
    order = np.random.default_rng(0).permutation(len(poisoned))
    train, held = order[: args.rows], order[args.rows : args.rows + args.held]
    x = as_input(poisoned.images[train]).to(DEV)
    y = torch.from_numpy(poisoned.labels[train]).to(DEV)

    amp = use_bf16(cfg.precision, DEV)  # as the pipeline's stage: `auto` decides
    torch.manual_seed(cfg.seed)
    model = build(cfg, poisoned.num_classes, x.shape[-1])
    model = model.to(DEV, memory_format=torch.channels_last)  # type: ignore[call-overload]
    groups = model.param_groups(stage.lr, stage.phat_lr_scale, stage.embedding_lr_scale)
    opt = torch.optim.Adam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    batch, evals = stage.batch_size, {int(e) for e in args.evals.split(",")}
    total = args.epochs * (len(train) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    rows, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train), device=DEV)
        for i in range(0, len(train) - batch + 1, batch):
            b = perm[i : i + batch]
            xb = x[b].contiguous(memory_format=torch.channels_last)
            with autocast(DEV, amp):
                x_hat, p_hat, mu, logvar = model(xb, y[b])
            loss, _ = stage_loss(stage, epoch, xb, x_hat, p_hat, mu, logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            opt.step()
            sched.step()
        if epoch + 1 in evals:
            seconds = time.perf_counter() - start
            for name, r in (("training rows", train), ("held-out rows", held)):
                m = p1_measures(model, poisoned.images[r], originals[r], poisoned.labels[r])
                rows.append({"epoch": epoch + 1, "rows": name, **m, "train_s": seconds})
    share = class_parts(
        poisoned.images[train].astype(np.float64) - originals[train], y.cpu().numpy()
    )
    notes = (
        f"Poison {args.poison}: class-wise share of its energy on the training rows "
        f"{float((share[0] ** 2).sum() / ((share[0] + share[1]) ** 2).sum()):.3f}. "
        f"Stage 1 of the {args.preset} preset (overrides: {args.set or 'none'}), "
        f"{args.rows} training rows, cosine over {args.epochs} epochs, in process, "
        f"{'bf16' if amp else 'fp32'}, on {DEV.type}."
    )
    columns = ["epoch", "rows", "kept", "class_part_kept", "rest_kept", "p1_db", "train_s"]
    attack = Path(args.poison).resolve().parent.name.rsplit("-", 1)[0]  # the store's step
    default = "" if args.preset == "cpu" else args.preset
    label = default if args.label is None else args.label
    tag = f"-{label}" if label else ""
    write_results(f"stage1_probe-{attack}{tag}", rows, columns, notes)


if __name__ == "__main__":
    main()
