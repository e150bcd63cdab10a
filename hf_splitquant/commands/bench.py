"""``hf-splitquant bench MODEL_DIR [--base FLOAT]``: speed of a packed model against its float source.

Both models are loaded in this process (at each ``--dtype`` of activations) and timed in interleaved
rounds (:func:`hf_splitquant.speed.interleaved_throughput`), so whatever else the machine does hits
them alike. A causal LM is timed decoding greedily (batch 1, ``--prompt-tokens`` prompt ids,
``--new-tokens`` generated; tokens per second, prefill included); any other model encoding a batch
(``--batch`` sequences of ``--seq-len`` tokens; sentences per second). The inputs are seeded random
token ids: speed does not depend on the text. Printed with the figures: torch threads, CPU model and
vector extensions, CPUs available, load average before and after, library versions.

The float source is ``--base``, else the ``base_model`` of the checkpoint's model card (README.md,
written by ``quantize --model-card --base-model ...`` or ``save_with_card``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger("hf_splitquant")

__all__ = ["add_bench_arguments", "cmd_bench", "float_source", "run_bench", "format_bench"]

DTYPES = ("float32", "bfloat16")


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``bench`` (shared by ``hf-splitquant`` and ``optimum-cli splitquant``)."""
    parser.add_argument("model", help="folder of a packed checkpoint (written by save_pretrained)")
    parser.add_argument("--base", metavar="FLOAT", default=None,
                        help="the float model to compare with (folder or cached Hub id); default: the base_model "
                             "of the checkpoint's model card (README.md)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="activation dtypes to time both models at (default: both)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (the median counts)")
    parser.add_argument("--new-tokens", type=int, default=32, help="causal LM: tokens generated per round")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="causal LM: prompt length")
    parser.add_argument("--batch", type=int, default=32, help="encoder: sequences per round")
    parser.add_argument("--seq-len", type=int, default=64, help="encoder: tokens per sequence")
    parser.add_argument("--compiled", action="store_true",
                        help="causal LM: time both models after hf_splitquant.compile_for_decoding (static cache, "
                             "compiled step; compiling happens in the untimed first call)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the result as JSON to this file")
    return parser


def float_source(model_dir: Path, base: str | None = None) -> tuple[str, str]:
    """``(float model, where it was found)`` for a packed checkpoint folder.

    Raises:
        ValueError: no float source is given or recorded.
    """
    if base:
        return base, "--base"
    card = model_dir / "README.md"
    if card.is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            recorded = (metadata_load(card) or {}).get("base_model")
        except Exception as err:  # a hand-edited card with broken YAML: ask for --base
            logger.warning(f"could not read the metadata of {card}: {err}")
            recorded = None
        if isinstance(recorded, list):
            recorded = recorded[0] if recorded else None
        if recorded:
            return str(recorded), f"base_model in {card.name}"
    raise ValueError(f"{model_dir} records no float source (no base_model in a README.md model card: "
                     "`hf-splitquant quantize --model-card --base-model ...` writes one); pass --base FLOAT_DIR")


def _is_causal_lm(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in config.get("architectures") or [])


