"""Where the time of one batch-1 decoding step of SmolLM2-135M goes: op counts and times per token by module
type and by op, from ``torch.profiler`` (a profile is meaningful under load: it counts calls and splits time;
speed ratios come from ``bench_decode.py``).

    HF_HUB_OFFLINE=1 python benchmarks/profile_decode.py [--steps 16] [--threads 2] [--output profile.json]

Models: bf16 float, RTN int4 g64 with the head in bf16, and RTN int4 g64 with the packed head
(``SplitQuantConfig(embedding_bits=4)``), all saved once and reloaded in bf16 (the packed models' int4 layouts
are built on the warm-up step). ``--compiled`` profiles the compiled decoding step instead
(:func:`hf_splitquant.compile_for_decoding`, a static cache; no per-module split there: one graph).

Each module's ``forward`` is wrapped in a ``record_function`` label during profiling only, so a module's
*self* time is the Python and dispatch time spent in its own code (outside the ops it calls); the aten ops'
self times are the work. "unattributed" is the step's wall time (profiled) minus everything labelled.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache  # noqa: E402
from transformers.utils import logging  # noqa: E402

import splitquant_assets as assets  # noqa: E402
from hf_splitquant import SplitQuantConfig  # noqa: E402
from hf_splitquant.speed import format_conditions, machine_conditions  # noqa: E402

#: aten ops grouped into what they do in a Llama decoding step
OP_GROUPS = {
    "int4 kernel": ("aten::_weight_int4pack_mm_for_cpu",),
    "float matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                  "aten::_scaled_dot_product_attention_math"),
    "cache update": ("aten::cat", "aten::index_copy_", "aten::index_copy"),
}


def load_models(path: Path, tmp: str) -> dict[str, torch.nn.Module]:
    models = {"bf16": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()}
    for name, config in (("int4-g64", SplitQuantConfig(bits=4, group_size=64)),
                         ("int4-g64+head", SplitQuantConfig(bits=4, group_size=64, embedding_bits=4))):
        folder = Path(tmp) / name
        AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).save_pretrained(folder)
        models[name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return models


def _label_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """Wrap every module's forward in a record_function named after its class; returns what to restore."""
    restore = []
    for module in model.modules():
        original = module.forward
        label = "module::" + type(module).__name__

        def wrapped(*args, __f=original, __l=label, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with record_function(__l):
                return __f(*args, **kwargs)

        module.forward = wrapped
        restore.append((module, original))
    return restore


def decode_steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, compiled: bool = False,  # noqa: ANN201
                 max_steps: int = 64):
    """A prefilled cache and a callable doing ``steps`` greedy decoding steps (batch 1); ``compiled``: a static
    cache of ``max_steps`` more positions and the compiled call ``generate`` would use (after
    :func:`hf_splitquant.compile_for_decoding`)."""
    forward = model
    with torch.inference_mode():
        if compiled:
            cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + max_steps)
            forward = model.get_compiled_call(model.generation_config.compile_config)
        else:
            cache = DynamicCache(config=model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
    start = prompt.shape[1]

    def run() -> None:
        nonlocal out
        with torch.inference_mode():
            token = out.logits[:, -1:].argmax(-1)
            for i in range(steps):
                pos = torch.tensor([[start + i]])
                out = forward(token, past_key_values=cache, position_ids=pos, cache_position=pos[0], use_cache=True)
                token = out.logits[:, -1:].argmax(-1)

    return run


def profile_model(model: torch.nn.Module, prompt: torch.Tensor, steps: int, compiled: bool = False) -> dict:
    run = decode_steps(model, prompt, 1, compiled, max_steps=2 * steps + 8)
    t0 = time.perf_counter()
    run()  # warm-up: kernel layouts built, the compiled step compiled
    print(f"first step {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    plain_ms = (time.perf_counter() - t0) / steps * 1e3
    # module labels only in eager code (wrapping a compiled model's modules would make it recompile)
    restore = [] if compiled else _label_modules(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            profiled_ms = (time.perf_counter() - t0) / steps * 1e3
    finally:
        for module, original in restore:
            module.forward = original
    modules, ops = {}, {}
    op_calls, op_self_us = 0, 0.0
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        if ev.key.startswith("module::"):
            modules[ev.key[8:]] = {"calls": ev.count / steps, "self_ms": ev.self_cpu_time_total / steps / 1e3,
                                   "total_ms": ev.cpu_time_total / steps / 1e3}
        elif ev.key.startswith("aten::"):
            ops[ev.key] = {"calls": ev.count / steps, "self_ms": ev.self_cpu_time_total / steps / 1e3}
            op_calls += ev.count
            op_self_us += ev.self_cpu_time_total
            group = next((g for g, names in OP_GROUPS.items() if ev.key in names), "other aten ops")
            groups[group][0] += ev.count / steps
            groups[group][1] += ev.self_cpu_time_total / steps / 1e3
    module_self = sum(m["self_ms"] for m in modules.values())
    groups["Python in modules (self time of module labels)"] = [sum(m["calls"] for m in modules.values()), module_self]
    labelled = sum(v[1] for v in groups.values())
    groups["unattributed (generation loop, profiler)"] = [0, profiled_ms - labelled]
    return {"ms_per_token": plain_ms, "ms_per_token_profiled": profiled_ms, "aten_calls_per_token": op_calls / steps,
            "aten_self_ms_per_token": op_self_us / steps / 1e3, "groups": {k: {"calls": v[0], "ms": v[1]}
                                                                        for k, v in groups.items()},
            "modules": modules, "ops": ops}


def table(name: str, result: dict) -> str:
    lines = [f"### {name}: {result['ms_per_token']:.1f} ms/token unprofiled, {result['ms_per_token_profiled']:.1f} "
             f"profiled; {result['aten_calls_per_token']:.0f} aten calls/token, "
             f"{result['aten_self_ms_per_token']:.1f} ms of aten self time", "",
             "| where | calls/token | ms/token | share |", "|---|---|---|---|"]
    total = result["ms_per_token_profiled"]
    for group, v in sorted(result["groups"].items(), key=lambda kv: -kv[1]["ms"]):
        lines.append(f"| {group} | {v['calls']:.0f} | {v['ms']:.2f} | {v['ms'] / total:.0%} |")
    lines += ["", "| module | calls/token | self ms (its Python) | total ms |", "|---|---|---|---|"]
    for mod, v in sorted(result["modules"].items(), key=lambda kv: -kv[1]["total_ms"])[:12]:
        lines.append(f"| {mod} | {v['calls']:.0f} | {v['self_ms']:.2f} | {v['total_ms']:.2f} |")
    lines += ["", "| top aten ops by self time | calls/token | self ms |", "|---|---|---|"]
    for op, v in sorted(result["ops"].items(), key=lambda kv: -kv[1]["self_ms"])[:14]:
        lines.append(f"| {op} | {v['calls']:.0f} | {v['self_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true", help="profile the compiled decoding step")
    parser.add_argument("--output", default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    before = machine_conditions(args.threads)
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(assets.wikipedia_split("eval")[0][:200], return_tensors="pt").input_ids[:, :32]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = load_models(path, tmp)
        for name, model in models.items():
            if args.compiled:
                from hf_splitquant import compile_for_decoding

                compile_for_decoding(model)
            results[name] = profile_model(model, prompt, args.steps, args.compiled)
            print(table(name, results[name]) + "\n", flush=True)
    conditions = format_conditions(before, machine_conditions(args.threads))
    print(conditions)
    if args.output:
        Path(args.output).write_text(json.dumps({"conditions": conditions, "results": results}, indent=2))


if __name__ == "__main__":
    main()
