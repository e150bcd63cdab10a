"""``hf-splitquant evaluate MODEL_DIR --task {embedding-fidelity,perplexity} --text-file FILE --reference FLOAT_DIR``.

The texts come from ``--text-file`` (read with :func:`hf_splitquant.evaluation.read_texts`: JSON
lines with a ``text`` field, or plain text with one text per line); for perplexity they are joined
and cut into ``--num-blocks`` x ``--block-len`` token blocks by the checkpoint's tokenizer
(:func:`hf_splitquant.evaluation.token_blocks_from_texts`). Needs the ``eval`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["add_evaluate_arguments", "cmd_evaluate", "format_result"]


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``evaluate`` (shared by ``hf-splitquant`` and ``optimum-cli splitquant``)."""
    from ..evaluation import TASKS

    parser.add_argument("model", help="folder of a packed checkpoint (written by save_pretrained)")
    parser.add_argument("--task", required=True, choices=TASKS,
                        help="embedding-fidelity: cosine of mean-pooled embeddings to the float model on the "
                             "texts; perplexity: causal-LM perplexity on token blocks cut from the texts (with "
                             "--reference also the float perplexity, KL divergence and top-1 agreement)")
    parser.add_argument("--text-file", metavar="FILE", default=None,
                        help="the evaluation texts (required): .jsonl/.json lines (a string or an object with a "
                             "'text' field each), or plain text with one text per line")
    parser.add_argument("--reference", metavar="FLOAT_DIR", default=None,
                        help="folder of the float model (required for embedding-fidelity)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the result as JSON to this file")
    parser.add_argument("--num-sentences", type=int, default=None,
                        help="embedding-fidelity: use the first N texts (default: all)")
    parser.add_argument("--num-blocks", type=int, default=8, help="perplexity: token blocks")
    parser.add_argument("--block-len", type=int, default=256, help="perplexity: tokens per block")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--write-card", action="store_true",
                        help="rewrite MODEL/README.md (the model card) with these results, keeping the old "
                             "card's title, metadata (base_model ...) and notes")
    parser.add_argument("--base-model", metavar="REPO", default=None, help="with --write-card: the card's base_model")
    return parser


def format_result(result: dict) -> str:
    """The result as text: a title line, then one line per metric (with the float value when known)."""
    lines = [f"{result.get('label', result['task'])}: {result['task']} on {result.get('dataset')}"]
    reference = result.get("reference_metrics") or {}
    for name, value in result["metrics"].items():
        ref = f"   (float: {reference[name]:.4f})" if name in reference else ""
        lines.append(f"  {name:<22} {value:.4f}{ref}")
    if result.get("bits_per_weight") is not None:
        lines.append(f"  bits per weight        {result['bits_per_weight']:.3f}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``hf-splitquant evaluate``: print the result; optionally write JSON and the model card."""
    from ..evaluation import evaluate_checkpoint, read_texts, write_json

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found; pass a folder written by save_pretrained")
    if args.task == "embedding-fidelity" and not args.reference:
        raise ValueError("--task embedding-fidelity needs --reference FLOAT_DIR (the float model to compare with)")
    if not args.text_file:
        raise ValueError("evaluate needs --text-file FILE: the evaluation texts (.jsonl lines with a 'text' field, "
                         "or plain text with one text per line); hf_splitquant ships no dataset")
    text_file = Path(args.text_file)
    texts = read_texts(text_file)
    kwargs = {"batch_size": args.batch_size, "texts": texts}
    if args.task == "embedding-fidelity":
        used = len(texts) if args.num_sentences is None else min(args.num_sentences, len(texts))
        kwargs.update(num_sentences=args.num_sentences, dataset=f"{used} texts from {text_file.name}")
    else:
        kwargs.update(num_blocks=args.num_blocks, block_len=args.block_len,
                      dataset=f"{text_file.name}, {args.num_blocks} blocks x {args.block_len} tokens")
    result = evaluate_checkpoint(model_dir, args.task, args.reference, **kwargs)
    print(format_result(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.write_card:
        from ..integrations.hub import build_model_card, read_card

        # the card written by `quantize --model-card` (or by hand) keeps its title and metadata
        card = build_model_card(model_dir, base_model=args.base_model, eval_results=result,
                                previous=read_card(model_dir / "README.md"))
        tmp = model_dir / ".README.md.tmp"
        card.save(tmp)
        os.replace(tmp, model_dir / "README.md")  # the card is replaced whole or not at all
        print(f"wrote {model_dir / 'README.md'}")
    logger.info(json.dumps(result))
    return 0
