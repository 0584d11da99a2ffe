"""A sweep's wall time and where its trials' time goes, with and without warm groups.

Runs `raypurify sweep SPACE` as a user would (a fresh local Ray and store each time),
alternating `RAYPURIFY_WARM_GROUP=1` (each trial's D-VAE stages and classifier run as jobs
of one warm worker group the trial opens) and `=0` (each fit starts its own Ray Train
run), and reports, per sweep: the wall from the command to the results; per trial: its
status and wall; per step: wall, work (training epochs, inference batches), start-up
and the rest, from the step records.

    python bench/sweep.py                      # the demo space, two rounds of on/off
    python bench/sweep.py --space cpu --rounds 1
    python bench/sweep.py --against ../old --name "per-trial groups"   # this tree's sweep
        # against another source tree's (a worktree of an earlier commit), both warm

`--against TREE` compares two versions of the code side by side on one machine: each
round runs this tree's sweep, then TREE's (imported through PYTHONPATH), both with warm
groups.

Results: bench/results/sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from demo import step_rows  # noqa: E402


def run_sweep(space: str, out: Path, warm: bool, tree: str | None = None) -> float:
    """Wall seconds of one `raypurify sweep` in a fresh process (and a fresh Ray), of the
    code in source tree `tree` if given (its raypurify first on the path)."""
    cmd = [sys.executable, "-m", "raypurify", "sweep", space, "--out", str(out)]
    env = os.environ | {"RAYPURIFY_WARM_GROUP": "1" if warm else "0"}
    if tree is not None:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out.parent, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="demo")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, on then off")
    parser.add_argument("--against", help="another source tree, run instead of groups off")
    parser.add_argument("--name", default="against", help="its label in the results")
    args = parser.parse_args()
    if args.against:
        variants = [("this tree", True, None), (args.name, True, args.against)]
    else:
        variants = [("warm groups", True, None), ("run per fit", False, None)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for i, (group, warm, tree) in enumerate(variants):
                out = Path(tmp) / f"sweep-{n}-{i}"
                out.mkdir()
                wall = run_sweep(args.space, out, warm, tree)
                first = {"group": group, "seed": n}
                rows.append(first | {"step": "whole sweep (command to results)", "wall_s": wall})
                with (out / "trials.csv").open() as f:
                    for trial in csv.DictReader(f):
                        what = f"{trial['status']}, {trial['epoch']} epochs"
                        step = f"  trial {trial['trial_id']} ({what})"
                        wall_s, val = float(trial["wall_s"]), trial["val_accuracy"]
                        val = float(val) if val else None  # a failed trial has none
                        rows.append(first | {"step": step, "wall_s": wall_s, "accuracy": val})
                rows += step_rows(out, n, group)
    columns = ["group", "seed", "step", "wall_s", "work_s", "startup_s", "rest_s", "rest_pct"]
    columns += ["steady_img_s", "accuracy"]
    order = ", then ".join(v[0] for v in variants)
    notes = (
        f"Space `{args.space}`; `seed` is the round (each round: {order}). A "
        "trial's accuracy is the validation accuracy it ended with (where ASHA stopped it)."
    )
    name = f"sweep-{args.space}" + ("-against" if args.against else "")
    write_results(name, rows, columns, notes)


if __name__ == "__main__":
    main()
