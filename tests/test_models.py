"""Tiny BERT, Llama and GPT-2 built from configs: float -> quantized while loading -> saved -> reloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODELS, model_output
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import hf_splitquant
from hf_splitquant import PackedLinear, SplitQuantConfig, kernels
from hf_splitquant.checkpoint import FORMAT_METADATA_KEY
from hf_splitquant.modeling import iter_packed_modules

AUTO = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("transform", [None, "splitquant"])
@pytest.mark.parametrize("bits", [pytest.param(2, marks=pytest.mark.slow), 3, 4,
                                  pytest.param(8, marks=pytest.mark.slow)])  # 3 and 4 bits in make test-fast
def test_quantize_on_load_save_reload_bit_exact(float_checkpoints, tmp_path, input_ids, arch, transform, bits):
    auto = AUTO[arch]
    cfg = SplitQuantConfig(bits=bits, group_size=16, transform=transform)
    model = auto.from_pretrained(float_checkpoints[arch], quantization_config=cfg).eval()
    packed = dict(iter_packed_modules(model))
    assert packed, "no layer was quantized"
    assert all(m.spec.bits == bits and m.spec.transform == (transform or "rtn") for m in packed.values())
    out = model_output(model, input_ids)

    model.save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved_cfg["quant_method"] == "splitquant"
    assert saved_cfg["format_version"] == 2  # the oldest version that describes it (3 only with packed embeddings)
    assert len(saved_cfg["layers"]) == len(packed)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata()[FORMAT_METADATA_KEY] == "2"
        # no float weight of a quantized layer was written
        for name in packed:
            assert f.get_slice(f"{name}.weight").get_dtype() == "U8"

    reloaded = auto.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, input_ids), out)
    before, after = _state(model), _state(reloaded)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_aligned_splitquant_is_format_version_4_and_reloads_bit_exact(float_checkpoints, tmp_path, input_ids):
    cfg = SplitQuantConfig(bits=2, group_size=16, transform="splitquant", splitquant_range="aligned")
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=cfg).eval()
    out = model_output(model, input_ids)
    model.save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved_cfg["format_version"] == 4  # older readers say "upgrade hf_splitquant"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata()[FORMAT_METADATA_KEY] == "4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, input_ids), out)
    assert all(m.spec.splitquant_range == "aligned" for _, m in iter_packed_modules(reloaded))


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_quantized_output_close_to_float_at_8_bits(float_checkpoints, input_ids, arch):
    auto = AUTO[arch]
    ref = model_output(auto.from_pretrained(float_checkpoints[arch]).eval(), input_ids)
    q8 = auto.from_pretrained(float_checkpoints[arch], quantization_config=SplitQuantConfig(bits=8, group_size=32))
    q2 = auto.from_pretrained(float_checkpoints[arch], quantization_config=SplitQuantConfig(bits=2, group_size=32))
    err8 = (model_output(q8.eval(), input_ids) - ref).abs().max()
    err2 = (model_output(q2.eval(), input_ids) - ref).abs().max()
    assert err8 < 0.02 * ref.abs().max()
    assert err8 < err2


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_explicit_quantize_matches_quantize_on_load(float_checkpoints, arch):
    auto = AUTO[arch]
    cfg = SplitQuantConfig(bits=3, group_size=16, transform="splitquant")
    on_load = auto.from_pretrained(float_checkpoints[arch], quantization_config=cfg)
    in_memory = hf_splitquant.quantize(auto.from_pretrained(float_checkpoints[arch]), cfg, progress=False)
    a, b = _state(on_load), _state(in_memory)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert in_memory.config.quantization_config.layers == on_load.config.quantization_config.layers


def test_skips_heads_tied_weights_and_embeddings(float_checkpoints):
    bert = AutoModelForSequenceClassification.from_pretrained(
        float_checkpoints["bert"], quantization_config=SplitQuantConfig(bits=4))
    assert isinstance(bert.classifier, torch.nn.Linear)
    assert isinstance(bert.bert.encoder.layer[0].attention.self.query, PackedLinear)
    llama = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=SplitQuantConfig(bits=4))
    assert isinstance(llama.lm_head, torch.nn.Linear)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight  # still tied
    gpt2 = AutoModelForCausalLM.from_pretrained(float_checkpoints["gpt2"], quantization_config=SplitQuantConfig(bits=4))
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, PackedLinear)
    assert gpt2.transformer.h[0].attn.c_attn.spec.source == "Conv1D"


def test_modules_to_not_convert_and_quantized_head(float_checkpoints):
    cfg = SplitQuantConfig(bits=4, modules_to_not_convert=["intermediate"])
    bert = AutoModelForSequenceClassification.from_pretrained(float_checkpoints["bert"], quantization_config=cfg)
    assert isinstance(bert.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    assert isinstance(bert.bert.encoder.layer[0].output.dense, PackedLinear)
    # an explicit list replaces the default, so the classifier head is quantized too
    assert isinstance(bert.classifier, PackedLinear)


def test_base_model_loads_head_model_checkpoint(float_checkpoints, tmp_path, input_ids):
    cfg = SplitQuantConfig(bits=4, transform="splitquant")
    head = AutoModelForSequenceClassification.from_pretrained(float_checkpoints["bert"], quantization_config=cfg)
    head.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base.encoder.layer[1].output.dense, PackedLinear)
    with torch.no_grad():
        expected = head.eval().bert(input_ids).last_hidden_state
        assert torch.equal(base(input_ids).last_hidden_state, expected)


def test_bfloat16_sharded_and_device_map_reloads(float_checkpoints, tmp_path, input_ids):
    cfg = SplitQuantConfig(bits=4, group_size=16, transform="splitquant")
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=cfg).eval()
    out = model_output(model, input_ids)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(Path(tmp_path).glob("model-*.safetensors"))) > 1
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), input_ids), out)
    auto_map = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    assert torch.equal(model_output(auto_map, input_ids), out)

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    layer = bf16.model.layers[0].mlp.down_proj
    assert layer.weight_scale.dtype == torch.float16  # scales are not cast to the model dtype
    assert layer.bias is None and bf16.model.norm.weight.dtype == torch.bfloat16
    ref = model.model.layers[0].mlp.down_proj.dequantize_weight(torch.float32)
    assert torch.equal(layer.dequantize_weight(torch.float32), ref)
    bf16_out = model_output(bf16, input_ids)
    assert bf16_out.dtype == torch.bfloat16
    assert torch.allclose(bf16_out.float(), out, atol=0.1 * out.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_dequantize_returns_float_model(float_checkpoints, input_ids, arch):
    auto = AUTO[arch]
    model = auto.from_pretrained(float_checkpoints[arch], quantization_config=SplitQuantConfig(bits=3)).eval()
    kernels.set_kernel_mode("reference")  # the exact float32 numerics (BERT's pooler sees 2 tokens: int4 kernel)
    try:
        out = model_output(model, input_ids)
    finally:
        kernels.set_kernel_mode("auto")
    model = model.dequantize()
    assert not list(iter_packed_modules(model))
    assert not getattr(model, "is_quantized", False)
    if arch == "gpt2":
        assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    assert torch.allclose(model_output(model, input_ids), out, atol=1e-5)


@pytest.mark.slow
def test_loading_without_import_fails_loudly(float_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(float_checkpoints["llama"], quantization_config=SplitQuantConfig(bits=8))
    model.save_pretrained(tmp_path)
    code = ("from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, ignore_mismatched_sizes=True)")
    # no import and the start-up hook off: what transformers does alone (tests/test_load_without_import.py
    # covers the hook and the package hidden altogether)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_SPLITQUANT_NO_AUTOLOAD": "1"})
    assert proc.returncode != 0
    assert "Unknown quantization type, got splitquant" in proc.stderr  # transformers names the unknown method
    # then refuses the checkpoint before reading a weight, quoting the guard in config.json
    assert "hf_splitquant packed low-bit checkpoint" in proc.stderr and "pip install -U hf-splitquant" in proc.stderr


def test_report_counts_every_stored_bit(float_checkpoints):
    for transform, extra in ((None, {"zero_points"}), ("splitquant", {"cluster_ids", "minimums"})):
        model = AutoModelForCausalLM.from_pretrained(
            float_checkpoints["llama"], quantization_config=SplitQuantConfig(bits=3, group_size=32, transform=transform))
        report = hf_splitquant.quantization_report(model)
        stored = sum(t.numel() * t.element_size() for _, m in iter_packed_modules(model)
                     for t in m.packed_tensors().values())
        assert report.packed_bytes == stored
        assert set(report.bytes_by_role()) == {"codes", "scales"} | extra
        assert report.bits_per_weight > 3
        assert report.model_bytes < report.float_model_bytes
        assert "bits per weight" in hf_splitquant.format_report(report)
