"""Would fusing q/k/v and gate/up into one stacked int4 kernel call pay? SmolLM2-135M's shapes at one token:
the raw kernel calls of separate layouts against one layout with the rows stacked, interleaved.

    python benchmarks/bench_int4_fusion.py [--threads 2] [--rounds 15] [--calls 300]

Per decoded token SmolLM2 makes 7 int4 calls per layer (q, k, v, o, gate, up, down; 210 with the head's 211);
stacking q/k/v and gate/up would make it 4 (121). The figure that decides is the saving per layer below times
30 layers, against the step's time (bench_decode.py). Run it on an idle machine: the best of ``--rounds``
rounds counts, and the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from hf_splitquant import PackedLinear
from hf_splitquant.spec import LayerSpec
from hf_splitquant.speed import format_conditions, machine_conditions

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64


def layout(rows: int, cols: int, group: int):  # noqa: ANN201
    spec = LayerSpec(in_features=cols, out_features=rows, bits=4, group_size=group, has_bias=False)
    layer = PackedLinear.from_float(torch.randn(rows, cols), None, spec)
    if not layer.prepare_int4():
        raise SystemExit("this torch has no int4 CPU kernel")
    return layer._int4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = machine_conditions(args.threads)
    g = args.group_size
    cases = {
        "q, k, v (3 calls)": [layout(HIDDEN, HIDDEN, g), layout(KV, HIDDEN, g), layout(KV, HIDDEN, g)],
        "q|k|v stacked (1 call)": [layout(HIDDEN + 2 * KV, HIDDEN, g)],
        "gate, up (2 calls)": [layout(INTERMEDIATE, HIDDEN, g), layout(INTERMEDIATE, HIDDEN, g)],
        "gate|up stacked (1 call)": [layout(2 * INTERMEDIATE, HIDDEN, g)],
    }
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for name, layouts in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                for lay in layouts:
                    mm(x, lay.weight, lay.group, lay.scales_and_zeros)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.calls * 1e6)
    print("| calls at 1 token, bf16 | us (best round) |\n|---|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} |")
    saving = best["q, k, v (3 calls)"] - best["q|k|v stacked (1 call)"] + best["gate, up (2 calls)"] - \
        best["gate|up stacked (1 call)"]
    print(f"\nsaving per layer {saving:.1f} us, per SmolLM2 token (30 layers) {saving * 30 / 1e3:.2f} ms")
    print(format_conditions(before, machine_conditions(args.threads)))
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}")


if __name__ == "__main__":
    main()
