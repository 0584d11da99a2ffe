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


def gist(description: str | None, width: int = 96) -> str:
    """A listing's one line of a description: its first sentence, whitespace folded, cut
    at a word with an ellipsis where longer than `width`."""
    text = " ".join((description or "").split())
    first = text.split(". ", 1)[0]
    if len(first) <= width:
        return first
    return first[: first.rfind(" ", 0, width - 1)].rstrip(",;:") + " …"
