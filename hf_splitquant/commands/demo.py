"""``hf-splitquant demo``: runs the demo of the in-repo assets package, when it is installed.

The demo needs real models and text, which are not part of the library: they come from the
package ``hf-splitquant-assets`` (folder ``assets/`` of the repository, import name
``splitquant_assets``). This command imports it lazily and, when it is missing, says how to get
it (``make demo`` from a clone, or ``pip install -e ./assets``).
"""

from __future__ import annotations

import argparse
import sys

from .options import group_size

__all__ = ["add_demo_arguments", "cmd_demo"]

_MISSING = (
    "error: `hf-splitquant demo` runs the demo of the package hf-splitquant-assets (import name "
    "splitquant_assets), which is not installed. It is not on PyPI: from a clone of the repository run "
    "`make demo`, or `pip install -e ./assets` and then `hf-splitquant demo` ({reason})"
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by ``hf-splitquant demo`` and ``python -m splitquant_assets.demo``)."""
    parser.add_argument("--output-dir", default="out/demo", help="folder for the packed checkpoints")
    parser.add_argument("--num-sentences", type=int, default=300, help="real English sentences to embed")
    parser.add_argument("--group-size", type=group_size, default=64, help="inputs per scale group, or 'none'")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``splitquant_assets.demo.run_demo``; exit code 2 with instructions when it is not installed."""
    try:
        from splitquant_assets.demo import run_demo
    except ImportError as err:
        if (err.name or "").split(".")[0] != "splitquant_assets":
            raise  # the package is there but one of its own dependencies is missing: show that error
        print(_MISSING.format(reason=err), file=sys.stderr)
        return 2
    run_demo(output_dir=args.output_dir, num_sentences=args.num_sentences, group_size=args.group_size)
    return 0
