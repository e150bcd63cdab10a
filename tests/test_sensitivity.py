"""Sensitivity-aware bit allocation (``bit_allocation="sensitivity"``): the Fisher-weighted round-off error
that feeds MixQuant's budget search."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import hf_splitquant
from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.calibration.sensitivity import fisher_errors, input_channel_rms
from hf_splitquant.methods import dequantize_weight, quantize_weight
from hf_splitquant.methods.coding_length import coding_length, input_weighted
from hf_splitquant.modeling import float_weight, select_modules, spec_for_module

pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=generator)


def sensitivity_config(**kwargs) -> SplitQuantConfig:  # noqa: ANN003
    settings = {"bits": 3, "group_size": 32, "bit_allocation": "sensitivity", "target_bits": 3.5,
                "mixquant_candidates": [2, 3, 4], "rounding": "gptq"}
    return SplitQuantConfig(**{**settings, **kwargs})


def test_config_needs_target_bits_and_calibration() -> None:
    with pytest.raises(ValueError, match="target_bits"):
        SplitQuantConfig(bit_allocation="sensitivity", rounding="gptq")
    with pytest.raises(ValueError, match="calibration_data.*mixquant"):
        SplitQuantConfig(bit_allocation="sensitivity", target_bits=3.0)
    assert sensitivity_config().bit_allocation == "sensitivity"


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_fisher_errors_match_per_sample_gradients(build) -> None:  # noqa: ANN001
    """1/2 sum F * dW^2 with F the sum of squared per-sample gradients of the summed token loss, computed
    here with plain autograd, one sample at a time."""
    torch.manual_seed(0)
    model = build().eval()
    config = sensitivity_config()
    modules = dict(select_modules(model, config))
    ids = samples(4)
    batches = [{"input_ids": ids[:3], "attention_mask": torch.ones_like(ids[:3])},
               {"input_ids": ids[3:], "attention_mask": torch.ones_like(ids[3:])}]
    batches[0]["attention_mask"][1, -5:] = 0  # padding is not scored

    errors = fisher_errors(model, modules, lambda n, b: spec_for_module(config, modules[n], bits=b), [2, 4],
                           batches, torch.device("cpu"))

    fisher = {n: torch.zeros_like(float_weight(m)) for n, m in modules.items()}
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            row_ids, row_mask = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
            labels = row_ids.masked_fill(row_mask == 0, -100)
            params = [m.weight for m in modules.values()]
            logits = model(input_ids=row_ids, attention_mask=row_mask).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != -100
            loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            grads = torch.autograd.grad(loss, params)
            for (n, m), g in zip(modules.items(), grads):
                fisher[n] += (g.t() if g.shape != float_weight(m).shape or type(m).__name__ == "Conv1D" else g) ** 2
    for n, m in modules.items():
        w = float_weight(m).float()
        for b in (2, 4):
            spec = spec_for_module(config, m, bits=b)
            restored = dequantize_weight(quantize_weight(w, spec), spec, torch.float32)
            expected = float((fisher[n] * (restored - w) ** 2).sum() / 2)
            assert errors[n][b] == pytest.approx(expected, rel=1e-4), (n, b)
        assert errors[n][2] > errors[n][4] > 0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # left as found


def test_layers_the_loss_ignores_get_the_fewest_bits() -> None:
    """With block 0's attention output zeroed, its q/k/v/o cannot change the loss: their Fisher-weighted
    errors are 0 and the budget goes to the other layers (MixQuant's data-free error rates them like any
    other layer)."""
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    ignored = [f"layers.0.self_attn.{p}_proj" for p in "qkvo"]
    config = sensitivity_config(target_bits=3.2)
    hf_splitquant.quantize(model, config, calibration_data=samples(8), batch_size=4, progress=False)
    widths = {n.removeprefix("model."): spec["bits"] for n, spec in model.config.quantization_config.layers.items()}
    assert {widths[n] for n in ignored} == {2}
    others = [b for n, b in widths.items() if n not in ignored]
    assert max(others) > 2  # the budget went to the layers that matter
    assert quantization_report(model).bits_per_weight <= 3.2 + 1e-9


def test_models_without_a_loss_are_refused_with_the_alternative() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match="mixquant"):
        hf_splitquant.quantize(model, sensitivity_config(), calibration_data=samples(4), batch_size=2, progress=False)


def test_input_channel_rms_is_the_rms_of_each_layers_real_input_tokens() -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = sensitivity_config(bit_allocation="coding_length_inputs")
    modules = dict(select_modules(model, config))
    ids = samples(3)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0  # padding does not count
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    rms = input_channel_rms(model, modules, batches, torch.device("cpu"))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach())) for n, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    for name in modules:
        real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen[name], batches)])
        assert real.shape[0] == int(mask.sum())
        torch.testing.assert_close(rms[name], real.pow(2).mean(dim=0).sqrt(), rtol=1e-5, atol=1e-7)


def test_input_weighted_coding_length_ignores_scale_and_follows_the_inputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    ones = torch.ones(32)
    weighted = input_weighted(w, ones)
    assert float(weighted.pow(2).mean()) == pytest.approx(1.0)
    # the faithful form changes with the weights' scale; the input-weighted form does not
    assert coding_length(10 * w, 0.5) != pytest.approx(coding_length(w, 0.5))
    assert coding_length(input_weighted(10 * w, ones), 0.5) == pytest.approx(coding_length(weighted, 0.5))
    # inputs concentrated on a few channels: the weighted matrix is close to low rank, so it codes shorter
    few = torch.full((32,), 1e-3)
    few[:2] = 1.0
    assert coding_length(input_weighted(w, few), 0.5) < 0.5 * coding_length(weighted, 0.5)
    assert coding_length(input_weighted(w, torch.zeros(32)), 0.5) == 0.0
    with pytest.raises(ValueError, match="shape"):
        input_weighted(w, torch.ones(31))


def test_a_layer_without_input_gets_the_fewest_bits_by_input_weighted_coding_length() -> None:
    """With block 0's values zeroed, its o_proj only ever sees zeros: it needs no bits, and the faithful form
    (on the weights alone) cannot tell."""
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.zero_()
    config = sensitivity_config(bit_allocation="coding_length_inputs", target_bits=3.2)
    hf_splitquant.quantize(model, config, calibration_data=samples(8), batch_size=4, progress=False)
    widths = {n.removeprefix("model."): spec["bits"] for n, spec in model.config.quantization_config.layers.items()}
    assert widths["layers.0.self_attn.o_proj"] == 2
    assert max(widths.values()) > 2
    assert quantization_report(model).bits_per_weight <= 3.2 + 1e-9
    with pytest.raises(ValueError, match="target_bits"):
        SplitQuantConfig(bit_allocation="coding_length_inputs", rounding="gptq")
    with pytest.raises(ValueError, match="calibration"):
        SplitQuantConfig(bit_allocation="coding_length_inputs", target_bits=3.0)
