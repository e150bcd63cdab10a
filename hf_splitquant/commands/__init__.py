"""The subcommands of ``hf-splitquant``, shared with ``optimum-cli splitquant``.

Each subcommand lives in its own module here (``quantize``, ``inspect``, ``evaluate``, ``bench``, ``demo``)
with an ``add_<name>_arguments(parser)`` function and a ``cmd_<name>(args) -> int`` function;
:data:`COMMANDS` lists them. :mod:`hf_splitquant.cli` builds the ``hf-splitquant`` parser from
this table, and ``optimum-cli splitquant <command>`` reuses it: :func:`copy_arguments` copies the
options of a command onto optimum's parser and :func:`run_command` runs the same function with the
same error handling. Nothing here imports :mod:`hf_splitquant.cli` (the dependency goes one way).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "copy_arguments", "get_command", "run_command", "subcommand_parser"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its one-line help and the module that implements it."""

    name: str
    help: str
    module: str

    def _attribute(self, prefix: str, suffix: str = "") -> Callable:
        module = importlib.import_module(f"{__name__}.{self.module}")
        return getattr(module, f"{prefix}{self.name}{suffix}")

    def add_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the command's options and positionals to ``parser``."""
        return self._attribute("add_", "_arguments")(parser)

    def run(self, args: argparse.Namespace) -> int:
        """Run the command on parsed ``args``; returns the exit code."""
        return int(self._attribute("cmd_")(args) or 0)


#: The subcommands, in the order ``hf-splitquant --help`` lists them.
COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("quantize", "quantize a float checkpoint into a packed one", "quantize"),
        Command("inspect", "print the quantization report of a packed checkpoint (no weights loaded)", "inspect"),
        Command("evaluate", "evaluate a packed checkpoint (perplexity, embedding fidelity) on your texts against "
                "float", "evaluate"),
        Command("bench", "tokens/s (causal LM) or sentences/s (encoder) of a packed checkpoint against its "
                "float source, interleaved in one process, with threads, CPU and load reported", "bench"),
        Command("demo", "quantize all-MiniLM-L6-v2 with SplitQuant INT2 and RTN INT2 (needs the in-repo "
                "splitquant_assets package: make demo)", "demo"),
    )
}


def get_command(name: str) -> Command:
    """The :class:`Command` called ``name``.

    Raises:
        ValueError: there is no such command.
    """
    if name not in COMMANDS:
        raise ValueError(f"hf-splitquant has no command {name!r}; available: {sorted(COMMANDS)}")
    return COMMANDS[name]


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """A stand-alone parser for ``hf-splitquant <name>`` (the options ``hf-splitquant`` gives it)."""
    return get_command(name).add_arguments(argparse.ArgumentParser(prog=f"hf-splitquant {name}", add_help=True))


def copy_arguments(name: str, target: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every option and positional of ``hf-splitquant <name>`` to ``target`` (help excluded).

    The copied actions keep their destinations, so the parsed namespace is the one
    ``hf-splitquant <name>`` would produce and the same command function can run it.
    """
    source = subcommand_parser(name)
    if source.description:
        target.description = source.description
    for action in source._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        target._add_action(action)
    return target


def run_command(name: str, args: argparse.Namespace) -> int:
    """Run ``hf-splitquant <name>`` on parsed ``args``; returns the exit code.

    User errors (bad values, missing or existing files) print as ``error: ...`` with exit code 2; a
    missing optional dependency prints the ``pip install 'hf-splitquant[<extra>]'`` hint with exit
    code 1.

    Raises:
        ValueError: there is no command ``name`` (a programming error, not a user error).
    """
    command = get_command(name)
    import hf_splitquant  # noqa: F401  (registers the quantizer)

    try:
        return command.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "hf-splitquant[" not in str(err):
            raise  # not a missing extra: keep the traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
