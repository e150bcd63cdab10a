"""Which tokens carry a calibrated model's error, block by block: float vs quantized hidden states per token on
the held-out calibration samples of SmolLM2-135M (the last 4 of the 16 x 512 'calibration' blocks).

Finds, for each block output, the three tokens with the largest squared error and prints their hidden-state
norms in both models (a token whose quantized norm is far above the float one has become a spurious "massive
activation" / attention sink)::

    python benchmarks/study_block_outputs.py --blocks 13 --bits 3 --group-size 128

The model is cut to its first ``--blocks`` blocks and calibrated with GPTQ (library defaults, batches of 2).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration import load_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=13)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounding-options", default=None, help="GPTQ options as JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import hf_splitquant
    import splitquant_assets as assets

    tokenizer, _, model = load_smollm2(1, 16)
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    reference = copy.deepcopy(model)
    cal = assets.perplexity_token_blocks(tokenizer, 16, 512, part="calibration")
    options = json.loads(args.rounding_options) if args.rounding_options else None
    config = hf_splitquant.SplitQuantConfig(bits=args.bits, group_size=args.group_size, rounding="gptq",
                                            rounding_options=options)
    hf_splitquant.calibrate(model, config, cal, batch_size=2, progress=False)
    ids = cal[12:]  # the held-out batches (the last 2 of 8 batches of 2)
    with torch.no_grad():
        a = reference(input_ids=ids, output_hidden_states=True).hidden_states
        b = model(input_ids=ids, output_hidden_states=True).hidden_states
    print(f"SmolLM2-135M, first {args.blocks} blocks, GPTQ INT{args.bits} g{args.group_size}; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| output of block | mean error per token | top errors | (sample, position) | float norms | quantized norms "
          "| tokens |")
    print("|---|---|---|---|---|---|---|")
    for index in range(1, len(a)):  # hidden_states[k] is block k-1's output (the last one after the final norm)
        error = (a[index] - b[index]).pow(2).sum(-1)
        values, flat = error.flatten().topk(3)
        where = [(int(j) // ids.shape[1], int(j) % ids.shape[1]) for j in flat]
        name = index - 1 if index < len(a) - 1 else f"{index - 1} (+ final norm)"
        print(f"| {name} | {float(error.mean()):.1f} | {[round(float(v)) for v in values]} | {where} | "
              f"{[round(float(a[index][s, t].norm())) for s, t in where]} | "
              f"{[round(float(b[index][s, t].norm())) for s, t in where]} | "
              f"{[tokenizer.decode([int(ids[s, t])]) for s, t in where]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
