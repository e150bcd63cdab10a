"""``hf-splitquant``: quantize, inspect, evaluate and demo from the command line.

This module only builds the parser from the subcommands in :mod:`hf_splitquant.commands` (one
module per command) and runs the chosen one; it defines no command itself.
"""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging

from .commands import COMMANDS, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-splitquant`` parser: one sub-parser per entry of :data:`hf_splitquant.commands.COMMANDS`."""
    parser = argparse.ArgumentParser(prog="hf-splitquant", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-splitquant`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
