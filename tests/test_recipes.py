"""Named presets: each builds a valid configuration that quantizes a model; bad names and settings are
refused with the list of what exists."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

import hf_splitquant
from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.recipes import RECIPES, recipe_names

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_quantizes_a_model(name: str) -> None:
    config = SplitQuantConfig.recipe(name)
    assert SplitQuantConfig.from_dict(config.to_dict()) == config
    torch.manual_seed(0)
    model = tiny_llama().eval()
    data = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    hf_splitquant.quantize(model, config, calibration_data=data if RECIPES[name].needs_calibration else None,
                           batch_size=4, progress=False)
    report = quantization_report(model)
    if config.bit_allocation:  # per-layer widths within the budget
        assert {layer.bits for layer in report.layers} <= set(config.mixquant_candidates)
        assert report.bits_per_weight <= config.target_bits + 1e-9
    else:
        assert {layer.bits for layer in report.layers} == {config.bits}
    assert hasattr(model, "calibration_report") == RECIPES[name].needs_calibration


def test_recipe_overrides_and_errors() -> None:
    config = SplitQuantConfig.recipe("w3", group_size=64)
    assert (config.bits, config.group_size, config.rounding) == (3, 64, "gptq")
    assert SplitQuantConfig.recipe("w3").group_size == 128  # the preset itself is not changed
    tuned = SplitQuantConfig.recipe("w3", rounding_options={"damping": 0.5})
    assert tuned.rounding_options == {"damping": 0.5}
    assert not (SplitQuantConfig.recipe("w3").rounding_options or {}).get("damping")  # the preset is not changed
    with pytest.raises(ValueError, match="unknown recipe 'w5'.*w4"):
        SplitQuantConfig.recipe("w5")
    with pytest.raises(ValueError, match="bitz"):
        SplitQuantConfig.recipe("w3", bitz=3)
    with pytest.raises(ValueError):
        SplitQuantConfig.recipe("w3", bits=9)
