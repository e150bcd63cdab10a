"""Packed embeddings and head (``SplitQuantConfig(embedding_bits=...)``) and stored codes not kept twice:
quality cost and resident memory on SmolLM2-135M (offline assets).

For RTN int4 (group size 64, asymmetric, fp16 scales) with the embedding / tied head in float, int8 and
int4 it reports:

* perplexity on ``--eval-blocks`` x ``--eval-len`` tokens of the Wikipedia ``"eval"`` part (float32
  activations, the exact reference path; ``bench_calibration.py``'s ``load_smollm2`` and ``perplexity``);
* resident bytes of the bf16 model while decoding (:func:`hf_splitquant.speed.resident_bytes`: every
  parameter and buffer plus the int4 kernel layouts, after a few batch-1 decode steps built them), with
  the stored codes dropped (the default) and kept (``PackedLinear.keep_stored_codes = True``), against the
  bf16 float model; and the stored bytes of the packed layers (``quantization_report``).

No timings: resident bytes are counted from the tensors, not sampled. Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_embeddings.py [--eval-blocks 8 --eval-len 512] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_calibration import load_smollm2, log, perplexity  # noqa: E402

MB = 1e6


def decode_resident(model: torch.nn.Module, ids: torch.Tensor, steps: int = 4) -> int:
    """Resident bytes of ``model`` (bf16) after ``steps`` batch-1 greedy decode steps on ``ids``."""
    from hf_splitquant.speed import resident_bytes

    with torch.inference_mode():
        model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return resident_bytes(model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import hf_splitquant
    from hf_splitquant import SplitQuantConfig, quantization_report
    from hf_splitquant.nn.packed_linear import PackedLinear
    from hf_splitquant.speed import tensor_bytes

    torch.set_num_threads(args.threads)
    _, blocks, float_model = load_smollm2(args.eval_blocks, args.eval_len)
    prompt = blocks[:1, :16]
    rows: list[dict[str, Any]] = []
    log("float")
    rows.append({"config": "float", "perplexity": perplexity(float_model, blocks),
                 "resident_mb_bf16": tensor_bytes(copy.deepcopy(float_model).to(torch.bfloat16)) / MB})
    for embedding_bits in (None, 8, 4):
        label = f"RTN int4 g64, embedding {'float' if embedding_bits is None else f'int{embedding_bits}'}"
        log(label)
        row: dict[str, Any] = {"config": label, "embedding_bits": embedding_bits}
        for keep in (False, True):
            config = SplitQuantConfig(bits=4, group_size=64, embedding_bits=embedding_bits)
            model = hf_splitquant.quantize(copy.deepcopy(float_model), config, progress=False)
            if not keep:
                report = quantization_report(model)
                row["packed_layers_stored_mb"] = report.packed_bytes / MB
                row["packed_bits_per_weight"] = report.bits_per_weight
                row["perplexity"] = perplexity(model, blocks)
                for module in model.modules():
                    if isinstance(module, PackedLinear):
                        module.set_weight_cache(False)
            PackedLinear.keep_stored_codes = keep
            try:
                resident = decode_resident(model.to(torch.bfloat16), prompt)
            finally:
                PackedLinear.keep_stored_codes = False
            row["resident_mb_codes_kept" if keep else "resident_mb"] = resident / MB
            del model
        rows.append(row)
        log(json.dumps(row))
    return {"eval_blocks": args.eval_blocks, "eval_len": args.eval_len, "threads": args.threads,
            "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args)
    bf16 = result["rows"][0]["resident_mb_bf16"]
    print("| config | perplexity | resident MB while decoding (bf16) | x bf16 model | codes kept too (MB) |")
    print("|---|---|---|---|---|")
    print(f"| float | {result['rows'][0]['perplexity']:.2f} | {bf16:.0f} | 1.00 | - |")
    for row in result["rows"][1:]:
        print(f"| {row['config']} | {row['perplexity']:.2f} | {row['resident_mb']:.1f} | "
              f"{row['resident_mb'] / bf16:.3f} | {row['resident_mb_codes_kept']:.1f} |")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
