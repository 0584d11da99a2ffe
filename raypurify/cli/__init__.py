"""The `raypurify` command line: one sub-command module per pipeline step."""

from __future__ import annotations

import argparse
import sys

from raypurify import __version__
from raypurify.cli import analyze, datasets, experiments, poison, purify, sweep, train, ui
from raypurify.errors import user_error

COMMANDS = [datasets, poison, train, purify, experiments, sweep, analyze, ui]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypurify",
        description="Purify unlearnable examples (D-VAE) and evaluate defences, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"raypurify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
