"""Packed input embeddings and output heads: ``SplitQuantConfig(embedding_bits=...)`` (issue 16, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, load_causal_lm, rewrite_safetensors, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig, kernels
from hf_splitquant.checkpoint import FORMAT_METADATA_KEY, CheckpointError
from hf_splitquant.nn.packed_embedding import PackedEmbedding, TiedPackedHead
from hf_splitquant.nn.packed_linear import PackedLinear
from hf_splitquant.spec import LayerSpec

IDS = torch.arange(3, 19).unsqueeze(0)


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _packed(make=tiny_llama, **settings) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    config = SplitQuantConfig(**({"bits": 4, "group_size": 32, "embedding_bits": 4} | settings))
    return hf_splitquant.quantize(make().eval(), config, progress=False)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [32, None])
def test_lookup_equals_the_dequantized_table_rows(bits: int, group_size: int | None) -> None:
    torch.manual_seed(bits)
    spec = LayerSpec(in_features=96, out_features=300, bits=bits, group_size=group_size, source="Embedding",
                     has_bias=False)
    emb = PackedEmbedding.from_float(torch.randn(300, 96), None, spec)
    table = emb.dequantize_weight(torch.float32)
    ids = torch.tensor([[0, 299, 31, 32, 63], [64, 287, 288, 5, 5]])
    assert torch.equal(emb(ids), table[ids])
    head = TiedPackedHead(emb)
    with torch.no_grad():
        assert emb.kernel_for(torch.randn(1, 96)) == "int4"  # the head takes PackedLinear's int4 kernel path
        head(torch.randn(1, 96))
    assert emb.codes_dropped  # the table lives in the int4 layout only now
    assert torch.equal(emb(ids), table[ids])  # rows read back from the layout, exactly
    assert torch.equal(emb.dequantize_weight(torch.float32), table)
    x = torch.randn(2, 96)
    with torch.no_grad(), kernels.kernel_mode("reference"):
        assert torch.allclose(head(x), x @ table.t(), atol=1e-4, rtol=1e-4)


def test_lookup_follows_the_model_dtype() -> None:
    spec = LayerSpec(in_features=64, out_features=50, bits=4, group_size=32, source="Embedding", has_bias=False)
    emb = PackedEmbedding.from_float(torch.randn(50, 64), None, spec)
    emb.to(torch.bfloat16)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert emb.weight_scale.dtype == torch.float16  # the stored grid keeps its dtype


def test_tied_head_is_one_packed_tensor_after_save_and_reload(tmp_path: Path) -> None:
    model = _packed()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, PackedEmbedding) and isinstance(head, TiedPackedHead) and head.embedding is emb
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    logits = _logits(model)  # decodes through the int4 layout, which then holds the table once
    assert emb._int4 is not None and emb.codes_dropped
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata()[FORMAT_METADATA_KEY] == "3"
    assert {k for k in keys if "embed" in k or "lm_head" in k} == {
        "model.embed_tokens.weight", "model.embed_tokens.weight_scale", "model.embed_tokens.weight_zero"}
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 3 and saved["layers"]["embed_tokens"]["source"] == "Embedding"
    reloaded = load_causal_lm(tmp_path)
    r_emb, r_head = reloaded.get_input_embeddings(), reloaded.get_output_embeddings()
    assert isinstance(r_head, TiedPackedHead) and r_head.embedding is r_emb
    assert torch.equal(_logits(reloaded), logits)
    # saving the reloaded model again writes the same bytes
    reloaded.save_pretrained(tmp_path / "again")
    with safe_open(tmp_path / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_quantize_on_load_equals_in_memory(make, tmp_path: Path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    make().save_pretrained(tmp_path)
    config = SplitQuantConfig(bits=4, group_size=32, embedding_bits=8)
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    in_memory = hf_splitquant.quantize(AutoModelForCausalLM.from_pretrained(tmp_path), config, progress=False)
    a, b = on_load.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(on_load.get_output_embeddings(), TiedPackedHead)
    assert torch.equal(_logits(on_load), _logits(in_memory))


def test_untied_head_is_packed_too(tmp_path: Path) -> None:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    model = hf_splitquant.quantize(LlamaForCausalLM(cfg).eval(), SplitQuantConfig(bits=4, group_size=32, embedding_bits=8),
                                   progress=False)
    head = model.get_output_embeddings()
    assert type(head) is PackedLinear and head.spec.bits == 8 and head.spec.transform == "rtn"
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(load_causal_lm(tmp_path)), logits)


def test_int8_embedding_and_layers_stay_close_to_float() -> None:
    torch.manual_seed(0)
    float_model = tiny_llama().eval()
    reference = _logits(float_model)
    torch.manual_seed(0)
    both = hf_splitquant.quantize(tiny_llama().eval(), SplitQuantConfig(bits=8, group_size=32, embedding_bits=8),
                                  progress=False)
    err = (_logits(both) - reference).abs().max()
    assert err < 0.05 * reference.abs().max()


def test_corrupt_packed_embedding_is_refused(tmp_path: Path) -> None:
    _packed().save_pretrained(tmp_path)

    def corrupt(tensors: dict, metadata: dict) -> None:
        tensors["model.embed_tokens.weight"][0] ^= 1

    rewrite_safetensors(tmp_path, corrupt)
    with pytest.raises(CheckpointError, match="embed_tokens"):
        load_causal_lm(tmp_path)


def test_dequantize_model_ties_the_float_head_again() -> None:
    model = _packed()
    table = model.get_input_embeddings().dequantize_weight(torch.float32)
    hf_splitquant.dequantize_model(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(emb) is torch.nn.Embedding and head.weight is emb.weight and torch.equal(emb.weight, table)


def test_encoder_input_embedding_is_packed() -> None:
    model = _packed(tiny_bert)
    assert isinstance(model.bert.embeddings.word_embeddings, PackedEmbedding)
    assert isinstance(model.bert.embeddings.position_embeddings, torch.nn.Embedding)


@pytest.mark.parametrize(("settings", "match"), [
    ({"embedding_bits": 1}, "embedding_bits"),
    ({"embedding_bits": 16}, "embedding_bits"),
    ({"embedding_bits": "4"}, "embedding_bits"),
    ({"embedding_bits": True}, "embedding_bits"),
    ({"embedding_bits": 4, "qat": True}, "qat"),
    ({"embedding_bits": 4, "rounding": "gptq"}, "rounding"),
])
def test_config_validation(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitQuantConfig(**settings)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="Embedding"):
        LayerSpec(in_features=8, out_features=8, bits=4, source="Embedding", has_bias=True)
    with pytest.raises(ValueError, match="Embedding"):
        LayerSpec(in_features=8, out_features=8, bits=4, source="Embedding", has_bias=False, transform="splitquant")


def test_cli_quantize_with_embedding_bits(float_checkpoints, tmp_path: Path) -> None:  # noqa: ANN001
    from hf_splitquant.cli import main

    out = tmp_path / "out"
    assert main(["quantize", float_checkpoints["llama"], "-o", str(out), "--embedding-bits", "4"]) == 0
    model = load_causal_lm(out)
    assert isinstance(model.get_output_embeddings(), TiedPackedHead)
    assert model.get_input_embeddings().spec.bits == 4


def test_model_card_says_the_embeddings_are_packed(tmp_path: Path) -> None:
    from hf_splitquant.integrations.hub import build_model_card

    _packed().save_pretrained(tmp_path)
    card = str(build_model_card(tmp_path))
    assert "| embeddings and head | packed, RTN int4" in card
    assert "embeddings, norms, tied weights and the output head" not in card


def test_bit_allocation_on_load_packs_the_embeddings_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "float")
    config = SplitQuantConfig(bits=4, group_size=32, bit_allocation="mixquant", target_bits=4.5, embedding_bits=8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).eval()
    assert isinstance(model.get_output_embeddings(), TiedPackedHead)
    assert model.config.quantization_config.format_version == 3
    logits = _logits(model)
    model.save_pretrained(tmp_path / "packed")
    assert torch.equal(_logits(load_causal_lm(tmp_path / "packed")), logits)
