"""How sharp a D-VAE's reconstruction gets for the CPU seconds it trains (demo scale).

A classifier trained on P3 = x_hat(P2) learns from reconstructions, so P3's sharpness
bounds what D-VAE can give back. This trains one stage in-process (no Ray) the way a
stage trains (Eq. 14 with the stage-2 rate cap, Adam with a cosine over the epochs,
gradient clipping, channels_last fp32) on CIFAR-10 rows and reports the PSNR of x_hat
(z = mu) on held-out rows after each epoch budget, with the training wall time.

    python bench/dvae_quality.py [--rows 2000] [--epochs 3 6 12]
    python bench/dvae_quality.py --scale cpu    # the cpu preset's net on 10k rows, 5 epochs

Needs the offline CIFAR-10 copy (RAYPURIFY_DATA_DIR). Results: bench/results/dvae_quality.*
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from raypurify.data.registry import load  # noqa: E402
from raypurify.data.spec import DatasetSpec  # noqa: E402
from raypurify.defenses.dvae.loss import dvae_loss, psnr  # noqa: E402
from raypurify.defenses.dvae.model import DVAE  # noqa: E402

# (label, width, latent, batch, lr, decoder norm): the earlier demo stage, the same net with
# a smaller batch and a doubled learning rate, with batch-norm decoders, and the demo's stage
# now (batch-norm decoders, the cpu preset's batches of 32).
# At --scale cpu: the cpu preset's stage (the CPU protocol's 10k rows) at its own learning
# rate, at twice it, and with batch-norm decoders.
CONFIGS = {
    "demo": [
        ("demo stage (w16, batch 64, lr 5e-3)", 16, 64, 64, 5e-3, "instance"),
        ("w16, batch 32, lr 1e-2", 16, 64, 32, 1e-2, "instance"),
        ("w16, batch 64, lr 5e-3, batch-norm decoders", 16, 64, 64, 5e-3, "batch"),
        ("w16, batch 32, lr 5e-3, batch-norm decoders", 16, 64, 32, 5e-3, "batch"),
    ],
    "cpu": [
        ("cpu stage (w32, batch 32, lr 5e-3)", 32, 64, 32, 5e-3, "instance"),
        ("w32, batch 32, lr 1e-2", 32, 64, 32, 1e-2, "instance"),
        ("w32, batch 32, lr 5e-3, batch-norm decoders", 32, 64, 32, 5e-3, "batch"),
    ],
}
DEFAULTS = {"demo": (2000, 500, [3, 6, 12]), "cpu": (10000, 1000, [5])}
KLD, KL_WEIGHT = 10.0, 0.01  # the cpu preset's stage 2


def train(x, y, held, width, latent, batch, lr, norm, epochs) -> tuple[float, float]:
    """(training seconds, held-out PSNR of x_hat) after `epochs` epochs from seed 0."""
    torch.manual_seed(0)
    model = DVAE(10, 32, width, latent, phat_zero_init=True, decoder_norm=norm)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            rows = order[i : i + batch]
            xb = x[rows].contiguous(memory_format=torch.channels_last)
            x_hat, p_hat, mu, logvar = model(xb, y[rows])
            loss, _ = dvae_loss(xb, x_hat, p_hat, mu, logvar, kld_limit=KLD, kl_weight=KL_WEIGHT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        mu, _ = model.encode(held.contiguous(memory_format=torch.channels_last))
        return seconds, float(psnr(model.reconstruct(mu), held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(CONFIGS), default="demo")
    ap.add_argument("--rows", type=int, help="training rows (demo: 2000, cpu: 10000)")
    ap.add_argument("--held", type=int, help="held-out rows (demo: 500, cpu: 1000)")
    ap.add_argument("--epochs", type=int, nargs="+", help="budgets (demo: 3 6 12, cpu: 5)")
    args = ap.parse_args()
    rows_default, held_default, epochs_default = DEFAULTS[args.scale]
    args.rows = args.rows or rows_default
    args.held = args.held or held_default
    args.epochs = args.epochs or epochs_default
    data = load(DatasetSpec(name="cifar10", subset=args.rows + args.held, seed=0))
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(data.labels)
    x, y, held = images[: args.rows], labels[: args.rows], images[args.rows :]
    rows = []
    for label, *net in CONFIGS[args.scale]:
        for epochs in args.epochs:
            seconds, quality = train(x, y, held, *net, epochs)
            rows.append(
                {
                    "stage": label,
                    "rows": args.rows,
                    "epochs": epochs,
                    "train_s": round(seconds, 1),
                    "psnr_x_hat_db": round(quality, 2),
                }
            )
            print(rows[-1], flush=True)
    write_results(
        "dvae_quality" if args.scale == "demo" else f"dvae_quality-{args.scale}",
        rows,
        ["stage", "rows", "epochs", "train_s", "psnr_x_hat_db"],
        "PSNR of x_hat (z = mu) against the held-out rows, stage-2 rate cap (kld 10); "
        "torch threads: all cores.",
    )


if __name__ == "__main__":
    main()
