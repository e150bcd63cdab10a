"""Batch-1 greedy decoding of SmolLM2-135M: eager against compiled (``hf_splitquant.compile_for_decoding``),
float against packed, interleaved in one process.

    HF_HUB_OFFLINE=1 python benchmarks/bench_decode.py                       # the default set below
    HF_HUB_OFFLINE=1 python benchmarks/bench_decode.py --configs rtn-int4-g64+head rtn-int2-g64 ...  # others
    HF_HUB_OFFLINE=1 python benchmarks/bench_decode.py --output benchmarks/results/decode_smollm2.json

Models (each eager and compiled): bf16 and fp32 float, and packed checkpoints (quantized from the fp32 model,
saved, reloaded in bf16 as ``bench_speed.py`` does): by default RTN int4 g64 with the head in bf16 and with
the packed head (``embedding_bits=4``). ``--configs`` adds any of :data:`CONFIGS`.

llama.cpp: when ``llama-cpp-python`` is installed (``make llama-cpp`` builds it from source with this
machine's compiler), the very GGUF file the float model was dequantized from (``Q4_1``: 4-bit codes in blocks
of 32 with a 16-bit scale and minimum, 5.0 bits per weight; compare ``rtn-int4-g32+head``, also 5.0) is timed
in the same rounds with the same prompt tokens, thread count and greedy decoding (its prompt cache is reset
before every call, so each call pays its prefill as ours do). Without the package it is skipped with a message.

Per model: the seconds of its first ``generate`` (for a compiled model: compiling included), then
``--repeats`` interleaved rounds (every model once per round, in turn; the median round counts) of
``model.generate`` with a ``--prompt-tokens`` prompt and ``--new-tokens`` new tokens (end-of-text disabled, so
every call makes them all, as llama.cpp's loop does; until 2026-12-04 this forced them with ``min_new_tokens``,
whose two logits processors cost ~0.9 ms per step); throughput is new tokens
per second of the whole call (prompt included, as a user sees it) and, separately, per second of the decoding
steps alone (the whole call minus a prefill-only call timed in the same round). Ratios are against bf16
eager (and fp32 eager) of the same run. Whether the compiled model's greedy tokens equal its eager twin's is
checked. The CPU, threads and load average before and after are printed and saved: figures taken on a busy
machine are not idle figures (the ratios, interleaved, hold up better than the absolute speeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

import splitquant_assets as assets  # noqa: E402
from hf_splitquant import SplitQuantConfig, compile_for_decoding  # noqa: E402
from hf_splitquant.speed import (  # noqa: E402
    format_conditions,
    generate_exactly,
    kernel_paths,
    machine_conditions,
    resident_bytes,
)

CONFIGS = {
    "rtn-int4-g64": dict(bits=4, group_size=64),
    "rtn-int4-g64+head": dict(bits=4, group_size=64, embedding_bits=4),
    "rtn-int4-g32+head": dict(bits=4, group_size=32, embedding_bits=4),
    "rtn-int2-g64": dict(bits=2, group_size=64),
    "rtn-int3-g64": dict(bits=3, group_size=64),
    "rtn-int8-g64": dict(bits=8, group_size=64),
    "splitquant-int4-g64": dict(bits=4, group_size=64, transform="splitquant"),
    "splitquant-int2-g64": dict(bits=2, group_size=64, transform="splitquant"),
    "splitquant-int2-g64-aligned": dict(bits=2, group_size=64, transform="splitquant", splitquant_range="aligned"),
    "ocs-int4-g64": dict(bits=4, group_size=64, transform="ocs", ocs_expand_ratio=0.02),
    "mixquant-3bpw-g64": dict(group_size=64, bit_allocation="mixquant", target_bits=3.0, mixquant_candidates=[2, 3, 4]),
}
DEFAULT_CONFIGS = ["rtn-int4-g64", "rtn-int4-g64+head"]


def load_models(args: argparse.Namespace, path: Path, tmp: str) -> list[dict]:
    """Every model to time, eager and compiled, as ``{"name", "compiled", "model"}``."""
    entries = []
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    loaders = [(name, lambda dtype=dtypes[name]: AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
               for name in args.float]
    for name in args.configs:
        folder = Path(tmp) / name
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[name]),
                                             dtype=torch.float32).save_pretrained(folder)
        loaders.append((name, lambda folder=folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)))
    steps = ["eager"] + ([] if args.eager_only else ["compiled"])
    if args.plain_compile and not args.eager_only:
        steps += ["compiled (unstacked)", "compiled (SDPA, unstacked)"]
    for name, load in loaders:
        for step in steps:
            if step == "compiled (unstacked)" and name in dtypes:
                continue  # float models have no packed layers to stack
            model = load().eval()
            if step == "compiled":
                compile_for_decoding(model, options=json.loads(args.compile_options) if args.compile_options else None)
            elif step == "compiled (unstacked)":  # each packed layer its own int4 call
                compile_for_decoding(model, fuse_siblings=False)
            elif step == "compiled (SDPA, unstacked)":  # compile_for_decoding before 2026-12-04
                compile_for_decoding(model, options={}, fast_attention=False, fuse_siblings=False)
            entries.append({"name": name, "compiled": step != "eager", "step": step, "model": model})
        print(f"loaded {name}", flush=True)
    return entries


class LlamaCppModel:
    """The GGUF file run by llama.cpp (``llama-cpp-python``), greedy, behind the same ``generate`` as ours."""

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.path = gguf
        self.version = getattr(llama_cpp, "__version__", "?")
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   n_batch=context, seed=0, verbose=False)

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        self.llm.reset()  # no prompt cache between calls: every call evaluates its prompt, as ours do
        out: list[int] = []
        for token in self.llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return torch.cat([prompt, torch.tensor([out], dtype=prompt.dtype)], dim=1)

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finaliser fails at interpreter exit)."""
        self.llm.close()


