"""`raypurify datasets list | export | show`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raypurify import config
from raypurify.cli.common import common_options, split_of
from raypurify.data.registry import SOURCES, spec_for
from raypurify.data.spec import DatasetSpec

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list, export and inspect datasets")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = common_options("seed=1")

    ls = dsub.add_parser("list", help="list the registered datasets")
    ls.set_defaults(run=run_list)

    ex = dsub.add_parser(
        "export",
        parents=[common],
        help="write a dataset in the interchange format, or as an image folder",
        description="Write a dataset (a registered name or a dataset directory, e.g. a "
        "purification's p3/) in the interchange format every raypurify step reads, or with "
        "--format folder as OUT/<class>/<index>.png, which torchvision's ImageFolder and "
        "other frameworks read with the same labels.",
    )
    ex.add_argument("name", help="a registered dataset name or a dataset directory")
    ex.add_argument("--out", required=True, help="output directory (must not exist)")
    ex.add_argument("--split", choices=["train", "test"], help="default: train")
    ex.add_argument("--subset", type=int, default=None, help="class-balanced subset size")
    ex.add_argument("--seed", type=int, default=0, help="seed of the subset")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.add_argument(
        "--format",
        choices=["parquet", "folder"],
        default="parquet",
        help="parquet: the interchange format (default); folder: OUT/<class>/<index>.png",
    )
    ex.set_defaults(run=run_export)

    sh = dsub.add_parser("show", help="summarize a dataset directory")
    sh.add_argument("dir", help="a dataset directory in the interchange format")
    sh.add_argument("--grid", default=None, help="where to save the sample grid PNG")
    sh.set_defaults(run=run_show)

    ve = dsub.add_parser(
        "verify",
        help="recompute a dataset's content hash from every row and check it (the full check)",
    )
    ve.add_argument("dir", help="a dataset directory in the interchange format")
    ve.set_defaults(run=run_verify)


def run_list(args: argparse.Namespace) -> int:
    width = max(map(len, SOURCES.names()))
    for src in SOURCES:
        print(f"{src.name:<{width}}  {src.description}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from raypurify.atomic import check_new
    from raypurify.data.export import export, export_folder

    split = split_of(args.name, args.split)
    base = spec_for(args.name, split=split, subset=args.subset, seed=args.seed)
    spec = config.load(DatasetSpec, base.to_dict(), args.overrides, source="dataset")
    check_new(args.out, args.overwrite, inputs=[spec.path])
    if args.format == "folder":
        rows, folders = export_folder(
            spec, args.out, overwrite=args.overwrite, num_cpus=args.num_cpus
        )
        print(f"wrote {rows} images to {args.out}/<class>/<index>.png, classes in label "
              f"order: {', '.join(folders)}")  # fmt: skip
        return 0
    info = export(spec, args.out, overwrite=args.overwrite, num_cpus=args.num_cpus)
    print(f"wrote {info.rows} images to {info.path} (id {info.id})")
    return 0


def not_a_registered_name(path: str) -> None:
    """`show` and `verify` read a directory; a registered name there gets the command that
    makes one instead of "no such directory"."""
    from pathlib import Path

    from raypurify.errors import DatasetError

    if path in SOURCES.names() and not Path(path).exists():
        raise DatasetError(
            f"{path}: a registered dataset, not a directory; write one first with "
            f"`raypurify datasets export {path} --out DIR`"
        )


def run_show(args: argparse.Namespace) -> int:
    from raypurify.data.summary import summarize

    not_a_registered_name(args.dir)
    print("\n".join(summarize(args.dir, args.grid).lines()))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from raypurify.data.interchange import open_dataset

    not_a_registered_name(args.dir)
    info = open_dataset(args.dir, verify=True)
    print(f"{info.path}: {info.rows} rows, content matches its id {info.id}")
    return 0
