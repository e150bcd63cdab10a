"""OCS copies on their source group's grid (format version 2) against the version 1 layout, on
SmolLM2-135M at INT3 g64 (expand ratio 0.05), by Wikipedia perplexity (8 x 512 eval tokens).

Usage::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_ocs_layout.py \
        --output benchmarks/results/ocs_layout_smollm2_int3_g64.json

Every model is evaluated on the exact (reference) kernel path, so the figures are the format's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import SplitQuantConfig
from hf_splitquant.evaluation import perplexity

CONFIGS = {
    "float": None,
    "rtn int3 g64": {"bits": 3, "group_size": 64},
    "ocs qa source_group int3 g64": {"ocs_split": "qa", "ocs_layout": "source_group"},
    "ocs qa appended int3 g64": {"ocs_split": "qa", "ocs_layout": "appended"},
    "ocs naive appended int3 g64": {"ocs_split": "naive", "ocs_layout": "appended"},
    "ocs naive source_group int3 g64": {"ocs_split": "naive", "ocs_layout": "source_group"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="JSON: {config: [perplexity, bits per weight]}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = assets.smollm2_path()
    blocks = assets.perplexity_token_blocks(AutoTokenizer.from_pretrained(path), 8, 512)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = {}
    with hf_splitquant.kernel_mode("reference"):
        for name, fields in CONFIGS.items():
            model, bpw = copy.deepcopy(base), 32.0
            if fields is not None:
                if "ocs_split" in fields:
                    fields = {"bits": 3, "group_size": 64, "transform": "ocs", "ocs_expand_ratio": 0.05, **fields}
                hf_splitquant.quantize(model, SplitQuantConfig(**fields), progress=False)
                bpw = hf_splitquant.quantization_report(model).bits_per_weight
            start = time.perf_counter()
            rows[name] = (round(perplexity(model, blocks)["perplexity"], 2), round(bpw, 3))
            print(f"| {name} | {rows[name][1]} | {rows[name][0]} | ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
