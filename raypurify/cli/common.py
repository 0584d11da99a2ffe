"""Options shared by every command."""

from __future__ import annotations

import argparse


def common_options(example: str) -> argparse.ArgumentParser:
    """`--set` and `--num-cpus`, for every command that reads a config or starts Ray (not
    the listings, which would ignore them); `example` is a KEY=VALUE the command's own
    config takes, for its help."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for a local Ray (ignored when RAY_ADDRESS names a cluster)",
    )
    return p


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of trials, of CPUs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def gist(description: str | None, width: int = 96) -> str:
    """A listing's one line of a description: its first sentence, whitespace folded, cut
    at a word with an ellipsis where longer than `width`."""
    text = " ".join((description or "").split())
    first = text.split(". ", 1)[0]
    if len(first) <= width:
        return first
    return first[: first.rfind(" ", 0, width - 1)].rstrip(",;:") + " …"


def split_of(ref: str, split: str | None) -> str:
    """The split `--split` names for dataset `ref` (train by default). A dataset directory
    of one split has nothing to choose: a --split given for it is refused, so no output
    records a split its rows did not come from."""
    from pathlib import Path

    from raypurify.data.interchange import MANIFEST
    from raypurify.errors import ConfigError

    if split is None:
        return "train"
    if (Path(ref) / MANIFEST).exists():
        raise ConfigError(
            f"--split {split}: {ref} is a dataset directory of one split; --split chooses "
            "between the train/ and test/ folders of a root, or a named dataset's splits"
        )
    return split
