"""Beam search on packed models computes what the stored format says (issue: int4 beam search degenerating).

The int4 kernel path must give, for beam-shaped batches (several rows with different histories,
decoded step by step with the KV cache, beams reordered), the logits of the exact reference path
within bf16 rounding, and each row must not depend on the other rows of its batch. The reference
path must be the dequantized float model exactly, so beam search on it picks the same beams.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, tiny_llama

import hf_splitquant
from hf_splitquant import SplitQuantConfig, kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 2 threads only contend on a shared machine


@pytest.fixture(scope="module")
def packed_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama(), SplitQuantConfig(bits=4, group_size=32), progress=False)
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor, mode: str) -> torch.Tensor:
    with kernels.kernel_mode(mode), torch.no_grad():
        return model(ids).logits


def _stepwise_beam_logits(model: torch.nn.Module, prompt: torch.Tensor, steps: int, mode: str) -> torch.Tensor:
    """Decode two beams token by token through the KV cache, swapping the beams at every step (as beam
    search reorders them); returns the logits of each step ``[steps, beams, vocab]``."""
    out = []
    with kernels.kernel_mode(mode), torch.no_grad():
        result = model(prompt, use_cache=True)
        cache, logits = result.past_key_values, result.logits[:, -1]
        for step in range(steps):
            out.append(logits)
            order = torch.tensor([1, 0]) if step % 2 else torch.tensor([0, 1])
            cache.reorder_cache(order)
            nxt = logits[order].argmax(-1, keepdim=True)
            result = model(nxt, past_key_values=cache, use_cache=True)
            cache, logits = result.past_key_values, result.logits[:, -1]
    return torch.stack(out)


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch build has no int4 CPU kernel")
def test_beam_shaped_batches_on_the_int4_kernel_match_the_reference(packed_llama):
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    x = torch.zeros(2, 1, 64)
    assert {m.kernel_for(x) for m in packed_llama.modules() if isinstance(m, hf_splitquant.PackedLinear)} == {"int4"}
    fast = _stepwise_beam_logits(packed_llama, prompt, 6, "auto")
    ref = _stepwise_beam_logits(packed_llama, prompt, 6, "reference")
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.01 * scale  # bf16 activations on the kernel (measured: 0.0024)
    # a row's logits do not depend on the other rows of the batch (two beams vs each alone)
    both = _logits(packed_llama, prompt, "auto")
    for row in range(2):
        alone = _logits(packed_llama, prompt[row:row + 1], "auto")
        assert (alone[0] - both[row]).abs().max() < 1e-3 * scale


def test_beam_search_on_the_reference_path_is_the_dequantized_float_model(packed_llama):
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    floating = copy.deepcopy(packed_llama).dequantize()
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 2, "do_sample": False, "pad_token_id": 2}
    with kernels.kernel_mode("reference"), torch.no_grad():
        packed_out = packed_llama.generate(prompt, **kwargs)
    with torch.no_grad():
        float_out = floating.generate(prompt, **kwargs)
    assert torch.equal(packed_out, float_out)
    assert torch.equal(_logits(packed_llama, prompt, "reference"), _logits(floating, prompt, "reference"))
