"""``hf-splitquant inspect CHECKPOINT``: the per-layer bits of a packed checkpoint (no weights loaded)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_inspect_arguments", "cmd_inspect"]


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``inspect`` (shared by ``hf-splitquant`` and ``optimum-cli splitquant``)."""
    parser.add_argument("path")
    parser.add_argument("--summary", action="store_true", help="totals only")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run ``hf-splitquant inspect``: the report of a packed checkpoint from its config.json alone."""
    from ..config import SplitQuantConfig
    from ..report import format_report, report_from_specs

    path = Path(args.path)
    config_file = path / "config.json"
    if not config_file.is_file():
        print(f"error: {config_file} not found; pass a folder written by save_pretrained", file=sys.stderr)
        return 2
    raw = json.loads(config_file.read_text()).get("quantization_config")
    if not raw or raw.get("quant_method") != "splitquant":
        print(f"error: {path} is not an hf_splitquant checkpoint (no splitquant quantization_config)", file=sys.stderr)
        return 2
    config = SplitQuantConfig.from_dict(raw)
    report = report_from_specs(config.layer_specs())
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if args.json:
        print(json.dumps({**report.to_dict(), "safetensors_bytes": disk}, indent=2))
        return 0
    print(format_report(report, per_layer=not args.summary))
    print(f"format version {config.format_version}; safetensors on disk: {disk / 2**20:.2f} MiB")
    return 0
