"""Options shared by every command."""

from __future__ import annotations

import argparse


def common_options() -> argparse.ArgumentParser:
    """`--set` and `--num-cpus`, accepted by every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs for a local Ray (ignored when RAY_ADDRESS names a cluster)",
    )
    return p
