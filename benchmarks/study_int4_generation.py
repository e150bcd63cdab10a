"""Why does int4 beam search repeat itself on SmolLM2-135M: the kernel or the format?

    python benchmarks/study_int4_generation.py --output benchmarks/results/int4_generation.json \
        > benchmarks/results/int4_generation.md

1. Fidelity to the fp32 float model (mean KL divergence per token, top-1 agreement) on 8 x 128
   Wikipedia tokens, forward passes of 128 tokens (within the int4 kernel's range), for RTN int4
   (g64 and g32) computed four ways: the exact reference path (dequantize to fp32, fp32 matmul), a
   float model holding the dequantized weights (fp32 and bf16), the int4 kernel on an fp32 model
   (bf16 compute inside) and on a bf16 model; plus the float model in bf16 as the yardstick of bf16
   rounding, the KL of the int4 kernel to the exact format itself, and RTN int5 / int8 g64.
2. Beam search (``num_beams=2``, 30 new tokens, greedy) on six prompts: the fraction of repeated
   3-grams in each continuation, for the float model, the packed model on the int4 kernel and the
   dequantized float model.

If the kernel added the damage, its KL to the format would be large next to the float model's own
bf16 rounding, and the dequantized float model would not repeat itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant.kernels import kernel_mode
from hf_splitquant.metrics.functional import kl_divergence, top1_agreement
from hf_splitquant.speed import format_conditions, machine_conditions

PROMPTS = ["The ocean is", "Tell me about the ocean.", "The history of Rome", "My favourite food is",
           "Photosynthesis is the process", "The best way to learn a language is"]


def repeated_3grams(ids: list[int]) -> float:
    """Share of the 3-grams of ``ids`` that already occurred earlier in it."""
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    return 1 - len(set(grams)) / max(1, len(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    start = time.perf_counter()
    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    blocks = assets.perplexity_token_blocks(tok, args.blocks, 128, "eval")

    def logits(model: torch.nn.Module, mode: str = "auto") -> torch.Tensor:
        with kernel_mode(mode), torch.inference_mode():
            return torch.cat([model(b[None]).logits[0].float() for b in blocks])

    def load(dtype: torch.dtype, group: int | None = None, bits: int = 4) -> torch.nn.Module:
        config = None if group is None else hf_splitquant.SplitQuantConfig(bits=bits, group_size=group)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config).eval()

    fidelity: list[dict] = []
    reference = logits(load(torch.float32))

    def row(name: str, values: torch.Tensor, against: torch.Tensor = reference) -> None:
        fidelity.append({"model": name, "kl": kl_divergence(against, values).mean().item(),
                         "top1": top1_agreement(against, values).mean().item()})
        print(f"{name}: KL {fidelity[-1]['kl']:.5f}", flush=True)

    row("float, bf16", logits(load(torch.bfloat16)))
    for group in (64, 32):
        packed = load(torch.float32, group)
        exact = logits(packed, "reference")
        row(f"RTN int4 g{group}: reference path, fp32 (the format exactly)", exact)
        kernel = logits(packed, "auto")
        row(f"RTN int4 g{group}: int4 kernel, fp32 model (bf16 inside)", kernel)
        row(f"RTN int4 g{group}: int4 kernel against the format itself", kernel, exact)
        row(f"RTN int4 g{group}: int4 kernel, bf16 model", logits(load(torch.bfloat16, group)))
        dequantized = packed.dequantize()
        row(f"RTN int4 g{group}: dequantized float model, fp32", logits(dequantized))
        row(f"RTN int4 g{group}: dequantized float model, bf16", logits(dequantized.to(torch.bfloat16)))
        del packed, dequantized
    for bits in (5, 8):  # more bits, same group size
        row(f"RTN int{bits} g64: reference path, fp32 (the format exactly)", logits(load(torch.float32, 64, bits), "reference"))

    beams: list[dict] = []

    def generate(name: str, model: torch.nn.Module) -> None:
        outputs = {}
        for prompt in PROMPTS:
            enc = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, num_beams=2)
            ids = out[0][enc.input_ids.shape[1]:].tolist()
            outputs[prompt] = {"repeated_3grams": repeated_3grams(ids), "text": tok.decode(ids)}
        mean = sum(o["repeated_3grams"] for o in outputs.values()) / len(outputs)
        beams.append({"model": name, "mean_repeated_3grams": mean, "outputs": outputs})
        print(f"{name}: repeated 3-grams {mean:.3f}", flush=True)

    generate("float, fp32", load(torch.float32))
    packed = load(torch.float32, 64)
    generate("RTN int4 g64, packed on the int4 kernel (fp32 model)", packed)
    generate("RTN int4 g64, dequantized float model (fp32)", packed.dequantize())
    generate("RTN int4 g32, packed on the int4 kernel (fp32 model)", load(torch.float32, 32))

    conditions = machine_conditions(args.threads)
    print("\n| model | KL to fp32 float (nats/token) | top-1 agreement |\n|---|---|---|")
    for r in fidelity:
        print(f"| {r['model']} | {r['kl']:.5f} | {r['top1']:.3f} |")
    print(f"\n{args.blocks} x 128 Wikipedia 'eval' tokens, one forward pass per block (the int4 kernel's range).")
    print("\n| model (num_beams=2) | mean repeated 3-grams | " + " | ".join(f"`{p}`" for p in PROMPTS) + " |")
    print("|---|---|" + "---|" * len(PROMPTS))
    for b in beams:
        cells = " | ".join(f"{o['repeated_3grams']:.2f}" for o in b["outputs"].values())
        print(f"| {b['model']} | {b['mean_repeated_3grams']:.3f} | {cells} |")
    print("\nContinuations:\n")
    for b in beams:
        print(f"- {b['model']}:")
        for prompt, o in b["outputs"].items():
            print(f"  - `{prompt}` -> {json.dumps(o['text'])}")
    print(f"\nconditions: {format_conditions(conditions)}; wall {time.perf_counter() - start:.0f} s")
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": {"conditions": conditions, "python": platform.python_version(),
                                                          "blocks": args.blocks, "new_tokens": args.new_tokens},
                                                 "fidelity": fidelity, "beam_search": beams}, indent=2))


if __name__ == "__main__":
    main()
