"""Speed and memory of packed models against the float model, measured in one process.

    python benchmarks/bench_speed.py                      # SmolLM2 decoding + MiniLM encoding
    python benchmarks/bench_speed.py --quick              # a CI-sized smoke run

Every throughput is also given as a ratio against the fp32 model timed in the same run (and against
the bf16 model). Packed models are reloaded with ``dtype=torch.bfloat16`` (``--packed-dtype float32``
for float32 activations). Few tokens per call take the int4-kernel terms of
:mod:`hf_splitquant.kernels` whatever the dtype; many tokens take bf16 dequantize + matmul (bf16
activations) or the exact path, dequantize once per call to fp32 + fp32 matmul (fp32 activations).
The path and number of kernel terms of each model's layers are printed.

Per packed model it also gives:

* ``load+quantize s/M``: seconds of the quantizing ``from_pretrained`` (reading the float checkpoint
  included) per million quantized weights;
* ``resident MB``: bytes of every parameter and buffer of the loaded model plus the kernel layouts
  it built while running (what the model holds in memory), next to the packed checkpoint's
  tensors (``packed MB``) and the float model's tensors.

Timing: every model is loaded first, warmed up once, then timed in ``--repeats`` interleaved
rounds (one run of each model per round, so slow drifts of the machine hit all alike); the median
round counts. Leave ``OMP_WAIT_POLICY`` at its default
on a quiet machine: with ``PASSIVE`` every small kernel call pays a thread wake-up (the int4 kernel
on a 576x576 layer: 79 us instead of 16 us).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import splitquant_assets as assets
from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.speed import (
    format_conditions,
    interleaved_throughput,
    kernel_paths,
    machine_conditions,
    resident_bytes,
)

CONFIGS = {
    "rtn-int2-g64": dict(bits=2, group_size=64),
    "rtn-int3-g64": dict(bits=3, group_size=64),
    "rtn-int4-g64": dict(bits=4, group_size=64),
    "rtn-int4-g64-rot64": dict(bits=4, group_size=64, input_rotation=64),  # Hadamard-rotated inputs
    "rtn-int8-g64": dict(bits=8, group_size=64),
    "rtn-int8-chan": dict(bits=8, group_size=None, symmetric=True),
    "splitquant-int2-g64": dict(bits=2, group_size=64, transform="splitquant"),
    "splitquant-int2-g64-aligned": dict(bits=2, group_size=64, transform="splitquant", splitquant_range="aligned"),
    "splitquant-int4-g64": dict(bits=4, group_size=64, transform="splitquant"),
    "ocs-int4-g64": dict(bits=4, group_size=64, transform="ocs", ocs_expand_ratio=0.02),
    "mixquant-3bpw-g64": dict(group_size=64, bit_allocation="mixquant", target_bits=3.0,
                              mixquant_candidates=[2, 3, 4]),
}
MB = 1e6


def _load_float(load, model_name: str) -> tuple[list[dict], list[torch.nn.Module]]:  # noqa: ANN001
    rows, models = [], []
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        start = time.perf_counter()
        model = load(dtype)
        rows.append({"model": model_name, "config": name, "bits_per_weight": 32.0 if name == "fp32" else 16.0,
                     "kernels": "-", "load_s": time.perf_counter() - start})
        models.append(model)
    return rows, models


def _load_packed(args: argparse.Namespace, path: Path, auto, probe: torch.Tensor, model_name: str,  # noqa: ANN001
                 tmp: str) -> tuple[list[dict], list[torch.nn.Module]]:
    rows, models = [], []
    for name in args.configs:
        start = time.perf_counter()
        model = auto.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[name]), dtype=torch.float32)
        quantize_s = time.perf_counter() - start  # the whole quantizing load (float load included)
        report = quantization_report(model)
        model.save_pretrained(Path(tmp) / name)
        del model
        model = auto.from_pretrained(Path(tmp) / name, dtype=args.packed_dtype).eval()
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        rows.append({"model": model_name, "config": name, "bits_per_weight": report.bits_per_weight,
                     "dtype": str(dtype).replace("torch.", ""), "quantize_s": quantize_s,
                     "quantize_s_per_million": quantize_s / (report.num_weights / 1e6),
                     "packed_bytes": report.packed_bytes,
                     "kernels": kernel_paths(model, probe.numel() // probe.shape[-1], dtype)})
        models.append(model)
        print(f"{model_name} {name}: loaded", flush=True)
    return rows, models


def _measure(rows: list[dict], models: list[torch.nn.Module], run, units: int, repeats: int) -> list[dict]:  # noqa: ANN001
    for row, timing, model in zip(rows, interleaved_throughput(models, run, units, repeats), models):
        row["throughput"] = timing.units_per_s
        row["throughput_per_cpu_s"] = timing.units_per_cpu_s
        row["vs_fp32"] = timing.units_per_s / rows[0]["throughput"] if "throughput" in rows[0] else 1.0
        row["resident_bytes"] = resident_bytes(model)  # after running: kernel layouts included
    return rows


def decode_benchmark(args: argparse.Namespace) -> list[dict]:
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(assets.wikipedia_split("eval")[0][:200], return_tensors="pt").input_ids[:, :32]

    def run(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    rows, models = _load_float(lambda dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), "smollm2")
    probe = torch.zeros(1, 1, 576, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        packed_rows, packed = _load_packed(args, path, AutoModelForCausalLM, probe, "smollm2", tmp)
        return _measure(rows + packed_rows, models + packed, run, args.new_tokens, args.repeats)


def encode_benchmark(args: argparse.Namespace) -> list[dict]:
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = assets.embedding_sentences(args.batch)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def run(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model(**batch)

    rows, models = _load_float(lambda dtype: AutoModel.from_pretrained(path, dtype=dtype).eval(), "minilm")
    probe = torch.zeros(args.batch, batch["input_ids"].shape[1], 384, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        packed_rows, packed = _load_packed(args, path, AutoModel, probe, "minilm", tmp)
        rows, models = rows + packed_rows, models + packed
        if args.compile:  # every model alike, the float ones too: compiled against compiled
            # static shapes: the models share BertModel.forward's code, so with torch's automatic dynamic shapes
            # every model compiled after one of other tensor sizes would get a symbolic-shape graph
            models = [torch.compile(model, dynamic=False) for model in models]
            for row in rows:
                row["compiled"] = True
        return _measure(rows, models, run, args.batch, args.repeats)


def table(rows: list[dict], batch: int) -> str:
    lines = ["| model | config | activations | bits/weight | throughput | vs fp32 | vs bf16 | resident MB | load+quantize s/M "
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
            config = r["config"] + (" (compiled)" if r.get("compiled") else "")
            lines.append(f"| {model} | {config} | {dtype} | {r['bits_per_weight']:.2f} | {r['throughput']:.2f} {unit} | "
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packed-dtype", default="bfloat16", choices=["auto", "bfloat16", "float32"],
                        help="dtype of the reloaded packed models' activations (auto = the checkpoint's own)")
    parser.add_argument("--compile", action="store_true",
                        help="MiniLM: torch.compile every model (float and packed alike) before timing; the warm-up "
                             "call compiles (inductor fuses a packed layer's many-token dequantize into one kernel)")
    parser.add_argument("--quick", action="store_true", help="MiniLM only, two configs, one repeat")
    parser.add_argument("--output", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.model, args.configs, args.repeats, args.batch = "minilm", ["rtn-int4-g64", "splitquant-int2-g64"], 1, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    conditions = machine_conditions(args.threads)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "load_avg_before": os.getloadavg(),
            "new_tokens": args.new_tokens, "batch": args.batch, "compile": args.compile, "repeats": args.repeats, "conditions": conditions}
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
    print("\nconditions: " + format_conditions(conditions, machine_conditions(args.threads)))
    print(f"\n{meta}")
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
