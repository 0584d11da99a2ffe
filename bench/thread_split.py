"""Two steps at once on one thread each, or one step at a time on every thread?

On a 2-core machine an experiment runs its steps one at a time, each training with both
cores' threads (runner.default_parallel). Small nets at demo scale may not use two threads
well: this measures the demo's two training steps (the classifier, fast-resnet width 16 at
batch 128, and the D-VAE, the `cpu` preset at width 16 at batch 32, fp32) as train-step
images/s of one process with all threads against the sum of as many processes with one
thread each, run at the same time. Each measurement is a fresh process; the pair is
measured ROUNDS times, alternating.

    python bench/thread_split.py [--rounds 3] [--steps 30]

Results: bench/results/thread_split[-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

# net -> (its row's label, its batch): the demo's classifier and D-VAE training steps
NETS = {
    "classifier": ("classifier: fast-resnet w16, batch 128", 128),
    "dvae": ("D-VAE: cpu preset w16, batch 32", 32),
}


def worker(net: str, threads: int, steps: int) -> None:
    """One process: `threads` torch threads, images/s of `steps` train steps, as JSON."""
    import torch

    torch.set_num_threads(threads)
    batch = NETS[net][1]
    if net == "classifier":
        from classifier import step_throughput as classifier_steps

        rate = classifier_steps("fast-resnet", {"width": 16}, "fp32", batch, steps)
    else:
        from dvae_throughput import step_throughput as dvae_steps

        rate = dvae_steps(16, "fp32", batch, steps, latent=64)
    print(json.dumps({"rate": rate}))


def launch(net: str, threads: int, steps: int, copies: int) -> list[float]:
    """`copies` worker processes started together; each one's images/s."""
    cmd = [sys.executable, __file__, "--worker", net, str(threads), str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)
    ]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode}): {' '.join(cmd)}")
        rates.append(json.loads(out.strip().splitlines()[-1])["rate"])
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--steps",
        type=int,
        default=30,
        help="timed steps of 128 images per process (the D-VAE: 4x32)",
    )
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        net, threads, steps = args.worker
        worker(net, int(threads), int(steps))
        return
    cores = os.cpu_count() or 1
    rows = []
    for net, (label, batch) in NETS.items():
        for r in range(args.rounds):
            steps = args.steps * 128 // batch  # the same images for each net
            whole = launch(net, cores, steps, 1)[0]
            split = launch(net, 1, steps, cores)
            rows.append(
                {
                    "net": label,
                    "round": r,
                    f"1 process x {cores} threads img/s": whole,
                    f"{cores} processes x 1 thread img/s (each)": " / ".join(
                        f"{x:.0f}" for x in split
                    ),
                    "their sum img/s": sum(split),
                    "sum / whole": sum(split) / whole,
                }
            )
    columns = list(rows[0])
    notes = (
        f"Train steps on random 32 px images, fp32, channels_last, {args.steps * 128} timed "
        f"images after 2 warm-up steps, each measurement a fresh process; {cores} cores."
    )
    write_results("thread_split", rows, columns, notes)


if __name__ == "__main__":
    main()
