"""SplitQuantConfig validation, serialisation and registration."""

from __future__ import annotations

import importlib
import json

import pytest
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
)

import hf_splitquant
from hf_splitquant import SplitQuantConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -64}, "group_size"),
        ({"group_size": 1.5}, "group_size"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"transform": "rtn2"}, "transform"),
        ({"splitquant_range": "tight"}, "splitquant_range"),
        ({"scale_dtype": "bfloat16"}, "scale_dtype"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
        ({"seed": None}, "seed"),
        ({"layers": {"a": {"bits": 2}}}, "layers"),
        ({"layers": []}, "layers"),
        ({"format_version": 0}, "format_version"),
        ({"quant_method": "gptq"}, "quant_method"),
        ({"bitz": 2}, "unknown fields"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SplitQuantConfig(**kwargs)


def test_newer_format_version_says_which_is_needed() -> None:
    with pytest.raises(ValueError, match=r"version 99.*upgrade"):
        SplitQuantConfig(format_version=99)


def test_round_trip_through_json() -> None:
    cfg = SplitQuantConfig(bits=3, group_size=None, transform="splitquant", modules_to_not_convert=["lm_head"],
                           layers={"encoder.dense": {"in_features": 8, "out_features": 4, "bits": 3}})
    data = json.loads(json.dumps(cfg.to_dict()))
    again = SplitQuantConfig.from_dict(data)
    assert again == cfg
    assert again.layer_specs()["encoder.dense"].group_size is None
    assert data["quant_method"] == "splitquant"


def test_registration_is_idempotent() -> None:
    importlib.reload(hf_splitquant)
    hf_splitquant.integrations.transformers.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["splitquant"] is hf_splitquant.SplitQuantConfig
    quantizer = AutoHfQuantizer.from_config(SplitQuantConfig(bits=2).to_dict(), pre_quantized=False)
    assert isinstance(quantizer, AUTO_QUANTIZER_MAPPING["splitquant"])
    assert quantizer.is_serializable() and quantizer.is_trainable and not quantizer.is_qat_trainable  # adapters only
