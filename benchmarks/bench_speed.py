"""Speed of packed models against the float model, measured in one process.

    python benchmarks/bench_speed.py                      # SmolLM2 decoding + MiniLM encoding
    python benchmarks/bench_speed.py --quick              # a CI-sized smoke run

Every figure is a ratio against the fp32 model timed in the same run (and the bf16 model is
listed too). Packed models are loaded with ``dtype=torch.bfloat16`` so that their layers take the
fast paths of :mod:`hf_splitquant.kernels` (int4 kernel for 2-4 bit RTN/OCS at few tokens, bf16
dequantize + matmul otherwise); the kernel each model's layers use is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import hf_splitquant
from hf_splitquant import SplitQuantConfig, assets, quantization_report

CONFIGS = {
    "rtn-int2-g64": dict(bits=2, group_size=64),
    "rtn-int3-g64": dict(bits=3, group_size=64),
    "rtn-int4-g64": dict(bits=4, group_size=64),
    "rtn-int8-g64": dict(bits=8, group_size=64),
    "splitquant-int2-g64": dict(bits=2, group_size=64, transform="splitquant"),
    "splitquant-int4-g64": dict(bits=4, group_size=64, transform="splitquant"),
    "ocs-int4-g64": dict(bits=4, group_size=64, transform="ocs", ocs_expand_ratio=0.02),
    "mixquant-3bpw-g64": dict(group_size=64, bit_allocation="mixquant", target_bits=3.0,
                              mixquant_candidates=[2, 3, 4]),
}


def _timeit(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up (builds cached kernel layouts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _kernels(model: torch.nn.Module, x: torch.Tensor) -> str:
    paths = Counter(m.kernel_for(x) for m in model.modules() if isinstance(m, hf_splitquant.PackedLinear))
    return ", ".join(f"{k}x{v}" for k, v in sorted(paths.items())) or "-"


def decode_benchmark(args: argparse.Namespace) -> list[dict]:
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(assets.wikipedia_split("eval")[0][:200], return_tensors="pt").input_ids[:, :32]

    def tokens_per_second(model: torch.nn.Module) -> float:
        def run() -> None:
            with torch.inference_mode():
                model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False)
        return args.new_tokens / _timeit(run, args.repeats)

    rows = []
    base = None
    for name, load in [("fp32", {"dtype": torch.float32}), ("bf16", {"dtype": torch.bfloat16})]:
        model = AutoModelForCausalLM.from_pretrained(path, **load).eval()
        tps = tokens_per_second(model)
        base = base or tps
        rows.append({"model": "smollm2", "config": name, "tokens_per_s": tps, "vs_fp32": tps / base,
                     "bits_per_weight": 32.0 if name == "fp32" else 16.0, "kernels": "-"})
        print(f"{name}: {tps:.2f} tok/s", flush=True)
        del model
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[name]))
            quantize_s = time.perf_counter() - start
            bpw = quantization_report(model).bits_per_weight
            model.save_pretrained(Path(tmp) / name)
            del model
            model = AutoModelForCausalLM.from_pretrained(Path(tmp) / name, dtype=torch.bfloat16).eval()
            tps = tokens_per_second(model)
            rows.append({"model": "smollm2", "config": name, "tokens_per_s": tps, "vs_fp32": tps / base,
                         "bits_per_weight": bpw, "quantize_s": quantize_s,
                         "kernels": _kernels(model, torch.zeros(1, 1, 576, dtype=torch.bfloat16))})
            print(f"{name}: {tps:.2f} tok/s ({tps / base:.2f}x fp32)", flush=True)
            del model
    return rows


def encode_benchmark(args: argparse.Namespace) -> list[dict]:
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = assets.embedding_sentences(args.batch)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def sentences_per_second(model: torch.nn.Module) -> float:
        def run() -> None:
            with torch.inference_mode():
                model(**batch)
        return args.batch / _timeit(run, args.repeats)

    rows = []
    base = None
    for name, load in [("fp32", {"dtype": torch.float32}), ("bf16", {"dtype": torch.bfloat16})]:
        model = AutoModel.from_pretrained(path, **load).eval()
        sps = sentences_per_second(model)
        base = base or sps
        rows.append({"model": "minilm", "config": name, "sentences_per_s": sps, "vs_fp32": sps / base,
                     "bits_per_weight": 32.0 if name == "fp32" else 16.0, "kernels": "-"})
        print(f"{name}: {sps:.1f} sentences/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            model = AutoModel.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[name]))
            bpw = quantization_report(model).bits_per_weight
            model.save_pretrained(Path(tmp) / name)
            model = AutoModel.from_pretrained(Path(tmp) / name, dtype=torch.bfloat16).eval()
            sps = sentences_per_second(model)
            rows.append({"model": "minilm", "config": name, "sentences_per_s": sps, "vs_fp32": sps / base,
                         "bits_per_weight": bpw,
                         "kernels": _kernels(model, torch.zeros(args.batch, 16, 384, dtype=torch.bfloat16))})
            print(f"{name}: {sps:.1f} sentences/s ({sps / base:.2f}x fp32)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "minilm", "all"], default="all")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, two configs, one repeat")
    parser.add_argument("--output", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.model, args.configs, args.repeats, args.batch = "minilm", ["rtn-int4-g64", "splitquant-int2-g64"], 1, 8
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    rows = []
    if args.model in ("smollm2", "all"):
        rows += decode_benchmark(args)
    if args.model in ("minilm", "all"):
        rows += encode_benchmark(args)
    print("\n| model | config | bits/weight | throughput | vs fp32 | vs bf16 | layer kernels |")
    print("|---|---|---|---|---|---|---|")
    for model in ("smollm2", "minilm"):
        group = [r for r in rows if r["model"] == model]
        if not group:
            continue
        key = "tokens_per_s" if model == "smollm2" else "sentences_per_s"
        unit = "tok/s (batch 1 greedy)" if model == "smollm2" else f"sent/s (batch {args.batch})"
        bf16 = next(r[key] for r in group if r["config"] == "bf16")
        for r in group:
            print(f"| {model} | {r['config']} | {r['bits_per_weight']:.2f} | {r[key]:.2f} {unit} | "
                  f"{r['vs_fp32']:.2f}x | {r[key] / bf16:.2f}x | {r['kernels']} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
