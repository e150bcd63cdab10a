"""Activation-aware input scaling before the calibrated rounding (``SplitQuantConfig(activation_scaling=True)``):
the search, the fold into the norms (float-equivalent), and the calibrated model it gives."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig
from hf_splitquant.methods.activation_scaling import (
    candidate_scales,
    scaled_rounding_error,
    search_input_scale,
)
from hf_splitquant.spec import LayerSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_candidate_scales_are_powers_of_the_rms_centred_on_one() -> None:
    rms = torch.tensor([0.0, 1.0, 4.0, 16.0])
    assert torch.equal(candidate_scales(rms, 0.0), torch.ones(4))
    s = candidate_scales(rms, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    torch.testing.assert_close(s[2:] / s[1], torch.tensor([2.0, 4.0]))  # r^0.5 ratios
    assert s[0] == s[1]  # a silent channel gets the smallest positive RMS


def test_scaling_up_a_channel_with_outlier_activations_lowers_the_output_error() -> None:
    """AWQ's premise, with H = X^T X of inputs whose channel 3 is 30x larger than the rest: the rounding error of
    that column dominates the output error, and a finer grid share for it lowers the error."""
    torch.manual_seed(0)
    spec = LayerSpec(in_features=64, out_features=32, bits=3, group_size=32, has_bias=False)
    x = torch.randn(512, 64)
    x[:, 3] *= 30
    h = x.t() @ x
    weights = [torch.randn(32, 64) * 0.05]
    alpha, scales, errors = search_input_scale(weights, [spec], h, 512)
    assert errors[0.0] == pytest.approx(scaled_rounding_error(weights, [spec], h, torch.ones(64)))
    assert alpha > 0 and errors[alpha] < 0.8 * errors[0.0]
    assert scales[3] == scales.max()
    with pytest.raises(ValueError, match="no calibration token"):
        search_input_scale(weights, [spec], h, 0)


def test_scaling_is_folded_into_the_norms_without_changing_the_float_function() -> None:
    """At 8 bits the rounding is nearly lossless, so a wrong fold (norm and weights not inverse) would show as a
    large output error; with it the quantized model stays as close to the float model as without scaling."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    held = samples(8, seed=2)
    with torch.no_grad():
        reference = base(input_ids=held).logits
    errors, models = {}, {}
    for scaling in (False, True):
        model = copy.deepcopy(base)
        config = SplitQuantConfig(bits=8, group_size=32, rounding="gptq", activation_scaling=scaling)
        hf_splitquant.quantize(model, config, calibration_data=samples(16, seed=1), batch_size=4, progress=False)
        with torch.no_grad():
            errors[scaling] = float((model(input_ids=held).logits - reference).pow(2).mean())
        models[scaling] = model
    report = models[True].calibration_report["activation_scaling"]
    # two stages per block fed by a norm (q/k/v, gate/up); o_proj and down_proj are fed by other layers
    assert [(r["block"], r["norm"]) for r in report] == [
        (0, "input_layernorm"), (0, "post_attention_layernorm"), (1, "input_layernorm"), (1, "post_attention_layernorm")]
    assert report[0]["layers"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                   "model.layers.0.self_attn.v_proj"]
    assert all(r["error_ratio"] <= 1.0 for r in report)
    scaled = [r for r in report if r["alpha"] > 0]
    assert scaled  # the test exercises the fold
    block = scaled[0]["block"]
    norm_before = getattr(base.model.layers[block], scaled[0]["norm"]).weight
    norm_after = getattr(models[True].model.layers[block], scaled[0]["norm"]).weight
    assert not torch.equal(norm_before, norm_after)
    assert errors[True] < 2 * errors[False] + 1e-9
    assert models[False].calibration_report["activation_scaling"] == []


def test_a_scaled_model_saves_and_reloads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = SplitQuantConfig(bits=3, group_size=32, rounding="gptq", activation_scaling=True)
    hf_splitquant.quantize(model, config, calibration_data=samples(8, seed=1), batch_size=4, progress=False)
    ids = samples(2, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.activation_scaling is True
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"activation_scaling": True}, "set `rounding`"),
    ({"activation_scaling": True, "rounding": "gptq", "transform": "splitquant"}, "RTN format"),
    ({"activation_scaling": True, "rounding": "gptq", "rounding_options": {"target": "float"}}, "target='float'"),
    ({"activation_scaling": "yes", "rounding": "gptq"}, "True or False"),
])
def test_bad_activation_scaling_settings_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitQuantConfig(bits=3, group_size=32, **kwargs)
