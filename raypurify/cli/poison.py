"""`raypurify poison`: poison a dataset with a registered attack, or import a released poison.

    raypurify poison --attack NAME --data DATASET_OR_DIR --out DIR [--ratio R] [--seed S]
    raypurify poison import --format FORMAT --from PATH --base DATASET_OR_DIR --out DIR

Both write the interchange format; the manifest records the attack, its config, the measured
budget and the base dataset (its spec, and its lineage as the parent). Each run is an MLflow
run in the experiment "poison" with the config, the budget and an image grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypurify.cli.common import common_options, split_of
from raypurify.errors import ConfigError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from raypurify.data.imageset import ImageSet
    from raypurify.data.spec import DatasetSpec
    from raypurify.tracking import Run

EXPERIMENT = "poison"


def register(sub: argparse._SubParsersAction) -> None:
    common = common_options("seed=1")
    p = sub.add_parser(
        "poison",
        parents=[common],
        help="poison a dataset with an attack, or import a released poison",
        description="Poison a class-balanced fraction of --data with --attack (an unknown name "
        "lists the attacks; attack settings via --set, e.g. --set eps=0.5), or import a "
        "released poison with `raypurify poison import`.",
    )
    p.add_argument("--attack", help="attack name, e.g. ops, lsp, ar (a wrong one lists all)")
    p.add_argument("--data", help="clean dataset: a registered name or a dataset directory")
    p.add_argument("--ratio", type=float, default=None, help="fraction of each class to poison")
    p.add_argument("--seed", type=int, default=None, help="attack seed (rows and noise)")
    dataset_options(p)
    p.set_defaults(run=run_attack)

    actions = p.add_subparsers(dest="action", metavar="[import]")
    imp = actions.add_parser(
        "import",
        parents=[common],
        help="import a released poison onto its clean base dataset",
        description="Line a released poison up with --base by row index, check shapes, value "
        "ranges and labels, and write it with its measured budget. Formats: perturbation "
        "(.pt/.npy deltas), png (<row>.png folder), npz (data/targets or x/y), ntga.",
    )
    imp.add_argument("--format", required=True, help="perturbation, png, npz or ntga")
    imp.add_argument("--from", dest="paths", nargs="+", required=True, help="released file(s)")
    imp.add_argument("--base", required=True, help="the clean dataset the poison was made from")
    imp.add_argument(
        "--allow-over-budget",
        action="store_true",
        help="write a poison over the protocol's budget (l_inf 8/255, l2 1.0, l0 1 pixel, or "
        "the named attack's); the measured budget is in the manifest either way",
    )
    dataset_options(imp)
    imp.set_defaults(run=run_import)


def dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output dataset directory (must not exist)")
    p.add_argument("--split", choices=["train", "test"], help="default: train")
    p.add_argument("--subset", type=int, default=None, help="class-balanced subset size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_attack(args: argparse.Namespace) -> int:
    from raypurify.atomic import check_new
    from raypurify.attacks.base import configure, poison
    from raypurify.storage import join_cluster
    from raypurify.training.run import check_attack_options

    missing = [f"--{name}" for name in ("attack", "data", "out") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"poison: {', '.join(missing)} required (or: raypurify poison import)")
    check_new(args.out, args.overwrite, inputs=[args.data])
    settings = {k: v for k, v in (("ratio", args.ratio), ("seed", args.seed)) if v is not None}
    attack, cfg = configure(args.attack, settings, args.overrides)
    check_attack_options(cfg, "options")
    spec, data = load_base(args.data, args)
    if os.environ.get("RAY_ADDRESS"):  # a cluster job: surrogate attacks' checkpoints go
        join_cluster(Path(args.out).parent, args.num_cpus)  # under --out's folder
    config = {"attack": attack.name, "attack_config": cfg.to_dict()}

    def make(run: Run) -> tuple[ImageSet, dict[str, float]]:
        return poison(data, attack.name, (), run, settings=cfg.to_dict())

    return generate(args, spec, config, make)


def run_import(args: argparse.Namespace) -> int:
    from raypurify.atomic import check_new
    from raypurify.attacks.base import log_poisoning
    from raypurify.attacks.importers import configure_import, held_to_budget, import_poison

    if not args.out:
        raise ConfigError("poison import: --out required (the output dataset directory)")
    check_new(args.out, args.overwrite, inputs=[args.base, *args.paths])
    importer, cfg = configure_import(args.format, {}, args.overrides)
    spec, base = load_base(args.base, args)
    poisoned, budget = import_poison(base, importer.name, args.paths, settings=cfg.to_dict())
    how = "pass --allow-over-budget to import it anyway"
    check = held_to_budget(budget, cfg.attack, Path(args.paths[0]), args.allow_over_budget, how)
    config = {
        "attack": cfg.attack or f"import:{importer.name}",
        "attack_config": cfg.to_dict(),
        "import": {"format": importer.name, "from": list(args.paths)},
        "budget_check": {**check, "allowed_over": not check["within"]},
    }

    def make(run: Run) -> tuple[ImageSet, dict[str, float]]:
        params = {"format": importer.name, "from": list(args.paths), **cfg.to_dict()}
        log_poisoning(run, params, base, poisoned, budget)
        return poisoned, budget

    return generate(args, spec, config, make)


def load_base(ref: str, args: argparse.Namespace) -> tuple[DatasetSpec, ImageSet]:
    """The clean dataset `ref` (name or directory) as a validated spec and in memory."""
    from raypurify import config
    from raypurify.data.registry import load, spec_for
    from raypurify.data.spec import DatasetSpec

    fields = {"split": split_of(ref, args.split), "subset": args.subset}
    spec = config.validate(DatasetSpec, {**spec_for(ref).to_dict(), **fields}, source="dataset")
    return spec, load(spec)


def generate(
    args: argparse.Namespace,
    spec: DatasetSpec,
    config: dict[str, Any],
    make: Callable[[Run], tuple[ImageSet, dict[str, float]]],
) -> int:
    """Run `make(run)` -> (poisoned, budget) inside an MLflow run, write it, print the budget."""
    from raypurify.data import registry
    from raypurify.data.interchange import write_images
    from raypurify.tracking import active_run, start_run

    run = start_run(EXPERIMENT, config["attack"], tags={"base": spec.name, "out": args.out})
    with active_run(run):
        poisoned, budget = make(run)
        info = write_images(
            poisoned,
            args.out,
            config={**config, "budget": budget, "base": spec.to_dict()},
            parents=[registry.lineage(spec)],
            overwrite=args.overwrite,
        )
        run.set_tags({"dataset_id": info.id})
    print(
        f"budget: linf {budget['linf']:.4f} ({budget['linf_255']:.0f}/255)  "
        f"l2 mean {budget['l2_mean']:.4f} max {budget['l2_max']:.4f}  "
        f"l0 mean {budget['l0_mean']:.1f} max {budget['l0_max']:.0f}  "
        f"changed {budget['changed_rows']:.0f} of {len(poisoned)} rows"
    )
    print(f"wrote {info.rows} images to {info.path.resolve()} (id {info.id})")
    return 0
