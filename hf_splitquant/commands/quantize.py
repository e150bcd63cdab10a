"""``hf-splitquant quantize MODEL -o OUTPUT [...]``: quantize a float checkpoint into a packed one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..calibration.data import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH
from ..recipes import recipe_names
from .options import group_size

logger = logging.get_logger("hf_splitquant")

__all__ = ["CONFIG_DEFAULTS", "TASKS", "add_quantize_arguments", "cmd_quantize", "model_class", "quantize_config"]

#: ``--task``: the transformers class to load the model with.
TASKS = {
    "auto": None,
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
}


#: the quantization options of ``quantize`` (``SplitQuantConfig`` fields) and their values when neither the option
#: nor ``--recipe`` sets them
CONFIG_DEFAULTS: dict[str, Any] = {
    "bits": 4, "group_size": 64, "transform": "rtn", "splitquant_range": "cluster", "ocs_expand_ratio": 0.05,
    "ocs_split": "qa", "ocs_layout": "source_group", "clip": None, "input_rotation": None, "bit_allocation": None,
    "target_bits": None, "mixquant_qem": 300.0, "mixquant_candidates": None, "symmetric": False,
    "scale_dtype": "float16", "modules_to_not_convert": None, "seed": 0, "embedding_bits": None, "rounding": None,
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
    parser.add_argument("--recipe", choices=recipe_names(), default=None,
                        help="a named preset (hf_splitquant/recipes.py; the README's recommendation table): the "
                             "settings that measured best at each budget; the options below that you give override "
                             "single settings of it. The calibrated ones need --calibration-data")
    S = argparse.SUPPRESS  # the quantization options below: absent unless given (the recipe's or the default value)
    parser.add_argument("--bits", type=int, default=S, choices=range(2, 9), metavar="{2..8}", help="code width (default 4)")
    parser.add_argument("--group-size", type=group_size, default=S,
                        help="inputs per scale group, or 'none' (per channel) (default 64)")
    parser.add_argument("--transform", choices=["rtn", "splitquant", "ocs"], default=S, help="format (default rtn)")
    parser.add_argument("--splitquant-range", choices=["cluster", "aligned", "part"], default=S,
                        help="SplitQuant: grid range per cluster (default cluster)")
    parser.add_argument("--ocs-expand-ratio", type=float, default=S,
                        help="OCS: fraction of input channels duplicated (default 0.05)")
    parser.add_argument("--ocs-split", choices=["auto", "qa", "naive"], default=S,
                        help="OCS: quantization-aware or plain halves (auto: per layer, the one with the smaller error)")
    parser.add_argument("--ocs-layout", choices=["source_group", "appended"], default=S,
                        help="OCS: copies on their source group's grid (format version 2) or appended (version 1)")
    parser.add_argument("--clip", choices=["mse"], default=S, help="search each group's clipping range (RTN, OCS)")
    parser.add_argument("--input-rotation", type=int, default=S, metavar="BLOCK",
                        help="store W R and rotate the inputs by Hadamard blocks of this size (e.g. 64; RTN, format "
                             "version 5); pays with --rounding gptq")
    parser.add_argument("--bit-allocation", choices=["mixquant", "coding_length", "coding_length_inputs", "sensitivity"], default=S,
                        help="per-layer bit widths (needs --target-bits; the last two need --rounding and calibration data)")
    parser.add_argument("--target-bits", type=float, default=S,
                        help="with --bit-allocation: average bits per weight, overheads included")
    parser.add_argument("--mixquant-qem", type=float, default=S,
                        help="MixQuant error multiplier (no --target-bits; default 300)")
    parser.add_argument("--mixquant-candidates", type=int, nargs="+", default=S, metavar="BITS")
    parser.add_argument("--symmetric", action="store_true", default=S)
    parser.add_argument("--scale-dtype", choices=["float16", "float32"], default=S, help="(default float16)")
    parser.add_argument("--modules-to-not-convert", nargs="*", default=S, metavar="NAME")
    parser.add_argument("--seed", type=int, default=S, help="(default 0)")
    parser.add_argument("--embedding-bits", type=int, default=S, choices=range(2, 9), metavar="{2..8}",
                        help="also pack the input embedding and the output head at this width (format version 3)")
    parser.add_argument("--rounding", choices=["gptq", "attention_round"], default=S,
                        help="choose the codes on calibration data (gptq: error feedback on output-aware clipped grids)")
    parser.add_argument("--calibration-data", metavar="FILE", default=None,
                        help="local .txt (a sample per line), .json/.jsonl or .csv (a 'text' column) for --rounding")
    parser.add_argument("--num-samples", type=int, default=1024, help="calibration samples drawn from FILE (seeded)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"tokens per calibration sample (longer ones are cut; default {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"calibration samples per forward pass (default {DEFAULT_BATCH_SIZE})")
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


def quantize_config(args: argparse.Namespace) -> Any:
    """The ``SplitQuantConfig`` of parsed ``quantize`` options: ``--recipe``'s settings (or the defaults of
    :data:`CONFIG_DEFAULTS`) with the quantization options given on the command line replacing single settings."""
    from .. import SplitQuantConfig

    given = {name: getattr(args, name) for name in CONFIG_DEFAULTS if hasattr(args, name)}
    settings = given if args.recipe else {**CONFIG_DEFAULTS, **given}
    if "transform" in settings:
        settings["transform"] = None if settings["transform"] == "rtn" else settings["transform"]
    if settings.get("mixquant_candidates", ...) is None:
        del settings["mixquant_candidates"]  # the config's own candidates
    if args.recipe:
        return SplitQuantConfig.recipe(args.recipe, **settings)
    return SplitQuantConfig(**settings)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run ``hf-splitquant quantize``: quantize, save (optionally with a card, or push), print the report."""
    import torch
    from transformers import AutoTokenizer

    from .. import format_report, quantization_report
    from ..saving import save_quantized

    config = quantize_config(args)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: {output} already exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cls = model_class(args.model, args.task)
    start = time.perf_counter()
    if config.rounding or args.calibration_data:  # needs data: load in float, then calibrate
        from ..calibration import quantize_from_file

        model = quantize_from_file(cls, args.model, config, args.calibration_data, num_samples=args.num_samples,
                                   batch_size=args.batch_size, max_length=args.max_length,
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
