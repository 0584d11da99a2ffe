"""The `raypurify` command line: one sub-command module per pipeline step."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from raypurify import __version__
from raypurify.cli import analyze, datasets, experiments, poison, purify, sweep, train, ui
from raypurify.errors import user_error

COMMANDS = [datasets, poison, train, purify, experiments, sweep, analyze, ui]


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error (the sub-command
    parsers are of this class too); `--help` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="raypurify",
        description="Purify unlearnable examples (D-VAE) and evaluate defences, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"raypurify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def stop_ray() -> None:
    """Leave Ray now, so that a step still in flight in another thread (which the
    interpreter waits for at exit) fails at its next Ray call instead of running to its
    end; a local Ray stops with it, a cluster's work for this driver is cancelled."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        stop_ray()
        return 130
    except BrokenPipeError:  # the reader went away (`raypurify presets | head -3`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second one at exit
        return 141  # as a command killed by SIGPIPE
    except OSError as e:
        if e.filename is None:  # not about a path the user gave
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
