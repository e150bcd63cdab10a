"""Calibrated rounding on all-MiniLM-L6-v2 (a sentence-embedding BertModel): round to nearest, GPTQ, and GPTQ
with block-wise tuning, at equal bits per weight, scored by the mean cosine similarity between the quantized
and the float model's sentence embeddings (mean pooling, L2-normalised) on 300 held-out sentences.

Calibration: ``--cal-sentences`` (default 64) other sentences of ``splitquant_assets.embedding_sentences``
(sentences 300 onwards: disjoint from the evaluated ones), up to 128 tokens, batches of ``--batch-size``.
Each row runs in this process on a fresh copy of the float model::

    python benchmarks/bench_calibration_minilm.py --bits 2 3 --output benchmarks/results/calibration_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gptq+bt"], choices=["rtn", "gptq", "gptq+bt"])
    parser.add_argument("--block-tuning", default="{}", help="gptq+bt: block_tuning options as JSON")
    parser.add_argument("--cal-sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=300, help="evaluated sentences (default 300)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "calibration_minilm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_splitquant
    import splitquant_assets as assets

    hf_logging.set_verbosity_error()
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    everything = assets.embedding_sentences()
    evaluated = everything[: args.sentences]
    calibration = everything[300 : 300 + args.cal_sentences]
    reference = assets.mean_pooled_embeddings(base, tokenizer, evaluated)
    rows = []
    print(f"all-MiniLM-L6-v2; cosine to float on {len(evaluated)} sentences; calibration {len(calibration)} other "
          f"sentences, batch {args.batch_size}; group {args.group_size}; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| config | bits/weight | mean cosine | min cosine | quantize seconds |")
    print("|---|---|---|---|---|")
    for bits in args.bits:
        for method in args.methods:
            model = copy.deepcopy(base)
            settings = {"bits": bits, "group_size": args.group_size}
            if method != "rtn":
                settings["rounding"] = "gptq"
            if method == "gptq+bt":
                settings["block_tuning"] = json.loads(args.block_tuning)
            config = hf_splitquant.SplitQuantConfig(**settings)
            started = time.perf_counter()
            if config.rounding is None:
                hf_splitquant.quantize(model, config, progress=False)
            else:
                hf_splitquant.quantize(model, config, calibration_data=calibration, tokenizer=tokenizer,
                                       batch_size=args.batch_size, max_length=128, progress=False)
            seconds = time.perf_counter() - started
            cos = (assets.mean_pooled_embeddings(model, tokenizer, evaluated) * reference).sum(dim=1)
            row = {"method": method, "bits": bits, "group_size": args.group_size, "settings": settings,
                   "bits_per_weight": hf_splitquant.quantization_report(model).bits_per_weight,
                   "cosine": float(cos.mean()), "cosine_min": float(cos.min()), "quantize_seconds": seconds,
                   "blocks": getattr(model, "calibration_report", {}).get("blocks")}
            rows.append(row)
            print(f"| INT{bits} g{args.group_size} {method} | {row['bits_per_weight']:.3f} | {row['cosine']:.4f} | "
                  f"{row['cosine_min']:.4f} | {seconds:.0f} |", flush=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "load_average": os.getloadavg(), "cal_sentences": len(calibration), "sentences": len(evaluated)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
