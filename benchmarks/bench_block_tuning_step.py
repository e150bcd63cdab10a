"""How long is one block-tuning step, and what does ``block_tuning={"compute_dtype": "bfloat16"}`` save?

One SmolLM2-135M decoder block with its seven layers packed (RTN, ``--bits`` / ``--group-size``) and swapped
for the learned-scale fake-quant copies block tuning trains (``hf_splitquant/calibration/block_tuning.py``);
one step = forward of a calibration batch (``--batch`` x ``--tokens``, the benchmark's 2 x 512), the relative
loss, backward. float32 and bfloat16-autocast steps alternate, ``--rounds`` times each; the median counts and
the ratio is taken in the same process. Run it on an idle machine: the load average is printed.

    python benchmarks/bench_block_tuning_step.py [--threads 2] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_splitquant.calibration.block_tuning import _fake_quant_copy
from hf_splitquant.methods.block_tuning import masked_token_error
from hf_splitquant.modeling import set_module
from hf_splitquant.nn.packed_linear import PackedLinear
from hf_splitquant.spec import LayerSpec
from hf_splitquant.speed import format_conditions, machine_conditions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    import splitquant_assets as assets

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_path(), dtype=torch.float32)
    block = model.model.layers[args.block]
    for name, module in [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
        spec = LayerSpec(in_features=module.in_features, out_features=module.out_features, bits=args.bits,
                         group_size=args.group_size, has_bias=False)
        set_module(block, name, _fake_quant_copy(PackedLinear.from_float(module.weight.detach(), None, spec), 0))
    hidden = torch.randn(args.batch, args.tokens, model.config.hidden_size)
    target = hidden + 0.1 * torch.randn_like(hidden)
    positions = torch.arange(args.tokens)[None].expand(args.batch, -1)
    rotary = model.model.rotary_emb(hidden, positions)

    def step(low_precision: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
            out = block(hidden, position_embeddings=rotary, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        error, n = masked_token_error(out, target, None, "relative")
        (error / n).backward()
        block.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    before = machine_conditions(args.threads)
    step(False), step(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for low in (False, True):
            times[low].append(step(low))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"SmolLM2-135M block {args.block}, INT{args.bits} g{args.group_size} fake-quant layers, "
          f"{args.batch} x {args.tokens} tokens, forward + backward, median of {args.rounds}:")
    print(f"  float32 {fp32 * 1e3:.0f} ms, bfloat16 autocast {bf16 * 1e3:.0f} ms: {fp32 / bf16:.2f}x")
    print(f"  conditions: {format_conditions(before, machine_conditions(args.threads))}")


if __name__ == "__main__":
    main()
