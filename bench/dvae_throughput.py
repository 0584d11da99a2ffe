"""D-VAE throughput at 32 px: training steps, Ray Train stages, purification passes.

1. Train-step images/s in-process (no Ray): paper width (64) and the cpu preset's width,
   fp32 vs bf16 autocast, batch 128 and 256 (and the cpu preset's own batch).
2. Ray Train: one epoch of a stage over the 10k CIFAR-10 subset with 1 and 2 workers (bf16).
3. Purification inference through Ray Data, all three passes (P0 -> P1, P1 -> P2 + P3),
   counted per input image.
4. With --full: the `cpu` preset end to end on the clean 10k subset (target: <= 10 min).

Targets on 2 cores: paper-width training >= 130 images/s with bf16; inference >= 100 images/s.

    python bench/dvae_throughput.py [--full]

Results: bench/results/dvae_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synchronized, worker_counts, write_results  # noqa: E402

from raypurify.atomic import save_torch  # noqa: E402
from raypurify.data.interchange import open_dataset, write_images  # noqa: E402
from raypurify.data.registry import load  # noqa: E402
from raypurify.data.spec import DatasetSpec  # noqa: E402
from raypurify.defenses.dvae.config import preset  # noqa: E402
from raypurify.defenses.dvae.loss import dvae_loss  # noqa: E402
from raypurify.defenses.dvae.model import DVAE  # noqa: E402
from raypurify.defenses.dvae.passes import run_pass  # noqa: E402
from raypurify.defenses.dvae.pipeline import purify  # noqa: E402
from raypurify.defenses.dvae.stage import build, train_stage  # noqa: E402
from raypurify.runtime import autocast, device, init_ray  # noqa: E402


def step_throughput(width: int, precision: str, batch: int, steps: int, latent: int = 256) -> float:
    torch.manual_seed(0)
    dev = device()
    model = DVAE(10, 32, width=width, latent=latent).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x = torch.rand(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    for i in range(steps + 2):
        if i == 2:
            start = synchronized(dev)
        with autocast(dev, precision == "bf16"):
            out = model(x, y)
        x_hat, p_hat, mu, logvar = (t.float() for t in out)
        loss, _ = dvae_loss(
            x, x_hat, p_hat, mu, logvar, kld_limit=1.0, kl_weight=0.01, phat_weight=1.0
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return batch * steps / (synchronized(dev) - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--full", action="store_true", help="also run the cpu preset end to end")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cpu = preset("cpu")
    rows = []
    nets = {  # each net at 128 and 256, and the cpu net also at its preset's own batch
        "paper": (64, 256, (128, 256)),
        "cpu": (cpu.model.width, cpu.model.latent, (cpu.stage1.batch_size, 128, 256)),
    }
    for name, (width, latent, batches) in nets.items():
        for precision in ("fp32", "bf16"):
            for batch in batches:
                ips = step_throughput(width, precision, batch, args.steps, latent)
                rows.append(
                    {
                        "what": f"train step, {name} net (width {width}, latent {latent})",
                        "precision": precision,
                        "batch": batch,
                        "workers": "-",
                        "images_per_s": ips,
                    }
                )
                print(rows[-1], flush=True)

    init_ray()
    gpu = device().type == "cuda"
    train = load(DatasetSpec(name="cifar10", subset=10_000, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in worker_counts():
            cfg = preset("cpu", [f"workers={workers}", "stage1.epochs=1"])
            t0 = time.perf_counter()
            state, _ = train_stage("stage1", train, cfg, cfg.stage1, tmp / f"ckpt{workers}")
            rows.append(
                {
                    "what": "Ray Train stage epoch, cpu net",
                    "precision": cfg.precision,
                    "batch": cfg.stage1.batch_size,
                    "workers": workers,
                    "images_per_s": state["history"][-1]["images_per_s"],
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(rows[-1], flush=True)

        p0 = write_images(train, tmp / "p0")
        for name, (width, latent) in nets.items():
            cfg = preset("cpu", [f"model.width={width}", f"model.latent={latent}"])
            weights = tmp / f"w{width}.pt"
            save_torch(weights, build(cfg, 10, 32).state_dict())
            seconds = 0.0
            p1 = {"image": tmp / f"p1-{width}"}
            t = run_pass(p0, p1, weights=weights, cfg=cfg, mode="subtract", gpu=gpu, lineage=[])
            seconds += t["seconds"]
            outs = {"image": tmp / f"p3-{width}", "p2": tmp / f"p2-{width}"}
            t = run_pass(
                open_dataset(p1["image"]),
                outs,
                weights=weights,
                cfg=cfg,
                mode="subtract_reconstruct",
                gpu=gpu,
                lineage=[],
            )
            seconds += t["seconds"]
            rows.append(
                {
                    "what": f"purification, 3 passes, {name} net",
                    "precision": cfg.precision,
                    "batch": cfg.infer_batch_size,
                    "workers": cfg.infer_actors,
                    "images_per_s": len(train) / seconds,
                    "wall_s": seconds,
                }
            )
            print(rows[-1], flush=True)

        if args.full:
            cfg = preset("cpu")
            t0 = time.perf_counter()
            summary = purify(p0.path, tmp / "full", cfg)
            rows.append(
                {
                    "what": "cpu preset end to end (10k)",
                    "precision": cfg.precision,
                    "batch": cfg.stage1.batch_size,
                    "workers": cfg.workers,
                    "images_per_s": len(train) / (time.perf_counter() - t0),
                    "wall_s": time.perf_counter() - t0,
                    "psnr_p3": summary["stages"]["stage2"]["final"]["psnr_xhat"],
                }
            )
    write_results(
        "dvae_throughput",
        rows,
        ["what", "precision", "batch", "workers", "images_per_s", "wall_s", "psnr_p3"],
        notes="Train steps: forward + Eq. 14 loss + backward + clip + Adam step on random "
        "32 px images. Inference: images/s per input image over all three passes, through "
        "Ray Data (read, decode, purify, PNG-encode, write) with one actor.",
    )


if __name__ == "__main__":
    main()
