"""``hf-splitquant``: quantize, inspect and demo from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger("hf_splitquant")

TASKS = {
    "auto": None,
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
}


def _group_size(value: str) -> int | None:
    if value.lower() in {"none", "channel", "per-channel"}:
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size must be a positive integer or 'none', got {value!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"--group-size must be a positive integer or 'none', got {value!r}")
    return size


def model_class(model_path: str, task: str) -> Any:
    """The transformers auto/model class for ``task`` (``auto``: the checkpoint's own architecture)."""
    import transformers

    if task != "auto":
        return getattr(transformers, TASKS[task])
    config = transformers.AutoConfig.from_pretrained(model_path)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from . import SplitQuantConfig, format_report, quantization_report
    from .saving import save_quantized

    config = SplitQuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        transform=None if args.transform == "rtn" else args.transform,
        splitquant_range=args.splitquant_range,
        ocs_expand_ratio=args.ocs_expand_ratio,
        ocs_split=args.ocs_split,
        clip=args.clip,
        bit_allocation=args.bit_allocation,
        target_bits=args.target_bits,
        mixquant_qem=args.mixquant_qem,
        rounding=args.rounding,
        **({"mixquant_candidates": args.mixquant_candidates} if args.mixquant_candidates else {}),
        scale_dtype=args.scale_dtype,
        modules_to_not_convert=args.modules_to_not_convert,
        seed=args.seed,
    )
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: {output} already exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cls = model_class(args.model, args.task)
    start = time.perf_counter()
    if args.rounding or args.calibration_data:  # needs data: load in float, then calibrate
        from .calibration import quantize_from_file

        model = quantize_from_file(cls, args.model, config, args.calibration_data, num_samples=args.num_samples,
                                   dtype=getattr(torch, args.dtype))
    else:
        model = cls.from_pretrained(args.model, quantization_config=config, dtype=getattr(torch, args.dtype))
    elapsed = time.perf_counter() - start
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError, KeyError) as err:  # a model without a tokenizer is fine
        logger.warning(f"No tokenizer saved with the model: {err}")
        tokenizer = None
    if args.push_to_hub or args.model_card:
        from .integrations.hub import save_with_card

        save_with_card(model, output, tokenizer=tokenizer, base_model=args.base_model, overwrite=args.overwrite,
                       repo_id=args.push_to_hub)
    else:
        save_quantized(model, output, tokenizer=tokenizer, overwrite=args.overwrite)
    report = quantization_report(model)
    print(format_report(report, per_layer=args.per_layer))
    print(f"quantized in {elapsed:.1f} s; saved to {output}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    if args.push_to_hub:
        from .integrations.hub import upload_checkpoint

        try:
            info = upload_checkpoint(output, args.push_to_hub, private=args.private)
        except Exception as err:  # HTTP, connection or auth errors of any transport: report, keep the folder
            print(f"error: the checkpoint is saved in {output} but the upload to {args.push_to_hub} failed: {err}",
                  file=sys.stderr)
            return 1
        print(f"pushed {output} to {args.push_to_hub}: {info.commit_url}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import SplitQuantConfig
    from .report import format_report, report_from_specs

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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, num_sentences=args.num_sentences, group_size=args.group_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-splitquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float checkpoint into a packed one")
    q.add_argument("model", help="local folder of a float transformers checkpoint")
    q.add_argument("--output", "-o", required=True, help="folder to write (atomically)")
    q.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}")
    q.add_argument("--group-size", type=_group_size, default=64, help="inputs per scale group, or 'none' (per channel)")
    q.add_argument("--transform", choices=["rtn", "splitquant", "ocs"], default="rtn")
    q.add_argument("--splitquant-range", choices=["cluster", "part"], default="cluster")
    q.add_argument("--ocs-expand-ratio", type=float, default=0.05, help="OCS: fraction of input channels duplicated")
    q.add_argument("--ocs-split", choices=["auto", "qa", "naive"], default="qa",
                   help="OCS: quantization-aware or plain halves (auto: per layer, the one with the smaller error)")
    q.add_argument("--clip", choices=["mse"], default=None, help="search each group's clipping range (RTN, OCS)")
    q.add_argument("--bit-allocation", choices=["mixquant", "coding_length"], default=None, help="per-layer bit widths (MixQuant)")
    q.add_argument("--target-bits", type=float, default=None,
                   help="with --bit-allocation: average bits per weight, overheads included")
    q.add_argument("--mixquant-qem", type=float, default=300.0, help="MixQuant error multiplier (no --target-bits)")
    q.add_argument("--mixquant-candidates", type=int, nargs="+", default=None, metavar="BITS")
    q.add_argument("--symmetric", action="store_true")
    q.add_argument("--scale-dtype", choices=["float16", "float32"], default="float16")
    q.add_argument("--modules-to-not-convert", nargs="*", default=None, metavar="NAME")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--rounding", choices=["attention_round"], default=None, help="optimise the codes on calibration data")
    q.add_argument("--calibration-data", metavar="FILE", default=None,
                   help="local .txt (a sample per line), .json/.jsonl or .csv (a 'text' column) for --rounding")
    q.add_argument("--num-samples", type=int, default=1024, help="calibration samples drawn from FILE (seeded)")
    q.add_argument("--task", choices=sorted(TASKS), default="auto",
                   help="model class to load (auto: the checkpoint's architecture)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the layers kept in float")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.add_argument("--per-layer", action="store_true", help="print one line per quantized layer")
    q.add_argument("--json", help="also write the report as JSON to this file")
    q.add_argument("--model-card", action="store_true", help="also write a README.md model card into the output")
    q.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the packed checkpoint with its model card to this Hub repo (user/name)")
    q.add_argument("--base-model", metavar="REPO", default=None,
                   help="Hub id of the float model, for the card's base_model metadata")
    q.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="print the quantization report of a packed checkpoint (no weights loaded)")
    i.add_argument("path")
    i.add_argument("--summary", action="store_true", help="totals only")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    from .commands.evaluate import add_evaluate_arguments, cmd_evaluate

    e = sub.add_parser("evaluate", help="evaluate a packed checkpoint (perplexity, embedding fidelity) against float")
    add_evaluate_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="quantize the bundled all-MiniLM-L6-v2 with SplitQuant INT2 and RTN INT2")
    d.add_argument("--output-dir", default="out/demo")
    d.add_argument("--num-sentences", type=int, default=300)
    d.add_argument("--group-size", type=_group_size, default=64)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    import hf_splitquant  # noqa: F401  (registers the quantizer)

    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
