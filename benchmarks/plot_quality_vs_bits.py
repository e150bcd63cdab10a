"""Quality against bits per weight on SmolLM2-135M: our methods and the peers on one figure.

Reads result files with the row schema of ``bench_peers.py`` and ``bench_calibration.py``
(``{"meta": {"eval": ..., "group_size": ...}, "rows": [{"method", "bits", "bits_per_weight",
"perplexity", ...}]}``), keeps those evaluated on the same tokens as the first file, turns each
perplexity into a ratio to the float model's (the float row of the same file, else of the first
file), and plots the ratio (log scale) against bits per weight, one marker series per method, the
Pareto front marked (:func:`hf_splitquant.evaluation.plot_quality_vs_bits`). A point that appears
in several files (same series, bits and group size) is taken from the first file that has it, so the
peers' run (listed first) wins over older runs of the same configuration.

Usage::

    python benchmarks/plot_quality_vs_bits.py            # the default files below
    python benchmarks/plot_quality_vs_bits.py --inputs benchmarks/results/peers_smollm2.json more.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_INPUTS = [RESULTS / "peers_smollm2.json", RESULTS / "calibration_gptq_g128.json",
                  RESULTS / "calibration_gptq_g64.json"]
QUALITY = "perplexity / float perplexity"  # the plotted value (and the y-axis label)
# series names of bench_calibration.py's methods (bench_peers.py rows carry their own ``label``)
SERIES = {"rtn": "RTN (ours)", "gptq": "gptq rounding (ours)", "ar": "Attention Round (ours)",
          "rtn+cl": "RTN + coding-length bits (ours)", "ar+cl": "Attention Round + coding-length bits (ours)"}


def load_points(paths: list[Path]) -> tuple[list[dict[str, Any]], str]:
    """Plot points (``method`` = series, ``label``, ``bits_per_weight``, :data:`QUALITY`) from the files.

    Files evaluated on other tokens than the first are skipped with a message; rows without a
    perplexity (failed configurations) are left out.
    """
    points: list[dict[str, Any]] = []
    seen: set[tuple[str, int, Any]] = set()
    eval_text, first_float = None, None
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta, rows = data.get("meta", {}), data.get("rows", [])
        if eval_text is None:
            eval_text = meta.get("eval")
        elif meta.get("eval") != eval_text:
            print(f"skipped {path}: evaluated on {meta.get('eval')!r}, not {eval_text!r}", file=sys.stderr)
            continue
        floats = [r["perplexity"] for r in rows if r.get("method") == "float" and "perplexity" in r]
        reference = floats[0] if floats else first_float
        if first_float is None:
            first_float = reference
        if reference is None:
            raise ValueError(f"{path}: no float row to take the ratio to, and none in an earlier file")
        for row in rows:
            if row.get("method") == "float" or "perplexity" not in row or "bits_per_weight" not in row:
                continue
            series = row.get("label") or SERIES.get(row["method"], row["method"])
            group = row.get("group_size", meta.get("group_size"))
            ident = (series, row["bits"], group)
            if ident in seen:
                continue
            seen.add(ident)
            points.append({"method": series, "label": f"INT{row['bits']} g{group}",
                           "bits_per_weight": float(row["bits_per_weight"]),
                           QUALITY: row["perplexity"] / reference, "source": Path(path).name})
    return points, eval_text or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="perplexity ratio vs bits per weight, methods and peers")
    parser.add_argument("--inputs", nargs="+", type=Path, default=DEFAULT_INPUTS,
                        help="result JSON files; the first one's evaluation and float row are the reference")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality_vs_bits_peers.png")
    parser.add_argument("--y-max", type=float, default=1000.0,
                        help="clip the ratio axis here (collapsed points drawn on the edge, default 1000)")
    args = parser.parse_args(argv)

    from hf_splitquant.evaluation import plot_quality_vs_bits

    inputs = [p for p in args.inputs if p.exists() or print(f"missing, skipped: {p}", file=sys.stderr)]
    if not inputs:
        parser.error("none of the input files exists")
    points, eval_text = load_points(inputs)
    for p in sorted(points, key=lambda p: (p["bits_per_weight"], p["method"])):
        print(f"{p['method']} | {p['label']} | {p['bits_per_weight']:.3f} bpw | {p[QUALITY]:.4g}x float | {p['source']}")
    plot_quality_vs_bits(points, args.output, QUALITY, higher_is_better=False, reference=1.0, log_y=True,
                         y_max=args.y_max,
                         title=f"SmolLM2-135M, {eval_text}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
