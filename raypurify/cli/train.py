"""`raypurify train`: train and evaluate a classifier, optionally behind a defence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raypurify.cli.common import common_options

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        parents=[common_options("epochs=5")],
        help="train a classifier and report its clean test accuracy",
        description="Train a classifier on --data (optionally defended) and evaluate it on "
        "--test. Writes OUT/metrics.json beside the checkpoints; rerunning with the same "
        "inputs and settings resumes, another run in OUT is refused.",
    )
    p.add_argument("--data", required=True, help="training set: dataset directory or name")
    p.add_argument("--test", required=True, help="clean test set: dataset name or directory")
    p.add_argument("--out", required=True, help="output directory (names the run)")
    p.add_argument("--arch", default=None, help="architecture (default: the recipe's)")
    p.add_argument("--recipe", default="paper", help="training recipe: paper or cpu")
    p.add_argument("--defense", default="none", help="defence to apply (default: none)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in OUT made from other inputs or settings (only ever a raypurify "
        "output, never the input)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from raypurify.training.run import run_training

    metrics = run_training(
        args.data,
        args.test,
        args.out,
        recipe_name=args.recipe,
        arch=args.arch,
        defense=args.defense,
        overrides=args.overrides,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
    )
    print(
        f"accuracy {metrics['accuracy']:.2%} after {metrics['epochs']} "
        f"epoch{'s' * (metrics['epochs'] != 1)} "
        f"({metrics['wall_s']:.0f} s) -> {args.out}/metrics.json"
    )
    return 0
