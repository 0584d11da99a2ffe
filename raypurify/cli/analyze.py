"""`raypurify analyze detect | disentangle`: the paper's analyses on existing outputs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from raypurify.cli.common import common_options

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="UE detection and the disentanglement check")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    common = common_options("epochs=5")

    d = asub.add_parser(
        "detect",
        parents=[common],
        help="score each image by its stage-1 p_hat and detect the poisoned ones (Table 8)",
    )
    d.add_argument("--data", required=True, help="the partly poisoned set (with `poisoned`)")
    d.add_argument("--purified", required=True, help="the `raypurify purify` output of --data")
    d.set_defaults(run=run_detect)

    t = asub.add_parser(
        "disentangle",
        parents=[common],
        help="train on clean images + the learned p_hat; accuracy should collapse (Table 1)",
    )
    t.add_argument("--clean", required=True, help="the clean set the poison was made from")
    t.add_argument("--data", required=True, help="the poisoned set")
    t.add_argument("--purified", required=True, help="the `raypurify purify` output of --data")
    t.add_argument("--test", required=True, help="clean test set")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--recipe", default="cpu", help="classifier recipe")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in OUT made from other inputs or settings (only ever a raypurify "
        "output, never an input)",
    )
    t.set_defaults(run=run_disentangle)


def check_inputs(data: str, purified: str, *others: str) -> None:
    """Every input is there and readable before Ray starts: the datasets open, and the
    purification directory holds its config and stage-1 weights that fit it and the data."""
    import json
    from pathlib import Path

    from raypurify.data.interchange import open_dataset
    from raypurify.defenses.dvae.config import PurifyConfig
    from raypurify.defenses.dvae.pipeline import recorded_input
    from raypurify.defenses.dvae.stage import check_weights
    from raypurify.errors import RaypurifyError

    info = open_dataset(data)
    for d in others:
        open_dataset(d)
    pdir = Path(purified)
    for name in ("config.json", "stage1.pt"):
        if not (pdir / name).is_file():
            raise RaypurifyError(f"{pdir}: no {name}; is this a `raypurify purify` output?")
    made_from = recorded_input(pdir)
    if made_from is not None and made_from != info.sha256:
        raise RaypurifyError(
            f"--purified {pdir} was made from another dataset than --data {data} "
            f"(content {made_from[:16]}, not {info.sha256[:16]}); purify --data first"
        )
    try:
        cfg = PurifyConfig.model_validate(json.loads((pdir / "config.json").read_text()))
    except ValueError as e:
        first = (str(e).splitlines() or ["invalid"])[0]
        where = pdir / "config.json"
        raise RaypurifyError(f"{where}: not a purification config ({first})") from None
    check_weights(pdir / "stage1.pt", cfg, len(info.classes), info.shape[0])


def check_clean_base(clean: str, data: str) -> None:
    """`clean` holds every row of `data` (by index) with the same label: the clean set
    `data` was poisoned from, whose images the disentanglement check adds p_hat to."""
    from raypurify.data.interchange import index_and_labels, open_dataset
    from raypurify.errors import RaypurifyError

    clean_index, clean_labels = index_and_labels(open_dataset(clean))
    index, labels = index_and_labels(open_dataset(data))
    at = dict(zip(clean_index.tolist(), clean_labels.tolist(), strict=True))
    missing = sum(i not in at for i in index.tolist())
    differ = sum(at.get(i, y) != y for i, y in zip(index.tolist(), labels.tolist(), strict=True))
    if missing or differ:
        raise RaypurifyError(
            f"--clean {clean}: not the clean set --data {data} was poisoned from "
            f"({missing} of its {len(index)} rows missing, {differ} labelled otherwise)"
        )


def run_detect(args: argparse.Namespace) -> int:
    from raypurify.experiments.analyses import detect_poisoned
    from raypurify.runtime import init_ray

    check_inputs(args.data, args.purified)
    init_ray(args.num_cpus)
    print(json.dumps(detect_poisoned(args.data, args.purified), indent=2))
    return 0


def run_disentangle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raypurify.atomic import claim_dir
    from raypurify.data import registry
    from raypurify.data.interchange import read_images
    from raypurify.data.manifest import file_sha256
    from raypurify.experiments.analyses import write_clean_plus_phat
    from raypurify.storage import join_cluster
    from raypurify.training.classifier import train_classifier
    from raypurify.training.config import recipe
    from raypurify.training.run import EXECUTION_KEYS, check_options, identity

    cfg = recipe(args.recipe, args.overrides)
    check_options(cfg)
    check_inputs(args.data, args.purified, args.clean)
    check_clean_base(args.clean, args.data)
    out = Path(args.out)
    test_spec = registry.spec_for(args.test, split="test")
    stage1 = Path(args.purified) / "stage1.pt"
    what = {  # resumed only for the same inputs and settings (see training.run)
        "clean": identity(registry.spec_for(args.clean)),
        "data": identity(registry.spec_for(args.data)),
        "purified": {"config": json.loads((Path(args.purified) / "config.json").read_text())},
        "stage1_sha256": file_sha256(stage1),
        "test": identity(test_spec),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_KEYS},
    }
    test = registry.load(test_spec)
    inputs = [args.data, args.purified, args.clean, args.test]
    claim_dir(out, what, overwrite=args.overwrite, inputs=inputs)
    join_cluster(out, args.num_cpus)  # on a cluster: shared storage, a tracking server
    info = write_clean_plus_phat(args.clean, args.data, args.purified, out / "clean_plus_phat")
    metrics = train_classifier(read_images(info.path), test, cfg, out / "train")
    print(f"trained on clean + p_hat: accuracy {metrics['accuracy']:.2%} -> {out}/train")
    return 0
