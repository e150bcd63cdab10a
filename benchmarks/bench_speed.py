"""Speed and memory of packed models against the float model, measured in one process.

    python benchmarks/bench_speed.py                      # SmolLM2 decoding + MiniLM encoding
    python benchmarks/bench_speed.py --quick              # a CI-sized smoke run

Every throughput is also given as a ratio against the fp32 model timed in the same run (and against
the bf16 model). Packed models are reloaded as a user would, with ``dtype="auto"`` (the checkpoint's
own dtype: bfloat16 for SmolLM2, float32 for MiniLM; ``--packed-dtype`` overrides it). bf16/fp16
activations take the fast paths of :mod:`hf_splitquant.kernels` (int4-kernel terms at few tokens,
bf16 dequantize + matmul at many); fp32 activations take the exact path (dequantize once per call to
fp32 + fp32 matmul). The path and number of kernel terms of each model's layers are printed.

Per packed model it also gives:

* ``quantize s/M``: seconds of the quantizing ``from_pretrained`` per million quantized weights
  (minus the float load's time);
* ``resident MB``: bytes of every parameter and buffer of the loaded model plus the kernel layouts
  it built while running (what the model holds in memory), next to the packed checkpoint's
  tensors (``packed MB``) and the float model's tensors.

Timing: the median of ``--repeats`` runs after a warm-up. Leave ``OMP_WAIT_POLICY`` at its default
on a quiet machine: with ``PASSIVE`` every small kernel call pays a thread wake-up (the int4 kernel
on a 576x576 layer: 79 us instead of 16 us).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    "rtn-int8-chan": dict(bits=8, group_size=None, symmetric=True),
    "splitquant-int2-g64": dict(bits=2, group_size=64, transform="splitquant"),
    "splitquant-int4-g64": dict(bits=4, group_size=64, transform="splitquant"),
    "ocs-int4-g64": dict(bits=4, group_size=64, transform="ocs", ocs_expand_ratio=0.02),
    "mixquant-3bpw-g64": dict(group_size=64, bit_allocation="mixquant", target_bits=3.0,
                              mixquant_candidates=[2, 3, 4]),
}
MB = 1e6


def _timeit(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up (builds the cached kernel layouts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _packed_layers(model: torch.nn.Module) -> list[hf_splitquant.PackedLinear]:
    return [m for m in model.modules() if isinstance(m, hf_splitquant.PackedLinear)]


def _kernels(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Layers per path for input ``x`` (``int4/6`` = int4 kernel, six terms)."""
    paths = Counter()
    for m in _packed_layers(model):
        path = m.kernel_for(x)
        if path == "int4":
            path = f"int4/{hf_splitquant.kernels.int4_terms(m.spec)}"
        paths[path] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(paths.items())) or "-"


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _resident_bytes(model: torch.nn.Module) -> int:
    """Tensors of the model plus the kernel layouts and dequantized caches its layers hold."""
    total = _tensor_bytes(model)
    for m in _packed_layers(model):
        if m._int4 is not None:
            total += m._int4.nbytes()
        if m._cached is not None:
            total += m._cached.numel() * m._cached.element_size()
    return total


def _float_rows(load, measure, model_name: str, unit_key: str) -> list[dict]:  # noqa: ANN001
    rows, base = [], None
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        start = time.perf_counter()
        model = load(dtype)
        load_s = time.perf_counter() - start
        value = measure(model)
        base = base or value
        rows.append({"model": model_name, "config": name, unit_key: value, "vs_fp32": value / base,
                     "bits_per_weight": 32.0 if name == "fp32" else 16.0, "kernels": "-", "load_s": load_s,
                     "resident_bytes": _resident_bytes(model)})
        print(f"{model_name} {name}: {value:.2f}", flush=True)
        del model
    return rows


