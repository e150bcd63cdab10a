"""MiniLM, one batch of 32 sentences, compiled: how a packed model's many-token path compares with bf16, with its
dequantize traced by ``torch.compile`` or run as one opaque operator (``hf_splitquant::dequantize``), and with the
dequantized weights cached (``set_weight_cache(True)``: the same matmul and no dequantize, the ceiling of this path).

Every variant is loaded from one saved checkpoint, compiled with static shapes and timed in interleaved rounds in
one process (median per variant); ratios are to the compiled bf16 model of the same run. Run it with nothing else
on the machine; the load average is printed.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_compiled_dequantize.py [--configs splitquant-int2-g64-aligned ocs-int4-g64]
        [--threads 2] [--rounds 9] [--output F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_speed import CONFIGS  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging  # noqa: E402

import splitquant_assets as assets  # noqa: E402
from hf_splitquant import SplitQuantConfig, kernels  # noqa: E402
from hf_splitquant.methods import get_format  # noqa: E402
from hf_splitquant.nn.packed_linear import PackedLinear  # noqa: E402


def _opaque_key(spec) -> tuple[str, tuple[str, ...]]:  # noqa: ANN001
    """The library's operator key for ``spec`` even where its format is traced by default."""
    with mock.patch.object(type(get_format(spec)), "dequantize_compiles_well", False):
        return kernels.dequantize_key(spec)


def _variants(saved: Path) -> dict[str, torch.nn.Module]:
    """The packed model three ways: as the library runs it, with every dequantize traced, with weights cached."""
    out = {}
    for name in ("library", "traced", "opaque", "weights cached"):
        model = AutoModel.from_pretrained(saved, dtype=torch.bfloat16).eval()
        for module in model.modules():
            if not isinstance(module, PackedLinear):
                continue
            if name == "traced":
                module._dequantize_key = None
            elif name == "opaque":
                module._dequantize_key = _opaque_key(module.spec)
            elif name == "weights cached":
                module.set_weight_cache(True)
        out[name] = model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["splitquant-int2-g64-aligned", "ocs-int4-g64"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(assets.embedding_sentences(32), padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    rows = []
    load_before = os.getloadavg()
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            packed = AutoModel.from_pretrained(path, quantization_config=SplitQuantConfig(**CONFIGS[config]),
                                               dtype=torch.float32)
            packed.save_pretrained(tmp)
            models = {"bf16": AutoModel.from_pretrained(path, dtype=torch.bfloat16).eval(),
                      **_variants(Path(tmp))}
        models = {name: torch.compile(model, dynamic=False) for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():  # compile and warm up
                model(**batch)
                model(**batch)
            for _ in range(args.rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**batch)
                    times[name].append(time.perf_counter() - start)
        bf16 = statistics.median(times["bf16"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"config": config, "variant": name, "median_ms": median * 1e3, "vs_bf16": bf16 / median})
        torch._dynamo.reset()
    print("| config | variant | median ms | vs bf16 (compiled) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['variant']} | {r['median_ms']:.1f} | {r['vs_bf16']:.2f}x |")
    conditions = {"threads": args.threads, "rounds": args.rounds, "load_average_before": load_before,
                  "load_average_after": os.getloadavg(), "torch": torch.__version__}
    print(f"conditions: {conditions}")
    if args.output:
        Path(args.output).write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
