"""Hostile, broken or mismatched checkpoints fail with a clear error; degenerate weights quantize
cleanly; saves are deterministic."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import edit_quantization_config as _config
from helpers import load_causal_lm as _load
from helpers import model_output, tiny_llama
from helpers import rewrite_safetensors as _rewrite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig
from hf_splitquant.checkpoint import (
    DIGEST_METADATA_PREFIX,
    FORMAT_METADATA_KEY,
    CheckpointError,
    tensor_digest,
)
from hf_splitquant.saving import save_quantized

LAYER = "model.layers.0.mlp.down_proj"
MAP_KEY = "layers.0.mlp.down_proj"  # the per-layer map is keyed relative to the base model


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, float_checkpoints) -> Path:
    path = tmp_path_factory.mktemp("packed") / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(
        float_checkpoints["llama"], quantization_config=SplitQuantConfig(bits=3, group_size=16, transform="splitquant"))
    model.save_pretrained(path)
    return path


@pytest.fixture
def copy(packed_dir, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(packed_dir, target)
    return target


def test_every_saved_tensor_has_a_digest(packed_dir):
    with safe_open(packed_dir / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
        assert metadata[FORMAT_METADATA_KEY] == "2"  # no packed embedding: still readable by version-2 readers
        for key in handle.keys():
            assert metadata[DIGEST_METADATA_PREFIX + key] == tensor_digest(handle.get_tensor(key))


def test_truncated_file(copy):
    file = copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _load(copy)


def test_flipped_data_byte_is_caught_by_digest(copy):
    file = copy / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3000] ^= 0x55
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        _load(copy)


def test_garbage_header(copy):
    file = copy / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[20:40] = b"\x00" * 20
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        _load(copy)


def test_missing_tensor(copy):
    _rewrite(copy, lambda t, m: t.pop(f"{LAYER}.weight_scale"))
    with pytest.raises(CheckpointError, match=r"missing"):
        _load(copy)


def test_extra_tensor_in_quantized_layer(copy):
    _rewrite(copy, lambda t, m: t.__setitem__(f"{LAYER}.weight_zero", torch.zeros(3, 3, dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        _load(copy)


def test_dtype_disagrees_with_map(copy):
    _rewrite(copy, lambda t, m: t.__setitem__(f"{LAYER}.weight_scale", t[f"{LAYER}.weight_scale"].float()))
    with pytest.raises(CheckpointError, match="do not belong together"):
        _load(copy)


def test_map_bits_disagree_with_files(copy):
    _config(copy, lambda q: q["layers"][MAP_KEY].__setitem__("bits", 4))
    with pytest.raises(CheckpointError, match="do not belong together"):
        _load(copy)


def test_map_names_missing_module(copy):
    _config(copy, lambda q: q["layers"].__setitem__("layers.7.mlp.up_proj", q["layers"][MAP_KEY]))
    with pytest.raises(ValueError, match="does not have"):
        _load(copy)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("bits", 9, "bits"), ("group_size", 0, "group_size"), ("ocs_expand_ratio", 5.0, "ocs_expand_ratio"),
     ("transform", "magic", "transform"), ("in_features", -1, "in_features")],
)
def test_out_of_range_layer_spec(copy, field, value, message):
    _config(copy, lambda q: q["layers"][MAP_KEY].__setitem__(field, value))
    with pytest.raises(ValueError, match=message):
        _load(copy)


def test_absurd_declared_shape_fails_before_allocating(copy):
    _config(copy, lambda q: q["layers"][MAP_KEY].update(in_features=10**12, out_features=10**12))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="in the model but the checkpoint"):
        _load(copy)
    assert time.perf_counter() - start < 30


def test_newer_format_version_in_config_and_header(copy, tmp_path):
    _config(copy, lambda q: q.__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="upgrade hf_splitquant"):
        _load(copy)
    _config(copy, lambda q: q.__setitem__("format_version", 1))
    _rewrite(copy, lambda t, m: m.__setitem__(FORMAT_METADATA_KEY, "99"))
    with pytest.raises(CheckpointError, match="upgrade hf_splitquant"):
        _load(copy)


def test_header_without_hf_splitquant_metadata(copy):
    _rewrite(copy, lambda t, m: m.clear())
    with pytest.raises(CheckpointError, match="not written by hf_splitquant"):
        _load(copy)


def _forge(key: str, value: torch.Tensor):  # noqa: ANN202
    """Replace a tensor AND its digest: a crafted file whose checksums are consistent."""

    def edit(tensors, metadata):  # noqa: ANN001, ANN202
        tensors[key] = value
        metadata[DIGEST_METADATA_PREFIX + key] = tensor_digest(value)

    return edit


def test_nan_scales_in_a_consistent_file(copy):
    scale = load_file(copy / "model.safetensors")[f"{LAYER}.weight_scale"].clone()
    scale[0, 0, 0] = math.nan
    _rewrite(copy, _forge(f"{LAYER}.weight_scale", scale))
    with pytest.raises(CheckpointError, match="NaN"):
        _load(copy)


def test_cluster_ids_out_of_range(copy):
    ids = load_file(copy / "model.safetensors")[f"{LAYER}.weight_cluster"].clone()
    ids[0] = 250
    _rewrite(copy, _forge(f"{LAYER}.weight_cluster", ids))
    with pytest.raises(CheckpointError, match="base-3"):
        _load(copy)


def test_pickle_checkpoint_is_refused(copy):
    tensors = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    torch.save(tensors, copy / "pytorch_model.bin")
    with pytest.raises((CheckpointError, OSError, ValueError), match="safetensors"):
        _load(copy)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0.0, 1.0, exclude_max=True), flip=st.integers(1, 255))
def test_fuzz_mutated_bytes_never_load_silently(packed_dir, tmp_path_factory, position, flip):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(packed_dir, folder, dirs_exist_ok=True)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    index = int(position * len(data))
    data[index] ^= flip
    file.write_bytes(bytes(data))
    start = time.perf_counter()
    try:
        _load(folder)
    except (ValueError, RuntimeError, OSError) as err:  # CheckpointError is a ValueError
        assert str(err)
    else:
        # the only mutations that may load are inside the header's JSON whitespace/metadata values
        # that nothing reads; the tensor data itself is always verified
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
        assert index < 8 + header_len
    assert time.perf_counter() - start < 60


# ---- degenerate weights ------------------------------------------------------------------------


@pytest.mark.parametrize("transform", [None, "splitquant", "ocs"])
def test_degenerate_weights_quantize_cleanly(transform, input_ids):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with torch.no_grad():
        layers = model.model.layers
        layers[0].mlp.down_proj.weight.zero_()  # all-zero layer
        layers[0].mlp.up_proj.weight.fill_(0.125)  # constant layer
        layers[1].mlp.gate_proj.weight[3].zero_()  # an all-zero row
        layers[1].self_attn.q_proj.weight.copy_(torch.sign(layers[1].self_attn.q_proj.weight) * 0.05)  # two values
    config = SplitQuantConfig(bits=2, group_size=40, transform=transform)  # 64 and 96 inputs: ragged groups
    quantized = hf_splitquant.quantize(model, config, progress=False)
    out = model_output(quantized, input_ids)
    assert torch.isfinite(out).all()
    down = quantized.model.layers[0].mlp.down_proj.dequantize_weight(torch.float32)
    assert torch.equal(down, torch.zeros_like(down))
    up = quantized.model.layers[0].mlp.up_proj.dequantize_weight(torch.float32)
    assert torch.allclose(up, torch.full_like(up, 0.125), rtol=1e-3)


def test_extreme_bf16_weights_need_float32_scales():
    model = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e30
    with pytest.raises(ValueError, match=r"down_proj.*scale_dtype='float32'"):
        hf_splitquant.quantize(model, SplitQuantConfig(bits=4), progress=False)
    quantized = hf_splitquant.quantize(model, SplitQuantConfig(bits=4, scale_dtype="float32"), progress=False)
    assert torch.isfinite(quantized.model.layers[0].mlp.down_proj.weight_scale).all()


def test_nan_weight_is_an_error_naming_the_layer(float_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"])
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[2, 5] = math.nan
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj.*NaN"):
        hf_splitquant.quantize(model, SplitQuantConfig(bits=4), progress=False)
    assert not list(hf_splitquant.modeling.iter_packed_modules(model))  # left untouched
    model.save_pretrained(tmp_path)
    # while loading, transformers collects the op's error into its load report and refuses the model
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with pytest.raises((ValueError, RuntimeError)):
            AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=SplitQuantConfig(bits=4))
    finally:
        hf_logger.removeHandler(handler)
    report = "\n".join(records)
    assert "cannot quantize layer `model.layers.1.self_attn.k_proj`: weight contains NaN" in report


# ---- determinism -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("transform", [None, "splitquant", "ocs"])
def test_same_model_config_seed_give_identical_bytes(float_checkpoints, tmp_path, transform):
    config = SplitQuantConfig(bits=3, group_size=16, transform=transform, seed=5)
    files, plain = [], []
    for run in range(3):
        model = AutoModelForCausalLM.from_pretrained(float_checkpoints["gpt2"], quantization_config=config)
        save_quantized(model, tmp_path / f"canonical{run}")
        files.append((tmp_path / f"canonical{run}" / "model.safetensors").read_bytes())
        model.save_pretrained(tmp_path / f"plain{run}")
        data = (tmp_path / f"plain{run}" / "model.safetensors").read_bytes()
        plain.append(data[8 + int.from_bytes(data[:8], "little"):])
    assert files[0] == files[1] == files[2]
    # plain save_pretrained: identical tensor data; only the header's metadata order may vary
    assert plain[0] == plain[1] == plain[2]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "canonical0") is not None  # still a valid checkpoint
