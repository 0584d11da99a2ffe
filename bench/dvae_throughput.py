"""D-VAE throughput at 32 px: training steps, Ray Train stages, purification passes.

1. Train-step images/s in-process (no Ray): paper width (64) and the cpu preset's width,
   fp32 vs bf16 autocast, batch 128 and 256 (and the cpu preset's own batch).
2. Ray Train: one epoch of a stage over the 10k CIFAR-10 subset with 1 and 2 workers (bf16).
3. Purification inference through Ray Data, both passes (P0 -> P1, P1 -> P2 + P3), each
   split into start-up and steady state and set against the model's forward rate at the
   same batch (`--pass-variants` gives batch, actors, sampling), then all
   three per input image.
4. With --full: a preset end to end (`--full-preset`, default `cpu`; target for `cpu` on
   the 10k subset: <= 10 min).

Targets on 2 cores: paper-width training >= 130 images/s with bf16; inference >= 100 images/s.

    python bench/dvae_throughput.py [--full] [--parts steps,stage,passes] [--rows N]

Results: bench/results/dvae_throughput[-<label>][-<cpu kind or gpu>].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.data
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
from raypurify.defenses.dvae.passes import PassSpec, PurifyPass, run_pass  # noqa: E402
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


def pass_variants(text: str) -> list[tuple[int, int, bool]]:
    """`--pass-variants`: comma-separated batch:actors:sample (sample 1 draws z, 0 uses mu)."""
    variants = []
    for item in text.split(","):
        batch, actors, sample = item.split(":")
        variants.append((int(batch), int(actors), sample == "1"))
    return variants


def forward_rate(spec: PassSpec, batch: int, seconds: float = 2.0) -> float:
    """Images/s of the pass's own computation (`PurifyPass.compute`) on ready device
    tensors, in this process: the model's forward rate the Ray Data pass is measured
    against."""
    fn = PurifyPass(spec)
    dev = fn.dev
    x = torch.rand(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,), device=dev)
    index = np.arange(batch)
    for _ in range(2):
        fn.compute(x, y, index)
    calls, start = 0, synchronized(dev)
    while calls < 3 or time.perf_counter() - start < seconds:
        fn.compute(x, y, index)
        calls += 1
    return batch * calls / (synchronized(dev) - start)


def purification_rows(net: str, cfg, p0, tmp: Path, gpu: bool) -> list[dict]:
    """Both passes of a purification (P0 -> P1, P1 -> P2 + P3) through Ray Data, each
    split into start-up and steady state and set against the model's forward rate, then
    the two together per input image."""
    weights = tmp / f"w-{net}.pt"
    save_torch(weights, build(cfg, 10, 32).state_dict())
    tag = f"{net}-{cfg.infer_batch_size}-{cfg.infer_actors}-{int(cfg.sample)}"
    p1 = {"image": tmp / f"p1-{tag}"}
    passes = [
        ("subtract", p0, p1),
        ("subtract_reconstruct", None, {"image": tmp / f"p3-{tag}", "p2": tmp / f"p2-{tag}"}),
    ]
    rows, seconds = [], 0.0
    common = {
        "precision": cfg.precision,
        "batch": cfg.infer_batch_size,
        "workers": cfg.infer_actors,
        "sample": cfg.sample,
    }
    for mode, source, outputs in passes:
        source = source or open_dataset(p1["image"])
        t = run_pass(source, outputs, weights=weights, cfg=cfg, mode=mode, gpu=gpu, lineage=[])
        seconds += t["seconds"]
        spec = PassSpec(str(weights), cfg, 10, 32, mode)
        fwd = forward_rate(spec, cfg.infer_batch_size)
        steady = t["steady_images_per_s"]
        rows.append(
            common
            | {
                "what": f"pass {mode}, {net} net",
                "images_per_s": t["images_per_s"],
                "wall_s": t["seconds"],
                "startup_s": t["startup_s"],
                "steady_images_per_s": steady,
                "forward_images_per_s": fwd,
                "steady_vs_forward": steady / fwd if steady else None,
            }
        )
        print(rows[-1], flush=True)
    what = f"purification, 3 passes, {net} net"
    rows.append(common | {"what": what, "images_per_s": p0.rows / seconds, "wall_s": seconds})
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--full", action="store_true", help="also purify end to end (--full-preset)")
    ap.add_argument("--full-preset", default="cpu", help="the preset --full runs")
    ap.add_argument("--full-set", action="append", default=[], help="override it (--set)")
    ap.add_argument("--parts", default="steps,stage,passes", help="which parts to time")
    ap.add_argument("--rows", type=int, default=10_000, help="CIFAR-10 rows for Ray parts")
    ap.add_argument("--pass-nets", default="paper,cpu", help="presets whose passes to time")
    ap.add_argument(
        "--pass-variants",
        default="256:1:0",
        help="batch:actors:sample of each pass variant, comma-separated (sample 1: draw z)",
    )
    ap.add_argument("--label", help="a variant name for the result file (a partial run's)")
    ap.add_argument(
        "--no-reservation",
        action="store_true",
        help="switch off Ray Data's per-operator resource reservation (what it costs a pass)",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cpu = preset("cpu")
    rows: list[dict] = []
    nets = {  # each net at 128 and 256, and the cpu net also at its preset's own batch
        "paper": (64, 256, (128, 256)),
        "cpu": (cpu.model.width, cpu.model.latent, (cpu.stage1.batch_size, 128, 256)),
    }
    if "steps" in parts:
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
    if parts & {"stage", "passes"} or args.full:
        init_ray()
        if args.no_reservation:  # the datasets built after this take the context's copy
            ray.data.DataContext.get_current().op_resource_reservation_enabled = False
        rows += ray_parts(args, parts)
    write_results(
        f"dvae_throughput-{args.label}" if args.label else "dvae_throughput",
        rows,
        [
            "what",
            "precision",
            "batch",
            "workers",
            "sample",
            "images_per_s",
            "wall_s",
            "startup_s",
            "steady_images_per_s",
            "forward_images_per_s",
            "steady_vs_forward",
            "overhead_s",
            "psnr_p3",
        ],
        notes="Train steps: forward + Eq. 14 loss + backward + clip + Adam step on random "
        "32 px images. Passes: Ray Data (read, decode, purify, PNG-encode, write); start-up "
        "is until the first batch is done (actors, model load, first read), steady state "
        "the rate after it, forward the pass's own computation on ready device tensors in "
        "one process at the same batch. Purification: images/s per input image over all "
        "three passes; end to end, overhead is its wall minus training epochs and inference "
        "batches (start-up, hand-off, writes).",
    )


def ray_parts(args: argparse.Namespace, parts: set[str]) -> list[dict]:
    """The parts that run on Ray: a Train stage epoch, the passes, the whole pipeline."""
    rows: list[dict] = []
    gpu = device().type == "cuda"
    train = load(DatasetSpec(name="cifar10", subset=args.rows, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in worker_counts() if "stage" in parts else []:
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
        for net in args.pass_nets.split(",") if "passes" in parts else []:
            for batch, actors, sample in pass_variants(args.pass_variants):
                overrides = [f"infer_batch_size={batch}", f"infer_actors={actors}"]
                cfg = preset(net, [*overrides, f"sample={sample}"])
                rows += purification_rows(net, cfg, p0, tmp, gpu)

        if args.full:
            cfg = preset(args.full_preset, args.full_set)
            t0 = time.perf_counter()
            summary = purify(p0.path, tmp / "full", cfg)
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "what": f"{args.full_preset} preset end to end ({len(train)} rows"
                    f"{', ' + ' '.join(args.full_set) if args.full_set else ''})",
                    "precision": cfg.precision,
                    "batch": cfg.stage1.batch_size,
                    "workers": cfg.workers,
                    "images_per_s": len(train) / wall,
                    "wall_s": wall,
                    "overhead_s": summary["overhead_s"],
                    "psnr_p3": summary["stages"]["stage2"]["final"]["psnr_xhat"],
                }
            )
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
