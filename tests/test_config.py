"""SplitQuantConfig validation, serialisation and registration."""

from __future__ import annotations

import importlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
field_names = st.sampled_from(sorted(SplitQuantConfig()._field_names()) + ["bogus"])


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=5))
def test_fuzzed_configs_raise_only_value_error_and_round_trip(data: dict) -> None:
    try:
        cfg = SplitQuantConfig.from_dict(data)
    except ValueError:
        return
    again = SplitQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([None, 16, 64]),
       transform=st.sampled_from([None, "splitquant", "ocs"]), symmetric=st.booleans(),
       ratio=st.floats(0.0, 0.2), seed=st.integers(0, 10**6))
def test_valid_configs_round_trip(bits, group, transform, symmetric, ratio, seed) -> None:
    cfg = SplitQuantConfig(bits=bits, group_size=group, transform=transform, symmetric=symmetric,
                           ocs_expand_ratio=ratio, seed=seed)
    assert SplitQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
