"""``optimum-cli splitquant quantize|evaluate|inspect``: hf_splitquant's commands inside optimum-cli.

optimum 2.3's ``optimum-cli`` imports every module of the namespace package
``optimum.commands.register`` and registers the commands listed in its ``REGISTER_COMMANDS``.
hf-splitquant installs this file there (``optimum``, ``optimum.commands`` and
``optimum.commands.register`` stay PEP 420 namespace packages: no ``__init__.py`` anywhere).

The options are those of ``hf-splitquant <command>``, copied from its parser, and the command runs
the same function (:mod:`hf_splitquant.commands`). optimum-cli imports this module on every call,
so it imports nothing heavy: hf_splitquant (torch, transformers) is loaded only when the command
line starts with ``splitquant``, to build the options, or when a command runs.
"""

from __future__ import annotations

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

_COMMANDS = {
    "quantize": "quantize a float checkpoint into a packed low-bit one (hf_splitquant)",
    "evaluate": "evaluate a packed checkpoint against its float model (perplexity, embedding fidelity)",
    "inspect": "print the per-layer bits of a packed checkpoint (from config.json alone)",
}


def _splitquant_requested() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "splitquant"


class _SplitQuantLeaf(BaseOptimumCLICommand):
    """One ``hf-splitquant`` command; the subclasses only name it."""

    NAME = ""

    @classmethod
    def _fill(cls, parser) -> None:  # noqa: ANN001
        if _splitquant_requested():
            from hf_splitquant.commands import copy_arguments

            copy_arguments(cls.NAME, parser)

    def run(self) -> None:
        from hf_splitquant.commands import run_command

        code = run_command(self.NAME, self.args)
        if code:
            raise SystemExit(code)


class SplitQuantQuantizeCommand(_SplitQuantLeaf):
    NAME = "quantize"

    @staticmethod
    def parse_args(parser) -> None:  # noqa: ANN001
        SplitQuantQuantizeCommand._fill(parser)


class SplitQuantEvaluateCommand(_SplitQuantLeaf):
    NAME = "evaluate"

    @staticmethod
    def parse_args(parser) -> None:  # noqa: ANN001
        SplitQuantEvaluateCommand._fill(parser)


class SplitQuantInspectCommand(_SplitQuantLeaf):
    NAME = "inspect"

    @staticmethod
    def parse_args(parser) -> None:  # noqa: ANN001
        SplitQuantInspectCommand._fill(parser)


class SplitQuantCommand(BaseOptimumCLICommand):
    """``optimum-cli splitquant``: the group; prints its help when run without a command."""

    COMMAND = CommandInfo(name="splitquant", help="low-bit weight quantization with hf_splitquant (SplitQuant, RTN ...)")
    SUBCOMMANDS = (
        CommandInfo(name="quantize", help=_COMMANDS["quantize"], subcommand_class=SplitQuantQuantizeCommand),
        CommandInfo(name="evaluate", help=_COMMANDS["evaluate"], subcommand_class=SplitQuantEvaluateCommand),
        CommandInfo(name="inspect", help=_COMMANDS["inspect"], subcommand_class=SplitQuantInspectCommand),
    )


REGISTER_COMMANDS = [SplitQuantCommand]