def run_bench(model_dir: str | Path, base: str | None = None, dtypes: tuple[str, ...] = DTYPES,
              threads: int | None = None, repeats: int = 5, new_tokens: int = 32, prompt_tokens: int = 32,
              batch: int = 32, seq_len: int = 64, compiled: bool = False) -> dict[str, Any]:
    """Time the packed checkpoint against its float source; the result as a JSON-ready dict.

    A causal LM makes exactly ``new_tokens`` tokens per round (end-of-text ignored); with ``compiled`` both
    models decode through :func:`hf_splitquant.compile_for_decoding` (the first, untimed call compiles).

    ``rows`` holds one entry per (model, dtype) with ``throughput`` (units per second, median round),
    ``throughput_per_cpu_s`` (units per second of process CPU time), the ratio to the float model at
    the same dtype (``vs_float``), the layer paths, and resident bytes; ``conditions`` and
    ``conditions_after`` what :func:`hf_splitquant.speed.machine_conditions` records.
    """
    import torch
    import transformers

    from ..report import quantization_report
    from ..speed import (
        generate_exactly,
        interleaved_throughput,
        kernel_paths,
        machine_conditions,
        resident_bytes,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found; pass a folder written by save_pretrained")
    raw = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    if raw.get("quant_method") != "splitquant":
        raise ValueError(f"{model_dir} is not an hf_splitquant checkpoint (no splitquant quantization_config)")
    for name, value in (("repeats", repeats), ("new_tokens", new_tokens), ("prompt_tokens", prompt_tokens),
                        ("batch", batch), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    base_model, base_from = float_source(model_dir, base)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    causal = _is_causal_lm(model_dir)
    if compiled and not causal:
        raise ValueError("--compiled times compiled decoding, which only a causal LM does; drop it for this encoder")
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    config = transformers.AutoConfig.from_pretrained(model_dir)
    vocab = getattr(config, "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (1, prompt_tokens) if causal else (batch, seq_len),
                        generator=torch.Generator().manual_seed(0))

    def run(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            if causal:
                generate_exactly(model, ids, new_tokens, attention_mask=torch.ones_like(ids), num_beams=1,
                                 pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0)
            else:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))

    rows: list[dict[str, Any]] = []
    models: list[torch.nn.Module] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        packed = auto.from_pretrained(model_dir, dtype=dtype).eval()
        report = quantization_report(packed)
        try:
            floating = auto.from_pretrained(base_model, dtype=dtype).eval()
        except OSError as err:
            raise ValueError(f"cannot load the float source {base_model!r} ({base_from}): {err}; pass --base "
                             "FLOAT_DIR") from None
        if compiled:
            from ..integrations.decoding import compile_for_decoding

            compile_for_decoding(packed)
            compile_for_decoding(floating)
        step_tokens = 1 if causal else batch * seq_len  # tokens per layer call while timing
        rows.append({"model": "packed", "path": str(model_dir), "dtype": dtype_name,
                     "bits_per_weight": report.bits_per_weight, "method": report.method,
                     "layer_paths": kernel_paths(packed, step_tokens, dtype)})
        rows.append({"model": "float", "path": base_model, "dtype": dtype_name,
                     "bits_per_weight": 8 * torch.empty((), dtype=dtype).element_size(), "method": "float",
                     "layer_paths": "-"})
        models += [packed, floating]
    before = machine_conditions()
    units = new_tokens if causal else batch
    timings = interleaved_throughput(models, run, units, repeats)
    after = machine_conditions()
    for row, timing, model in zip(rows, timings, models):
        row.update(throughput=timing.units_per_s, throughput_per_cpu_s=timing.units_per_cpu_s,
                   wall_s=timing.wall_s, cpu_s=timing.cpu_s, resident_bytes=resident_bytes(model))
    for row in rows:
        reference = next(r for r in rows if r["model"] == "float" and r["dtype"] == row["dtype"])
        row["vs_float"] = row["throughput"] / reference["throughput"]
        row["vs_float_per_cpu_s"] = row["throughput_per_cpu_s"] / reference["throughput_per_cpu_s"]
    if causal:
        workload = {"kind": "greedy decoding", "batch": 1, "prompt_tokens": prompt_tokens,
                    "new_tokens": new_tokens, "unit": "tokens/s", "compiled": compiled}
    else:
        workload = {"kind": "encoding", "batch": batch, "seq_len": seq_len, "unit": "sentences/s"}
    return {"model": str(model_dir), "base": base_model, "base_from": base_from,
            "task": "text-generation" if causal else "feature-extraction", "workload": workload | {"repeats": repeats},
            "rows": rows, "conditions": before, "conditions_after": after}


def format_bench(result: dict[str, Any]) -> str:
    """The result as a text table followed by the workload and the machine conditions."""
    from ..speed import format_conditions

    unit = result["workload"]["unit"]
    lines = [f"{'model':<7} {'activations':<11} {'bits/weight':>11} {unit:>12} {unit[:-2] + '/CPU-s':>17} "
             f"{'vs float':>9} {'resident MB':>11}  layer paths"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<7} {r['dtype']:<11} {r['bits_per_weight']:>11.3f} {r['throughput']:>12.2f} "
                     f"{r['throughput_per_cpu_s']:>17.2f} {r['vs_float']:>8.2f}x {r['resident_bytes'] / 1e6:>11.1f}"
                     f"  {r['layer_paths']}")
    w = result["workload"]
    if w["kind"] == "greedy decoding":
        what = (f"greedy decoding, batch 1, {w['prompt_tokens']} prompt + {w['new_tokens']} new tokens (prefill "
                f"included){', compiled (compile_for_decoding)' if w.get('compiled') else ''}")
    else:
        what = f"encoding {w['batch']} sequences of {w['seq_len']} tokens"
    lines += [f"packed: {result['model']}; float: {result['base']} ({result['base_from']})",
              f"workload: {what}; median of {w['repeats']} interleaved rounds; vs float = same activation dtype",
              "conditions: " + format_conditions(result["conditions"], result["conditions_after"])]
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``hf-splitquant bench``: print the table; optionally write JSON."""
    result = run_bench(args.model, base=args.base, dtypes=tuple(dict.fromkeys(args.dtype)), threads=args.threads,
                       repeats=args.repeats, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                       batch=args.batch, seq_len=args.seq_len, compiled=args.compiled)
    print(format_bench(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0