def _packed_rows(args: argparse.Namespace, path: Path, auto, measure, probe: torch.Tensor,  # noqa: ANN001
                 model_name: str, unit_key: str, float_load_s: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            start = time.perf_counter()
            model = auto.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[name]),
                                         dtype=torch.float32)
            quantize_s = time.perf_counter() - start - float_load_s
            report = quantization_report(model)
            model.save_pretrained(Path(tmp) / name)
            del model
            model = auto.from_pretrained(Path(tmp) / name, dtype=args.packed_dtype).eval()
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            value = measure(model)
            rows.append({"model": model_name, "config": name, unit_key: value, "bits_per_weight": report.bits_per_weight,
                         "dtype": str(dtype).replace("torch.", ""),
                         "quantize_s": quantize_s, "quantize_s_per_million": quantize_s / (report.num_weights / 1e6),
                         "packed_bytes": report.packed_bytes, "resident_bytes": _resident_bytes(model),
                         "kernels": _kernels(model, probe.to(dtype))})
            print(f"{model_name} {name}: {value:.2f}", flush=True)
            del model
    return rows


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

    rows = _float_rows(lambda dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(),
                       tokens_per_second, "smollm2", "throughput")
    probe = torch.zeros(1, 1, 576, dtype=torch.bfloat16)
    return rows + _packed_rows(args, path, AutoModelForCausalLM, tokens_per_second, probe, "smollm2", "throughput",
                               rows[0]["load_s"])


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

    rows = _float_rows(lambda dtype: AutoModel.from_pretrained(path, dtype=dtype).eval(),
                       sentences_per_second, "minilm", "throughput")
    probe = torch.zeros(args.batch, batch["input_ids"].shape[1], 384, dtype=torch.bfloat16)
    return rows + _packed_rows(args, path, AutoModel, sentences_per_second, probe, "minilm", "throughput",
                               rows[0]["load_s"])


def table(rows: list[dict], batch: int) -> str:
    lines = ["| model | config | activations | bits/weight | throughput | vs fp32 | vs bf16 | resident MB | quantize s/M "
             "| layer paths |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("smollm2", "minilm"):
        group = [r for r in rows if r["model"] == model]
        if not group:
            continue
        unit = "tok/s" if model == "smollm2" else "sent/s"
        fp32 = next(r["throughput"] for r in group if r["config"] == "fp32")
        bf16 = next(r["throughput"] for r in group if r["config"] == "bf16")
        for r in group:
            per_m = f"{r['quantize_s_per_million']:.2f}" if "quantize_s_per_million" in r else "-"
            dtype = r.get("dtype", {"fp32": "float32", "bf16": "bfloat16"}.get(r["config"], "-"))
            lines.append(f"| {model} | {r['config']} | {dtype} | {r['bits_per_weight']:.2f} | {r['throughput']:.2f} {unit} | "
                         f"{r['throughput'] / fp32:.2f}x | {r['throughput'] / bf16:.2f}x | "
                         f"{r['resident_bytes'] / MB:.0f} | {per_m} | {r['kernels']} |")
    lines.append("")
    lines.append(f"smollm2: batch-1 greedy decoding; minilm: one batch of {batch} sentences (max 128 tokens).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "minilm", "all"], default="all")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packed-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="dtype of the reloaded packed models (auto = the checkpoint's own)")
    parser.add_argument("--quick", action="store_true", help="MiniLM only, two configs, one repeat")
    parser.add_argument("--output", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.model, args.configs, args.repeats, args.batch = "minilm", ["rtn-int4-g64", "splitquant-int2-g64"], 1, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "load_avg_before": os.getloadavg(),
            "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats}
    start = time.perf_counter()
    rows = []
    if args.model in ("smollm2", "all"):
        rows += decode_benchmark(args)
    if args.model in ("minilm", "all"):
        rows += encode_benchmark(args)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_avg_after"] = os.getloadavg()
    print()
    print(table(rows, args.batch))
    print(f"\n{meta}")
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
