"""`raypurify sweep` and `raypurify spaces`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from raypurify.cli.common import common_options, gist, positive_int

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    common = common_options("budget.samples=4")
    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="sweep kld1, kld2 and lambda with Ray Tune + Optuna (a space name or a YAML)",
        description="Search a space (see `raypurify spaces`) with Optuna's TPE and ASHA early "
        "stopping; every trial purifies and trains through the step store. OUT receives "
        "trials.csv, best.json, results.md, plots, the Optuna study and the store. "
        "Rerunning the same command (or --resume) resumes a killed sweep.",
    )
    p.add_argument("space", help="a shipped space name or a YAML file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples", type=positive_int, help="trials to run (budget.samples)")
    p.add_argument("--concurrency", type=positive_int, help="trials at once (budget.concurrency)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="require OUT to hold this sweep already (rerunning without it resumes too)",
    )
    p.set_defaults(run=run)

    ls = sub.add_parser("spaces", help="list the shipped sweep spaces")
    ls.set_defaults(run=run_spaces)


def run(args: argparse.Namespace) -> int:
    from raypurify.errors import ConfigError
    from raypurify.sweeps.driver import STATE, run_sweep
    from raypurify.sweeps.space import load_space

    overrides = list(args.overrides)
    if args.samples is not None:
        overrides.append(f"budget.samples={args.samples}")
    if args.concurrency is not None:
        overrides.append(f"budget.concurrency={args.concurrency}")
    space = load_space(args.space, overrides)
    if args.resume and not (Path(args.out) / STATE).exists():
        raise ConfigError(f"--resume: {args.out} holds no sweep to resume ({STATE} missing)")
    summary = run_sweep(space, args.out, num_cpus=args.num_cpus)
    print((Path(args.out) / "results.md").read_text())
    print(f"results -> {args.out}/trials.csv, best.json, results.md, *.png")
    print(f"compare the trials in MLflow: raypurify ui --sweep {args.out}")
    if summary["interrupted"]:
        print(
            f"interrupted with {summary['interrupted']} trial(s) to run; resume with: "
            f"{resume_command(args)}",
            file=sys.stderr,
        )
        return 130
    return 0 if summary["done"] else 1


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this sweep: the same space and settings, with --resume (a
    sweep resumed with other settings is refused)."""
    words = ["raypurify", "sweep", args.space, "--out", args.out]
    for override in args.overrides:
        words += ["--set", override]
    for flag, value in (
        ("--samples", args.samples),
        ("--concurrency", args.concurrency),
        ("--num-cpus", args.num_cpus),
    ):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join([*words, "--resume"])


def run_spaces(args: argparse.Namespace) -> int:
    """Each shipped space's name and gist, read as typed YAML only: resolving its names
    against the registries imports torch and Ray (seconds), and `raypurify sweep` does
    that before it starts anything."""
    from raypurify import config
    from raypurify.errors import ConfigError
    from raypurify.sweeps.space import SPACE_DIR, SweepSpace, spaces

    if not spaces():
        raise ConfigError(f"no sweep spaces in {SPACE_DIR}: this install lacks tune_spaces/")
    for name, path in spaces().items():
        space = config.load(SweepSpace, path)
        print(f"{name:<20} {gist(space.description)}")
    return 0
