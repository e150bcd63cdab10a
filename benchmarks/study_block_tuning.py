"""Block-wise tuning hyper-parameters on the first blocks of SmolLM2-135M: the error of each tuned block against
the float model's block output, on the fitted and on the held-out calibration batches.

Cheap (about 1-2 minutes per setting on 2 cores for 3 blocks), so settings can be compared before a full run::

    python benchmarks/study_block_tuning.py --blocks 3 --bits 2 --settings '{"epochs": 10}' '{"epochs": 20}'

The model is cut to its first ``--blocks`` decoder blocks (the head stays float); calibration: ``--samples`` x 512
Wikipedia 'calibration' tokens (default 16) in batches of 2 (16: 6 fitted, 2 held-out batches), GPTQ with the
library defaults first.
The figure to compare is the last block's held-out error (it includes what reached it from the blocks before).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration import load_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=None, help="default: 64 at 2 bits, else 128")
    parser.add_argument("--settings", nargs="+", default=["{}"], help="block_tuning options as JSON, one per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks of 512 tokens (default 16)")
    parser.add_argument("--input-rotation", type=int, default=None, help="SplitQuantConfig.input_rotation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import hf_splitquant
    import splitquant_assets as assets

    group = args.group_size or (64 if args.bits == 2 else 128)
    print(f"SmolLM2-135M, first {args.blocks} blocks, INT{args.bits} g{group}, GPTQ then block tuning; "
          f"{args.samples} x 512 calibration tokens, input_rotation={args.input_rotation}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}\n")
    print("| block_tuning | block | error fitted before -> after | error held out before -> after | seconds |")
    print("|---|---|---|---|---|")
    for text in args.settings:
        tokenizer, _, model = load_smollm2(1, 16)
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
        cal = assets.perplexity_token_blocks(tokenizer, args.samples, 512, part="calibration")
        config = hf_splitquant.SplitQuantConfig(bits=args.bits, group_size=group, rounding="gptq",
                                                input_rotation=args.input_rotation, block_tuning=json.loads(text))
        started = time.perf_counter()
        hf_splitquant.calibrate(model, config, cal, batch_size=2, progress=False)
        for b in model.calibration_report["blocks"]:
            print(f"| `{text}` | {b['block']} | {b['fitted_before']:.4g} -> {b['fitted_after']:.4g} | "
                  f"{b['heldout_before']:.4g} -> {b['heldout_after']:.4g} | {b['seconds']:.0f} |")
        print(f"<!-- {text}: {time.perf_counter() - started:.0f} s in all -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
