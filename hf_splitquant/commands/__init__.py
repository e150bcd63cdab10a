"""Command-line pieces shared by ``hf-splitquant`` and ``optimum-cli splitquant``.

``hf_splitquant.cli`` owns the argument definitions of ``quantize`` and ``inspect``;
``optimum-cli splitquant <command>`` reuses them: :func:`copy_arguments` copies the options of
``hf-splitquant <command>`` onto optimum's parser, and :func:`run_command` runs the same function
``hf-splitquant`` runs (with its error handling).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["copy_arguments", "run_command", "subcommand_parser"]


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``hf-splitquant <name>``, as built by :func:`hf_splitquant.cli.build_parser`."""
    from ..cli import build_parser

    root = build_parser()
    for action in root._actions:  # argparse keeps sub-parsers in a _SubParsersAction's `choices`
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"hf-splitquant has no command {name!r}")


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
    """Run ``hf-splitquant <name>`` on parsed ``args``; errors print as ``error: ...`` with exit code 2."""
    import hf_splitquant  # noqa: F401  (registers the quantizer)

    from .. import cli

    func = {"quantize": cli.cmd_quantize, "inspect": cli.cmd_inspect}.get(name)
    if func is None and name == "evaluate":
        from .evaluate import cmd_evaluate as func
    if func is None:
        raise ValueError(f"hf-splitquant has no command {name!r}")
    try:
        return int(func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
