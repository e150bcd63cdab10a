"""One-shot study of the Hadamard input rotation (``hf_splitquant/quant/rotation.py``) on SmolLM2-135M.

Every decoder Linear's weight ``W`` is replaced by what a rotated packed layer computes with, ``Q(W R) R``
(``R = diag(H_b, ...)``, ``b = --block``), or without rotation by ``Q(W)``; ``Q`` is round-to-nearest on the
min-max grid (``rtn``) or output-aware clip + GPTQ at damping 1.0 (``gptq``) with the ``X^T X`` of the FLOAT
model's inputs over ``--cal-blocks`` x 512 calibration tokens (all layers at once: no sequential calibration,
so the GPTQ figures are above what ``hf_splitquant.quantize`` reaches). Perplexity on 8 x 512 Wikipedia eval
tokens. A quick way to see whether the rotation pays before running the full calibration
(``benchmarks/bench_calibration.py --input-rotation 64``).

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/study_rotation.py --bits 3 --group-size 128 --methods rtn gptq   # ~4 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_calibration import perplexity  # noqa: E402
from study_layers import collect_hessians  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", choices=["rtn", "gptq"], default=["rtn", "gptq"])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--cal-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splitquant_assets as assets
    from hf_splitquant.methods import element_grid, stored_hessian
    from hf_splitquant.methods.gptq import gptq_round
    from hf_splitquant.methods.output_clip import output_clip_grid
    from hf_splitquant.quant.rotation import rotate_inputs
    from hf_splitquant.spec import LayerSpec

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calibration = assets.perplexity_token_blocks(tokenizer, args.cal_blocks, 512, part="calibration")
    evaluation = assets.perplexity_token_blocks(tokenizer, 8, 512, part="eval")
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and "layers." in n]
    hessians = collect_hessians(model, calibration, names) if "gptq" in args.methods else {}
    original = {n: modules[n].weight.detach().clone() for n in names}
    print(f"float: perplexity {perplexity(model, evaluation):.2f}", flush=True)
    for method in args.methods:
        for rotated in (False, True):
            started = time.perf_counter()
            for name in names:
                weight = original[name].float()
                out_f, in_f = weight.shape
                spec = LayerSpec(in_features=in_f, out_features=out_f, bits=args.bits, group_size=args.group_size,
                                 has_bias=False, input_rotation=args.block if rotated else None)
                if method == "rtn":
                    grid = element_grid(weight, spec)
                    codes = grid.nearest_codes()
                else:
                    hessian = hessians[name][0].float()
                    grid = output_clip_grid(weight, spec, hessian)
                    codes, _ = gptq_round(grid, stored_hessian(hessian, grid).float(), damping=1.0)
                values = grid.values(codes)
                modules[name].weight.data.copy_(rotate_inputs(values, args.block) if rotated else values)
            print(f"INT{args.bits} g{args.group_size} {method} rotated={rotated}: perplexity "
                  f"{perplexity(model, evaluation):.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
