"""What dropping the stored codes costs in time: packed models that keep their stored codes next to the int4
layout (``PackedLinear.keep_stored_codes = True``, the behaviour before format-independent read-back) against
the default (codes dropped once the layout reads them back exactly), and the bf16 float model, interleaved in
one process.

Workloads, each where the layers take a different path:

* SmolLM2-135M batch-1 greedy decoding (few tokens per call: the int4 kernel; the codes are not read);
* SmolLM2-135M prefill of one 512-token prompt (many tokens: dequantize once per call, now from the layout);
* all-MiniLM-L6-v2 encoding of 32 sentences (many tokens, the same).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_stored_codes.py [--threads 2] [--repeats 5]

Run it on an otherwise idle machine; the conditions (threads, CPU, load average before/after) are printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

import splitquant_assets as assets  # noqa: E402
from hf_splitquant import PackedLinear, SplitQuantConfig  # noqa: E402
from hf_splitquant.speed import format_conditions, interleaved_throughput, machine_conditions, resident_bytes  # noqa: E402


def packed_pair(path: str, auto: type, tmp: str, config: SplitQuantConfig) -> list[torch.nn.Module]:
    """The same packed checkpoint loaded twice in bf16: stored codes kept, and dropped (the default)."""
    folder = Path(tmp) / Path(path).name
    auto.from_pretrained(path, quantization_config=config, dtype=torch.float32).save_pretrained(folder)
    kept = auto.from_pretrained(folder, dtype=torch.bfloat16).eval()
    for module in kept.modules():
        if isinstance(module, PackedLinear):
            module.keep_stored_codes = True
    return [kept, auto.from_pretrained(folder, dtype=torch.bfloat16).eval()]


def report(name: str, unit: str, models: list[torch.nn.Module], run, units: int, repeats: int) -> None:  # noqa: ANN001
    timings = interleaved_throughput(models, run, units, repeats)
    bf16 = timings[0].units_per_s
    for label, model, timing in zip(("bf16 float", "int4 g64, codes kept", "int4 g64, codes dropped"), models, timings):
        print(f"| {name} | {label} | {timing.units_per_s:.2f} {unit} | {timing.units_per_s / bf16:.2f}x | "
              f"{resident_bytes(model) / 1e6:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    before = machine_conditions(args.threads)
    config = SplitQuantConfig(bits=4, group_size=64)
    print("| workload | model | throughput | vs bf16 | resident MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = assets.smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
                  *packed_pair(path, AutoModelForCausalLM, tmp, config)]
        prompt = tokenizer(assets.wikipedia_split("eval")[0][:200], return_tensors="pt").input_ids[:, :32]
        long_prompt = assets.perplexity_token_blocks(tokenizer, 1, 512, part="eval")

        def decode(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)

        def prefill(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model(long_prompt)

        report("SmolLM2 decode, batch 1", "tok/s", models, decode, 32, args.repeats)
        report("SmolLM2 prefill, 512 tokens", "tok/s", models, prefill, 512, args.repeats)
        del models

        path = assets.minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        batch = tokenizer(assets.embedding_sentences(32), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        models = [AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval(), *packed_pair(path, AutoModel, tmp, config)]

        def encode(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model(**batch)

        report("MiniLM, 32 sentences", "sent/s", models, encode, 32, args.repeats)
    print("\n" + format_conditions(before, machine_conditions(args.threads)))


if __name__ == "__main__":
    main()