def load_llama_cpp(args: argparse.Namespace) -> dict | None:
    """The llama.cpp entry, or ``None`` (with a message saying why and how to get it)."""
    if args.no_llama_cpp:
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: skipped (llama-cpp-python is not installed; `make llama-cpp` builds it from source)",
              flush=True)
        return None
    model = LlamaCppModel(assets.smollm2_gguf_path(), args.threads, args.prompt_tokens + args.new_tokens + 8)
    print(f"loaded llama.cpp {model.version} ({model.path.name})", flush=True)
    return {"name": "llama.cpp-Q4_1", "compiled": False, "step": "-", "model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--float", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                        help="float models to time (bf16 is the reference of the ratios and always included)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled models")
    parser.add_argument("--compile-options", default=None,
                        help='inductor options for the compiled models as JSON, e.g. \'{"cpp_wrapper": true}\'')
    parser.add_argument("--plain-compile", action="store_true",
                        help="also time each model compiled without stacked sibling layers, and without them, the "
                             "single-query attention and the default inductor options (compile_for_decoding before "
                             "2026-12-04), to show each step's gain in the same run")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    parser.add_argument("--output", default=None, help="write the rows and conditions as JSON")
    args = parser.parse_args()
    args.float = ["bf16"] + [f for f in args.float if f != "bf16"]
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    before = machine_conditions(args.threads)
    start = time.perf_counter()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(" ".join(assets.wikipedia_split("eval")[:2])[:2000], return_tensors="pt").input_ids
    prompt = prompt[:, : args.prompt_tokens]

    def generate(model: torch.nn.Module | LlamaCppModel, new_tokens: int) -> torch.Tensor:
        if isinstance(model, LlamaCppModel):
            return model.generate(prompt, new_tokens)
        return generate_exactly(model, prompt, new_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        entries = load_models(args, path, tmp)
        llama = load_llama_cpp(args)
        entries += [llama] if llama is not None else []
        for e in entries:  # first call: kernel layouts built, compiled models compile
            t0 = time.perf_counter()
            e["tokens"] = generate(e["model"], args.new_tokens)
            e["first_call_s"] = time.perf_counter() - t0
            generate(e["model"], 1)  # the prefill-only call (its cache length is within the compiled one's)
            print(f"{e['name']} {e['step']}: first call {e['first_call_s']:.1f} s",
                  flush=True)
        for e in entries:
            e["whole"], e["prefill"], e["load"] = [], [], []
        for _ in range(args.repeats):
            for e in entries:
                t0 = time.perf_counter()
                generate(e["model"], args.new_tokens)
                t1 = time.perf_counter()
                generate(e["model"], 1)
                e["whole"].append(t1 - t0)
                e["prefill"].append(time.perf_counter() - t1)
                e["load"].append(os.getloadavg()[0])
        rows = []
        reference = next(o for o in entries if o["name"] == args.float[-1] and not o["compiled"])  # fp32 if timed
        for e in entries:
            whole, prefill = statistics.median(e["whole"]), statistics.median(e["prefill"])
            twin = next(o for o in entries if o["name"] == e["name"] and not o["compiled"])
            llama_cpp = isinstance(e["model"], LlamaCppModel)
            rows.append({"model": e["name"], "compiled": e["compiled"], "step": e["step"], "first_call_s": e["first_call_s"],
                         "tok_s": args.new_tokens / whole,
                         "decode_tok_s": (args.new_tokens - 1) / max(whole - prefill, 1e-9),
                         "ms_per_decode_step": (whole - prefill) / (args.new_tokens - 1) * 1e3,
                         "tokens_equal_eager": bool(torch.equal(e["tokens"], twin["tokens"])),
                         "tokens_agreeing_with": reference["name"],
                         "tokens_agreeing": leading_agreement(e["tokens"], reference["tokens"], prompt.shape[1]),
                         # llama.cpp memory-maps its file: its weights are the file's bytes
                         "resident_mb": (e["model"].path.stat().st_size if llama_cpp else resident_bytes(e["model"])) / 1e6,
                         "kernels": "llama.cpp" if llama_cpp else kernel_paths(e["model"], 1, torch.bfloat16),
                         "wall_s": e["whole"], "load_1min": e["load"]})
    if llama is not None:
        llama["model"].close()
    bf16 = next(r for r in rows if r["model"] == "bf16" and not r["compiled"])
    fp32 = next((r for r in rows if r["model"] == "fp32" and not r["compiled"]), None)
    for r in rows:
        r["vs_bf16_eager"] = r["tok_s"] / bf16["tok_s"]
        r["vs_fp32_eager"] = r["tok_s"] / fp32["tok_s"] if fp32 else float("nan")
        r["decode_vs_bf16_eager"] = r["decode_tok_s"] / bf16["decode_tok_s"]
    llama_row = next((r for r in rows if r["kernels"] == "llama.cpp"), None)
    for r in rows:
        r["decode_vs_llama_cpp"] = r["decode_tok_s"] / llama_row["decode_tok_s"] if llama_row else None
    after = machine_conditions(args.threads)
    conditions = format_conditions(before, after)
    lines = ["| model | step | first call s | tok/s (whole generate) | vs bf16 eager | vs fp32 eager | decode steps "
             "tok/s | ms/step | decode vs bf16 eager | greedy = eager | leading tokens = " + rows[0]["tokens_agreeing_with"]
             + " eager | resident MB | layer paths |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['step']} | {r['first_call_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['vs_bf16_eager']:.2f}x | {r['vs_fp32_eager']:.2f}x | "
                     f"{r['decode_tok_s']:.1f} | {r['ms_per_decode_step']:.1f} | {r['decode_vs_bf16_eager']:.2f}x | "
                     f"{'yes' if r['tokens_equal_eager'] else 'no'} | {r['tokens_agreeing']}/{args.new_tokens} | "
                     f"{r['resident_mb']:.0f} | {r['kernels']} |")
    loads = [x for r in rows for x in r["load_1min"]]
    lines += ["", f"SmolLM2-135M, batch 1, greedy, {prompt.shape[1]}-token prompt, {args.new_tokens} new tokens, "
              f"{args.repeats} interleaved rounds (median); 1-min load average during the rounds "
              f"{min(loads):.2f}-{max(loads):.2f}.", f"conditions: {conditions}"]
    if llama_row is not None:
        lines.append("decode steps vs llama.cpp: " + ", ".join(
            f"{r['model']}{'' if r['step'] in ('eager', '-') else ' ' + r['step']} {r['decode_vs_llama_cpp']:.2f}x"
            for r in rows if r is not llama_row))
    print("\n" + "\n".join(lines))
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "llama_cpp": llama["model"].version if llama is not None else None,
            "compile_options": args.compile_options, "prompt_tokens": int(prompt.shape[1]),
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "conditions_before": before, "conditions_after": after, "conditions": conditions,
            "wall_s": time.perf_counter() - start}
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows, "table": "\n".join(lines)}, indent=2))


def leading_agreement(tokens: torch.Tensor, reference: torch.Tensor, prompt_tokens: int) -> int:
    """How many new tokens, from the first, equal the reference's (greedy paths part at the first difference)."""
    a, b = tokens[0, prompt_tokens:].tolist(), reference[0, prompt_tokens:].tolist()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
