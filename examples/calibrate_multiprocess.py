"""Attention Round calibration of a causal LM on several CPU processes, then a packed save.

Every process takes a shard of the calibration batches; the layer statistics are summed exactly
across processes, so the packed checkpoint is bit-identical to a one-process run with the same
``--batch-size`` (and the same number of torch threads per process). Only the main process saves.

Launch (2 CPU processes, gloo)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node 2 examples/calibrate_multiprocess.py \\
        --output out/smollm2-ar-int3 --bits 3

    # seconds-long check on a tiny Llama (SmolLM2's tokenizer, random weights)
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node 2 examples/calibrate_multiprocess.py \\
        --smoke --output out/smoke-ar

(``accelerate launch --cpu --num_processes 2`` silently starts one process; use ``torchrun``.) Without
``torchrun`` (plain ``python``) it runs as one process. Calibration text: paragraphs of the
Wikipedia ``"calibration"`` part of :mod:`splitquant_assets` (``assets/`` in the repository) (disjoint from the ``"eval"`` part).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, gather_object  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_splitquant  # noqa: E402
import splitquant_assets as assets  # noqa: E402
from hf_splitquant import save_quantized  # noqa: E402


def calibration_paragraphs(min_chars: int = 200) -> datasets.Dataset:
    """Paragraphs (at least ``min_chars`` characters) of the Wikipedia calibration articles."""
    texts = [p for article in assets.wikipedia_split("calibration") for p in article.split("\n") if len(p) >= min_chars]
    return datasets.Dataset.from_dict({"text": texts})


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A 2-block Llama with random weights (seed 0, so every process builds the same): the ``--smoke`` model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def rounding_options(args: argparse.Namespace) -> dict | None:
    """``--rounding-options`` (JSON) plus ``--iterations`` for Attention Round."""
    options = json.loads(args.rounding_options) if args.rounding_options else {}
    if args.iterations is not None:
        if args.rounding != "attention_round":
            raise SystemExit("--iterations is an Attention Round option; use --rounding attention_round")
        options["iterations"] = args.iterations
    return options or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="float causal-LM folder (default: SmolLM2-135M from assets)")
    parser.add_argument("--output", "-o", required=True, help="folder for the packed checkpoint")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--transform", choices=["rtn", "splitquant", "ocs"], default="rtn")
    parser.add_argument("--bit-allocation", choices=["mixquant", "coding_length", "coding_length_inputs", "sensitivity"], default=None)
    parser.add_argument("--target-bits", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="default 128 (--smoke: 16)")
    parser.add_argument("--max-length", type=int, default=None, help="default 256 (--smoke: 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounding", choices=["attention_round", "gptq"], default="attention_round")
    parser.add_argument("--rounding-options", default=None,
                        help='rounding options as JSON, e.g. \'{"target": "float"}\' (see SplitQuantConfig)')
    parser.add_argument("--activation-scaling", action="store_true",
                        help="scale the inputs of the layers a norm feeds before the rounding (RTN format only; see "
                             "SplitQuantConfig.activation_scaling)")
    parser.add_argument("--block-tuning", default=None,
                        help='block-wise tuning after the rounding, options as JSON ("{}" for the defaults), e.g. '
                             '\'{"epochs": 4}\' (RTN format only; see SplitQuantConfig.block_tuning)')
    parser.add_argument("--iterations", type=int, default=None,
                        help="Attention Round steps per layer (default: the library's; --smoke: 10)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run: a tiny random Llama (unless --model), 16 samples of 64 tokens, 10 steps")
    parser.add_argument("--report-json", default=None, help="also write the calibration report (per-layer objective)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    smoke = {"num_samples": 16, "max_length": 64, "iterations": 10} if args.smoke else {"num_samples": 128,
                                                                                       "max_length": 256}
    if args.rounding != "attention_round":
        smoke.pop("iterations", None)
    for key, value in smoke.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    # cpu=True: on a CPU machine torchrun's processes then join a gloo process group
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(even_batches=False))
    tokenizer = AutoTokenizer.from_pretrained(args.model or assets.smollm2_path())
    if args.model is None and args.smoke:
        model = tiny_llama(len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model or assets.smollm2_path(), dtype=torch.float32)

    model.to(accelerator.device)
    config = hf_splitquant.SplitQuantConfig(
        bits=args.bits, group_size=args.group_size, transform=None if args.transform == "rtn" else args.transform,
        bit_allocation=args.bit_allocation, target_bits=args.target_bits, rounding=args.rounding,
        rounding_options=rounding_options(args),
        block_tuning=json.loads(args.block_tuning) if args.block_tuning is not None else None,
        activation_scaling=args.activation_scaling,
    )
    hf_splitquant.quantize(model, config, calibration_data=calibration_paragraphs(), tokenizer=tokenizer,
                           num_samples=args.num_samples, max_length=args.max_length, batch_size=args.batch_size,
                           accelerator=accelerator)
    digests = gather_object([state_digest(model)])
    status = 0
    if accelerator.is_main_process:
        report = model.calibration_report
        agree = len(set(digests)) == 1
        save_quantized(model, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
        print(f"processes: {accelerator.num_processes}; samples: {report['num_samples']}; "
              f"calibration: {report['seconds']:.1f} s; memory +{report['memory_increase_mb']:.0f} MB; "
              f"mean layer MSE vs round-to-nearest: {report['mean_mse_ratio']:.3f}")
        print(f"processes hold identical packed weights: {agree} (sha256 {digests[0][:16]})")
        print(f"saved to {args.output}")
        if args.report_json:
            Path(args.report_json).write_text(json.dumps(report, indent=2))
        if not agree:
            status = 1
    accelerator.wait_for_everyone()
    # tear the process group down here, not in the interpreter's exit (where a worker once aborted with
    # "terminate called without an active exception" after a successful run)
    accelerator.end_training()
    return status


if __name__ == "__main__":
    sys.exit(main())
