"""``hf-splitquant quantize MODEL -o OUTPUT [...]``: quantize a float checkpoint into a packed one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .options import group_size

logger = logging.get_logger("hf_splitquant")

__all__ = ["TASKS", "add_quantize_arguments", "cmd_quantize", "model_class"]

#: ``--task``: the transformers class to load the model with.
TASKS = {
    "auto": None,
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
}


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


def add_quantize_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``quantize`` (shared by ``hf-splitquant`` and ``optimum-cli splitquant``)."""
    parser.add_argument("model", help="local folder of a float transformers checkpoint")
    parser.add_argument("--output", "-o", required=True, help="folder to write (atomically)")
    parser.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}")
    parser.add_argument("--group-size", type=group_size, default=64, help="inputs per scale group, or 'none' (per channel)")
    parser.add_argument("--transform", choices=["rtn", "splitquant", "ocs"], default="rtn")
    parser.add_argument("--splitquant-range", choices=["cluster", "aligned", "part"], default="cluster")
    parser.add_argument("--ocs-expand-ratio", type=float, default=0.05, help="OCS: fraction of input channels duplicated")
    parser.add_argument("--ocs-split", choices=["auto", "qa", "naive"], default="qa",
                        help="OCS: quantization-aware or plain halves (auto: per layer, the one with the smaller error)")
    parser.add_argument("--ocs-layout", choices=["source_group", "appended"], default="source_group",
                        help="OCS: copies on their source group's grid (format version 2) or appended (version 1)")
    parser.add_argument("--clip", choices=["mse"], default=None, help="search each group's clipping range (RTN, OCS)")
    parser.add_argument("--input-rotation", type=int, default=None, metavar="BLOCK",
                        help="store W R and rotate the inputs by Hadamard blocks of this size (e.g. 64; RTN, format "
                             "version 5); pays with --rounding gptq")
    parser.add_argument("--bit-allocation", choices=["mixquant", "coding_length", "coding_length_inputs", "sensitivity"], default=None,
                        help="per-layer bit widths (needs --target-bits; the last two need --rounding and calibration data)")
    parser.add_argument("--target-bits", type=float, default=None,
                        help="with --bit-allocation: average bits per weight, overheads included")
    parser.add_argument("--mixquant-qem", type=float, default=300.0, help="MixQuant error multiplier (no --target-bits)")
    parser.add_argument("--mixquant-candidates", type=int, nargs="+", default=None, metavar="BITS")
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--scale-dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--modules-to-not-convert", nargs="*", default=None, metavar="NAME")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-bits", type=int, default=None, choices=range(2, 9), metavar="{2..8}",
                        help="also pack the input embedding and the output head at this width (format version 3)")
    parser.add_argument("--rounding", choices=["gptq", "attention_round"], default=None,
                        help="choose the codes on calibration data (gptq: error feedback on output-aware clipped grids)")
    parser.add_argument("--calibration-data", metavar="FILE", default=None,
                        help="local .txt (a sample per line), .json/.jsonl or .csv (a 'text' column) for --rounding")
    parser.add_argument("--num-samples", type=int, default=1024, help="calibration samples drawn from FILE (seeded)")
    parser.add_argument("--task", choices=sorted(TASKS), default="auto",
                        help="model class to load (auto: the checkpoint's architecture)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the layers kept in float")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--per-layer", action="store_true", help="print one line per quantized layer")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--model-card", action="store_true", help="also write a README.md model card into the output")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the packed checkpoint with its model card to this Hub repo (user/name)")
    parser.add_argument("--base-model", metavar="REPO", default=None,
                        help="Hub id of the float model, for the card's base_model metadata")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return parser


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run ``hf-splitquant quantize``: quantize, save (optionally with a card, or push), print the report."""
    import torch
    from transformers import AutoTokenizer

    from .. import SplitQuantConfig, format_report, quantization_report
    from ..saving import save_quantized

    config = SplitQuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        transform=None if args.transform == "rtn" else args.transform,
        splitquant_range=args.splitquant_range,
        ocs_expand_ratio=args.ocs_expand_ratio,
        ocs_split=args.ocs_split,
        ocs_layout=args.ocs_layout,
        clip=args.clip,
        input_rotation=args.input_rotation,
        bit_allocation=args.bit_allocation,
        target_bits=args.target_bits,
        mixquant_qem=args.mixquant_qem,
        rounding=args.rounding,
        **({"mixquant_candidates": args.mixquant_candidates} if args.mixquant_candidates else {}),
        scale_dtype=args.scale_dtype,
        modules_to_not_convert=args.modules_to_not_convert,
        seed=args.seed,
        embedding_bits=args.embedding_bits,
    )
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: {output} already exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cls = model_class(args.model, args.task)
    start = time.perf_counter()
    if args.rounding or args.calibration_data:  # needs data: load in float, then calibrate
        from ..calibration import quantize_from_file

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
        from ..integrations.hub import save_with_card

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
        from ..integrations.hub import upload_checkpoint

        try:
            info = upload_checkpoint(output, args.push_to_hub, private=args.private)
        except Exception as err:  # HTTP, connection or auth errors of any transport: report, keep the folder
            print(f"error: the checkpoint is saved in {output} but the upload to {args.push_to_hub} failed: {err}",
                  file=sys.stderr)
            return 1
        print(f"pushed {output} to {args.push_to_hub}: {info.commit_url}")
    return 0
