"""Does a saved quantized SmolLM2-135M create spurious "massive activations" on the evaluation text? Per eval
block (8 x 512 Wikipedia 'eval' tokens): float and quantized perplexity, any decoder block output where a token's
quantized hidden norm is over 2x its float norm (and over 1,000), and the three tokens whose NLL rose most::

    HF_HUB_OFFLINE=1 python benchmarks/study_eval_sinks.py path/to/saved/packed/model

(``bench_calibration.py --save-dir`` writes such models.) Used for the finding in
``benchmarks/results/calibration_block_tuning.md`` (session 22).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration import load_smollm2  # noqa: E402


def nll_and_states(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logp[0], out.hidden_states


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: study_eval_sinks.py SAVED_MODEL_DIR")
    from transformers import AutoModelForCausalLM

    from hf_splitquant import PackedLinear

    torch.set_num_threads(2)
    _, blocks, float_model = load_smollm2(8, 512)
    quantized = AutoModelForCausalLM.from_pretrained(argv[0], dtype=torch.float32).eval()
    for module in quantized.modules():
        if isinstance(module, PackedLinear):
            module.set_weight_cache(True)
    for s in range(blocks.shape[0]):
        ids = blocks[s:s + 1]
        a, states_a = nll_and_states(float_model, ids)
        b, states_b = nll_and_states(quantized, ids)
        line = f"eval block {s}: perplexity float {math.exp(a.mean()):.2f}, quantized {math.exp(b.mean()):.2f}"
        spurious = []
        for k in range(1, len(states_a) - 1):  # hidden_states[k]: decoder block k-1's output
            norm_a, norm_b = states_a[k][0].norm(dim=-1), states_b[k][0].norm(dim=-1)
            i = int((norm_b / norm_a).argmax())
            if norm_b[i] > 2 * norm_a[i] and norm_b[i] > 1000:
                spurious.append(f"block {k - 1} position {i} {float(norm_a[i]):.0f} -> {float(norm_b[i]):.0f}")
        line += "; spurious massive activations: " + (", ".join(spurious[:4]) or "none")
        top = (b - a).topk(3)
        line += "; largest NLL rises: " + ", ".join(f"position {int(i) + 1} +{float(v):.1f}"
                                                    for v, i in zip(top.values, top.indices))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
