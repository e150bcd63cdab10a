"""Resident memory of the packed layers against their stored bytes (issue 16: "packed layers cost their stored
bits plus at most 5%").

SmolLM2-135M quantized on load (bf16, heads left in bf16), one 4-token forward pass (it builds the int4 layouts and
drops the stored tensors the layouts give back), then, summed over the packed layers: what they hold
(:func:`hf_splitquant.speed.resident_bytes`: buffers plus int4 layouts) against what the format stores
(``stored_bytes``: codes, scales, zero points). Sizes, not times: the machine's load does not matter.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_resident_layers.py [--bits 4] [--group-sizes 64 32 128] [--output F.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

import splitquant_assets as assets  # noqa: E402
from hf_splitquant import SplitQuantConfig  # noqa: E402
from hf_splitquant.methods import get_format  # noqa: E402
from hf_splitquant.modeling import iter_packed_modules  # noqa: E402
from hf_splitquant.speed import resident_bytes  # noqa: E402


def packed_layer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(resident, stored)`` bytes summed over the model's packed layers."""
    resident = stored = 0
    for _, module in iter_packed_modules(model):
        resident += resident_bytes(module)
        stored += get_format(module.spec).stored_bytes(module.spec)
    return resident, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32, 128])
    parser.add_argument("--output", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = assets.smollm2_path()
    rows = []
    for group in args.group_sizes:
        config = SplitQuantConfig(bits=args.bits, group_size=group)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16).eval()
        with torch.inference_mode():
            model(torch.arange(5, 9).unsqueeze(0))
        resident, stored = packed_layer_bytes(model)
        rows.append({"bits": args.bits, "group_size": group, "resident_mb": resident / 1e6,
                     "stored_mb": stored / 1e6, "ratio": resident / stored})
    lines = ["| RTN, SmolLM2-135M packed layers | resident MB | stored MB | resident / stored |", "|---|---|---|---|"]
    lines += [f"| int{r['bits']} g{r['group_size']} | {r['resident_mb']:.2f} | {r['stored_mb']:.2f} | {r['ratio']:.4f}x |"
              for r in rows]
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
