"""OCS expand ratios and MixQuant budgets against RTN and SplitQuant, on real offline models.

Quality against bits per weight, in one process per model where the float reference is computed
once (the measures and protocol are those of ``bench_quality.py``: MiniLM mean cosine to the float
embeddings over 300 real sentences, SmolLM2 perplexity on 8 x 512 Wikipedia eval tokens):

* RTN at 2/3/4 bits, per output channel and group 64 (the reference points);
* SplitQuant at 2 bits per channel and group 128 (its cheapest formats, ~3.8 and ~4.4 bpw);
* OCS at every ``--ocs-ratios`` r (default 0.01, 0.02, 0.05) and bits, per channel and group 64;
* MixQuant with every transform at every ``--budgets`` target (default 2.5, 3, 4 bits per weight,
  overheads included): RTN and OCS (r = 0.02) at group 64 and per channel, SplitQuant per channel.
  A budget below a transform's cheapest format is reported as infeasible (the library refuses it
  with a clear error), not silently changed.

Every quantized model is saved and reloaded with plain ``from_pretrained`` and must reproduce the
in-memory model's outputs (max abs difference in the JSON).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_ocs_mixquant.py --model all \\
        --output benchmarks/results/ocs_mixquant.json > benchmarks/results/ocs_mixquant.md
    HF_HUB_OFFLINE=1 python benchmarks/bench_ocs_mixquant.py --quick     # MiniLM, 3 configs, ~1 min
    python benchmarks/bench_ocs_mixquant.py --report-from a.json b.json  # merged tables, measures nothing

Progress goes to stderr, the markdown tables to stdout, the raw numbers to ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_quality.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import torch  # noqa: E402


@dataclass(frozen=True)
class Case:
    family: str  # rtn | splitquant | ocs | mixquant
    label: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def group_name(group: int | None) -> str:
    return "chan" if group is None else f"g{group}"


def build_cases(args: argparse.Namespace) -> list[Case]:
    cases: list[Case] = []
    split_label = "" if args.ocs_split == "qa" else f" ({args.ocs_split} split)"
    for group in (None, 64):
        for bits in args.bits:
            cases.append(Case("rtn", f"rtn int{bits} {group_name(group)}", dict(bits=bits, group_size=group)))
    for group in (None, 128):
        cases.append(Case("splitquant", f"splitquant int2 {group_name(group)}",
                          dict(bits=2, group_size=group, transform="splitquant")))
    for ratio in args.ocs_ratios:
        for group in (None, 64):
            for bits in args.bits:
                cases.append(Case("ocs", f"ocs r={ratio} int{bits} {group_name(group)}{split_label}",
                                  dict(bits=bits, group_size=group, transform="ocs", ocs_expand_ratio=ratio,
                                       ocs_split=args.ocs_split)))
    ocs = {"transform": "ocs", "ocs_split": args.ocs_split}
    mix = [("rtn", None, {}), ("rtn", 64, {}), ("ocs" + split_label, None, ocs), ("ocs" + split_label, 64, ocs),
           ("splitquant", None, {"transform": "splitquant"})]
    for budget in args.budgets:
        for name, group, extra in mix:
            cases.append(Case("mixquant", f"mixquant {name} {group_name(group)} <= {budget:g} bpw",
                              dict(group_size=group, bit_allocation="mixquant", target_bits=budget, **extra)))
    return cases


def layer_bits_histogram(report: Any) -> str:
    counts: dict[int, int] = {}
    for layer in report.layers:
        counts[layer.bits] = counts.get(layer.bits, 0) + 1
    return " ".join(f"{n}x{b}" for b, n in sorted(counts.items()))


def run_model(info: bq.ModelInfo, cases: list[Case], args: argparse.Namespace) -> dict[str, Any]:
    from hf_splitquant import SplitQuantConfig, quantization_report

    start = time.perf_counter()
    evaluator = bq.Evaluator(info, args)
    path = info.path()
    model = info.load(path)
    float_scores = evaluator.set_float(model)
    del model
    bq.log(f"== {info.title}: float {evaluator.short_metric} {float_scores['quality']:.4g}")
    rows = []
    for case in cases:
        config = SplitQuantConfig(**case.kwargs)
        t0 = time.perf_counter()
        try:
            model = info.load(path, config)
        except ValueError as error:  # an infeasible budget: the library's own message
            rows.append({"family": case.family, "label": case.label, "config": case.kwargs,
                         "infeasible": str(error)})
            bq.log(f"   {case.label}: infeasible ({str(error)[:100]}...)")
            continue
        quantize_s = time.perf_counter() - t0
        report = quantization_report(model)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded = info.load(tmp)
            reload_diff = float((evaluator.outputs(model) - evaluator.outputs(reloaded)).abs().max())
            del reloaded
        bq.enable_dequantized_cache(model)
        t0 = time.perf_counter()
        scores = evaluator.score(model)
        eval_s = time.perf_counter() - t0
        del model
        gc.collect()
        rows.append({"family": case.family, "label": case.label, "config": case.kwargs,
                     "bits_per_weight": report.bits_per_weight, "layer_bits": layer_bits_histogram(report),
                     "quantize_s": quantize_s, "eval_s": eval_s, "reload_max_abs_diff": reload_diff, **scores})
        bq.log(f"   {case.label}: {report.bits_per_weight:.3f} bpw, {evaluator.short_metric} "
               f"{scores['quality']:.4g} (quantize {quantize_s:.1f} s, eval {eval_s:.1f} s, reload diff {reload_diff:.2g})")
        if reload_diff > 1e-4:
            bq.log(f"   !! {case.label}: the reloaded checkpoint differs from the in-memory model")
    return {"model": info.key, "title": info.title, "metric": evaluator.metric,
            "higher_is_better": evaluator.higher_is_better(), "protocol": evaluator.protocol,
            "float_quality": float_scores["quality"], "rows": rows, "wall_s": time.perf_counter() - start}


def better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def best_within(rows: list[dict[str, Any]], budget: float, higher_is_better: bool) -> dict[str, Any] | None:
    """The best measured configuration whose bits per weight are at most ``budget``."""
    best = None
    for row in rows:
        if "quality" in row and row["bits_per_weight"] <= budget + 1e-9 and (
                best is None or better(row["quality"], best["quality"], higher_is_better)):
            best = row
    return best


def markdown(result: dict[str, Any], budgets: list[float]) -> str:
    hib = result["higher_is_better"]
    fmt = (lambda q: f"{q:.4f}") if hib else (lambda q: f"{q:.4g}")
    lines = [f"### {result['title']}", "", f"Quality: {result['metric']}; float = {fmt(result['float_quality'])}.",
             "", "| configuration | bits/weight | layer widths | quality | quantize s |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        if "infeasible" in row:
            lines.append(f"| {row['label']} | - | - | infeasible: {row['infeasible'].split(';')[0]} | - |")
        else:
            lines.append(f"| {row['label']} | {row['bits_per_weight']:.3f} | {row['layer_bits']} | "
                         f"{fmt(row['quality'])} | {row['quantize_s']:.1f} |")
    lines += ["", "Best configuration within each budget (bits per weight at most the budget):", "",
              "| budget | best configuration | bits/weight | quality | best RTN | RTN quality |", "|---|---|---|---|---|---|"]
    for budget in budgets:
        best = best_within(result["rows"], budget, hib)
        rtn = best_within([r for r in result["rows"] if r["family"] == "rtn"], budget, hib)
        if best is None:
            lines.append(f"| {budget:g} | none measured | - | - | - | - |")
            continue
        lines.append(f"| {budget:g} | {best['label']} | {best['bits_per_weight']:.3f} | {fmt(best['quality'])} | "
                     f"{rtn['label'] if rtn else '-'} | {fmt(rtn['quality']) if rtn else '-'} |")
    return "\n".join(lines) + "\n"


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Per model, the rows of every file in order; a later row replaces an earlier one of the same label."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for result in json.loads(path.read_text())["results"]:
            target = merged.setdefault(result["model"], {**result, "rows": []})
            labels = {row["label"] for row in result["rows"]}
            target["rows"] = [r for r in target["rows"] if r["label"] not in labels] + result["rows"]
    order = {"rtn": 0, "splitquant": 1, "ocs": 2, "mixquant": 3}
    for result in merged.values():
        result["rows"].sort(key=lambda r: order[r["family"]])  # stable: each family keeps its run order
    return list(merged.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["all"], choices=["minilm", "smollm2", "all"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--ocs-ratios", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    parser.add_argument("--ocs-split", default="qa", choices=["auto", "qa", "naive"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 4.0])
    parser.add_argument("--families", nargs="+", default=["rtn", "splitquant", "ocs", "mixquant"],
                        choices=["rtn", "splitquant", "ocs", "mixquant"])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--ppl-blocks", type=int, default=8)
    parser.add_argument("--ppl-block-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="MiniLM, 32 sentences, 3 configurations")
    parser.add_argument("--output", default=None)
    parser.add_argument("--report-from", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: merge these results (later files replace rows of the same label) "
                             "and print the tables")
    args = parser.parse_args()
    if args.report_from:
        for result in merge_results([Path(p) for p in args.report_from]):
            print(markdown(result, args.budgets), flush=True)
        return
    torch.set_num_threads(args.threads)
    bq.quiet_transformers()
    if args.quick:
        args.model, args.sentences, args.bits, args.ocs_ratios, args.budgets = ["minilm"], 32, [3], [0.02], [3.0]
    cases = [c for c in build_cases(args) if c.family in args.families]
    if args.quick:
        cases = [c for c in cases if c.label in ("rtn int3 g64", "ocs r=0.02 int3 g64", "mixquant rtn g64 <= 3 bpw")]
    keys = ["minilm", "smollm2"] if "all" in args.model else args.model
    results = []
    started = time.perf_counter()
    for key in keys:
        result = run_model(bq.MODELS[key], cases, args)
        results.append(result)
        print(markdown(result, args.budgets), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": args.threads, "wall_s": time.perf_counter() - started, "argv": sys.argv[1:]}
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
