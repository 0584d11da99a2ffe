"""The demo's wall time and where each step's time goes (issue: the first five minutes).

Runs `raypurify run demo` as a user would (a fresh local Ray, the real Ray Train and Ray
Data path, an empty store) and reports, from the step records:
- the whole wall, from the command to the table, and Ray's own start-up;
- when each warm worker group came up, from its opening at the run's start;
- per step: wall, work (training epochs, inference batches), start-up before the first
  epoch or batch, and the rest (start-up, data hand-off, checkpoints, teardown);
- per D-VAE inference pass: start-up and the steady-state rate after the first batch.

    python bench/demo.py                 # the demo preset, seed 0
    python bench/demo.py --seeds 0 1 2   # the story over three seeds (accuracies too)
    python bench/demo.py --compare       # with and without the warm worker groups
    python bench/demo.py --one-lane      # as before two lanes: one step at a time, all threads
    python bench/demo.py --isa avx2      # torch and oneDNN limited to AVX2 kernels, fp32

`--isa avx2` runs the code paths of an AVX2-only CPU (the AMD kind CI may draw) on this
one: what the instruction set alone costs, not that machine's time (its cores, clocks and
caches differ; an AVX2 machine runs the benchmark natively).

Results: bench/results/demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def one_lane() -> list[str]:
    """`--set` options that run the demo one step at a time, each step on all the threads
    (the preset without its `max_parallel` and `threads` settings)."""
    from raypurify.experiments import load_spec

    spec = load_spec("demo")
    sets = ["max_parallel=1"]
    for i, c in enumerate(spec.classifiers):
        kept = [o for o in c.overrides if not o.startswith("threads=")]
        sets.append(f"classifiers.{i}.overrides=[{', '.join(kept)}]")
    for i, d in enumerate(spec.defenses):
        if "overrides" in d.options:
            kept = [o for o in d.options["overrides"] if not o.startswith("threads=")]
            sets.append(f"defenses.{i}.options.overrides=[{', '.join(kept)}]")
    return sets


def run_demo(out: Path, seed: int, warm: bool, sets: list[str]) -> float:
    """Wall seconds of one `raypurify run demo` in a fresh process (and a fresh Ray)."""
    cmd = [sys.executable, "-m", "raypurify", "run", "demo", "--out", str(out)]
    for option in [f"seed={seed}", *sets]:
        cmd += ["--set", option]
    env = os.environ | {"RAYPURIFY_WARM_GROUP": "1" if warm else "0"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out.parent, env=env)
    return time.perf_counter() - t0


def step_rows(out: Path, seed: int, group: str) -> list[dict]:
    rows = []
    for record in sorted((out / "store").glob("*/*/step.json")):
        r = json.loads(record.read_text())
        result = r.get("result") or {}
        row = {"group": group, "seed": seed, "step": r["name"], "wall_s": r["seconds"]}
        if "work_s" in result and result["work_s"] is not None:
            row |= {"work_s": result["work_s"], "rest_s": r["seconds"] - result["work_s"]}
            row["rest_pct"] = 100 * row["rest_s"] / r["seconds"]
        if "startup_s" in result:
            row["startup_s"] = result["startup_s"]
        if "accuracy" in result:
            row["accuracy"] = 100 * result["accuracy"]
        rows.append(row)
        if r["kind"] == "purify":
            summary = json.loads((Path(result["purify_dir"]) / "summary.json").read_text())
            for name, p in summary["passes"].items():
                rows.append(
                    {
                        "group": group,
                        "seed": seed,
                        "step": f"  pass {name}",
                        "wall_s": p["seconds"],
                        "work_s": p.get("work_s"),
                        "startup_s": p.get("startup_s"),
                        "steady_img_s": p.get("steady_images_per_s"),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--compare", action="store_true", help="also without the warm groups")
    parser.add_argument(
        "--one-lane", action="store_true", help="one step at a time, each on all the threads"
    )
    parser.add_argument(
        "--isa", choices=["native", "avx2"], default="native", help="kernels to use (see above)"
    )
    args = parser.parse_args()
    name, notes = "demo", ""
    if args.isa == "avx2":  # inherited by the demo's process and its Ray workers
        os.environ |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        os.environ.setdefault("RAYPURIFY_PRECISION", "fp32")  # `auto` on an AVX2 CPU
        name = "demo-as-avx2"
        notes = "Kernels limited to AVX2: ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2."
    if args.one_lane:
        name += "-one-lane"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for warm in (True, False) if args.compare else (True,):
            group = "warm" if warm else "per step"
            for seed in args.seeds:
                out = Path(tmp) / f"demo-{group.replace(' ', '-')}-{seed}"
                out.mkdir()
                wall = run_demo(out, seed, warm, one_lane() if args.one_lane else [])
                results = json.loads((out / "results.json").read_text())
                first = {"group": group, "seed": seed}
                rows.append(first | {"step": "whole demo (command to table)", "wall_s": wall})
                rows.append(first | {"step": "  after Ray start", "wall_s": results["wall_s"]})
                for i, up in enumerate(results.get("warm_groups_start_s", [])):
                    rows.append(first | {"step": f"  warm group {i} up after", "wall_s": up})
                rows += step_rows(out, seed, group)
    columns = ["group", "seed", "step", "wall_s", "work_s", "startup_s", "rest_s", "rest_pct"]
    columns += ["steady_img_s", "accuracy"]
    write_results(name, rows, columns, notes)


if __name__ == "__main__":
    main()
