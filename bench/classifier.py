"""Classifier benchmark: the CPU protocol's classifier on the clean 10k CIFAR-10 subset.

1. Train-step throughput in-process (no Ray): the CPU recipe's net and the CIFAR ResNet-18,
   fp32 vs bf16 autocast, channels_last.
2. Ray Train throughput: one epoch of the CPU recipe with 1 and 2 workers, fp32 and bf16.
3. The full CPU recipe: wall time and last-epoch top-1 accuracy on all 10,000 clean test
   images (target: >= 75 % in <= 5 minutes on 2 cores).

    python bench/classifier.py            # everything (about 15 minutes on 2 cores)
    python bench/classifier.py --skip-full

Results: bench/results/classifier.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synchronized, worker_counts, write_results  # noqa: E402

from raypurify.data.registry import load  # noqa: E402
from raypurify.data.spec import DatasetSpec  # noqa: E402
from raypurify.models import build_model  # noqa: E402
from raypurify.runtime import autocast, device, init_ray  # noqa: E402
from raypurify.training.classifier import train_classifier  # noqa: E402
from raypurify.training.config import recipe  # noqa: E402


def step_throughput(arch: str, options: dict, precision: str, batch: int, steps: int) -> float:
    """Images/s of SGD train steps on random data, after two warm-up steps."""
    torch.manual_seed(0)
    dev = device()
    model = build_model(arch, 10, 32, **options).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    for i in range(steps + 2):
        if i == 2:
            start = synchronized(dev)
        with autocast(dev, precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (synchronized(dev) - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-full", action="store_true", help="skip the full recipe run")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per micro-benchmark")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    cpu = recipe("cpu")
    for arch, options, batch in [
        ("fast-resnet", cpu.arch_options, cpu.batch_size),
        ("resnet18", {}, 128),
    ]:
        for precision in ("fp32", "bf16"):
            ips = step_throughput(arch, options, precision, batch, args.steps)
            rows.append(
                {
                    "what": f"train step {arch}",
                    "precision": precision,
                    "workers": "-",
                    "images_per_s": ips,
                }
            )
            print(rows[-1], flush=True)

    init_ray()
    train = load(DatasetSpec(name="cifar10", subset=10_000, seed=0))
    test = load(DatasetSpec(name="cifar10", split="test"))
    with tempfile.TemporaryDirectory() as tmp:
        for workers in worker_counts():
            for precision in ("fp32", "bf16"):
                cfg = recipe(
                    "cpu",
                    ["epochs=1", f"workers={workers}", f"precision={precision}", "eval_subset=500"],
                )
                m = train_classifier(
                    train, test.take(slice(0, 500)), cfg, Path(tmp) / f"w{workers}-{precision}"
                )
                rows.append(
                    {
                        "what": "Ray Train epoch (10k)",
                        "precision": precision,
                        "workers": workers,
                        "images_per_s": m["images_per_s"],
                        "wall_s": m["wall_s"],
                    }
                )
                print(rows[-1], flush=True)
        if not args.skip_full:
            cfg = recipe("cpu")
            start = time.perf_counter()
            m = train_classifier(train, test, cfg, Path(tmp) / "full")
            rows.append(
                {
                    "what": f"cpu recipe, {cfg.epochs} epochs",
                    "precision": cfg.precision,
                    "workers": cfg.workers,
                    "images_per_s": m["images_per_s"],
                    "wall_s": time.perf_counter() - start,
                    "train_s": m["train_s"],
                    "accuracy": m["accuracy"],
                }
            )
    write_results(
        "classifier",
        rows,
        ["what", "precision", "workers", "images_per_s", "wall_s", "train_s", "accuracy"],
        notes="Accuracy: last epoch, all 10,000 clean CIFAR-10 test images; train set: the "
        "class-balanced 10k subset (seed 0) of the offline copy. wall_s includes Ray Train "
        "start-up and evaluation.",
    )


if __name__ == "__main__":
    main()
