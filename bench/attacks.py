"""Attack benchmark on the CPU protocol: generation time on 2 cores, and the clean test
accuracy of the protocol's classifier trained on each poisoned 10k set (goal: <= 30 %).

It runs the `cifar10-mini` preset restricted to the undefended column, through the same
experiment runner and step store, so pointing the full table at the same --out reuses
every poison and every undefended cell measured here.

    python bench/attacks.py [--out bench/results/cifar10-mini] [--set ...]

Results: bench/results/attacks.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from raypurify.experiments import load_spec  # noqa: E402
from raypurify.experiments.runner import run_experiment  # noqa: E402
from raypurify.reports.experiment import load_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "cifar10-mini"), help="experiment output")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    spec = load_spec("cifar10-mini", [*args.overrides, "clean_row=false"])
    spec.defenses = [d for d in spec.defenses if d.name == "none"]
    spec.analyses = []
    results = run_experiment(spec, args.out)
    _, records = load_run(Path(args.out))
    seconds = {r["meta"]["row"]: r["seconds"] for r in records if r["kind"] == "poison"}
    rows = []
    for a in spec.attacks:
        cell = next(c for c in results["cells"] if c["row"] == a.row)
        budget = results["budgets"][a.row]
        rows.append(
            {
                "attack": a.row,
                "options": ", ".join(f"{k}={v}" for k, v in a.options.items()) or "-",
                "generation_s": seconds.get(a.row, 0.0),
                "linf_255": budget["linf_255"],
                "l2_max": budget["l2_max"],
                "l0_max": budget["l0_max"],
                "accuracy": cell["accuracy"],
                "goal_met": cell["accuracy"] <= 0.30,
            }
        )
    write_results(
        "attacks",
        rows,
        [
            "attack",
            "options",
            "generation_s",
            "linf_255",
            "l2_max",
            "l0_max",
            "accuracy",
            "goal_met",
        ],
        notes="CPU protocol (cifar10-mini): 10k CIFAR-10 train images (seed 0), all 10k clean "
        "test images, classifier recipe `cpu`. generation_s is the poison step's wall time "
        "(a cached step keeps the time of the run that made it). Budgets are measured on the "
        "uint8 images.",
    )


if __name__ == "__main__":
    main()
