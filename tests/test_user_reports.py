"""What a user reads about a quantized model says what it really is: the effective grouping of every
layer (a ``group_size`` wider than a layer is one group per output channel) and layers listed in
model order by ``hf-splitquant inspect``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import VOCAB, model_output, tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig, format_report, quantization_report
from hf_splitquant.cli import main
from hf_splitquant.methods import get_format, quantize_weight
from hf_splitquant.report import natural_key
from hf_splitquant.spec import LayerSpec


def test_group_wider_than_the_layer_is_reported_per_channel(tmp_path, input_ids):
    # tiny Llama: q/k/v/o/gate/up read 64 inputs, down_proj 96; groups of 80 fit only down_proj
    torch.manual_seed(0)
    model = hf_splitquant.quantize(tiny_llama(), SplitQuantConfig(bits=4, group_size=80), progress=False)
    report = quantization_report(model)
    groups = {layer.name.rsplit(".", 1)[-1]: layer.group_size for layer in report.layers}
    assert groups["down_proj"] == 80
    assert {g for name, g in groups.items() if name != "down_proj"} == {None}
    table = format_report(report)
    q_line = next(line for line in table.splitlines() if "q_proj" in line)
    assert " chan " in q_line and " 80 " not in q_line
    # the per-layer map on disk says the same, and the model reloads to the same outputs
    model.save_pretrained(tmp_path / "q")
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["layers.0.self_attn.q_proj"]["group_size"] is None
    assert layers["layers.0.mlp.down_proj"]["group_size"] == 80
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(model_output(model.eval(), input_ids), model_output(reloaded.eval(), input_ids))


@pytest.mark.parametrize(("transform", "extra"), [
    ("rtn", {}), ("splitquant", {}), ("ocs", {"ocs_expand_ratio": 0.05, "ocs_layout": "source_group"}),
])
def test_per_channel_label_changes_no_stored_value(transform, extra):
    """Recording ``group_size >= in_features`` as per channel is a relabelling: the same bytes are stored."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g) * 0.05
    wide = SplitQuantConfig(bits=3, group_size=128, transform=transform, **extra).spec_for(96, 40, False)
    assert wide.group_size is None
    given = LayerSpec(96, 40, bits=3, group_size=128, transform=transform, has_bias=False,
                      **{k: v for k, v in wide.to_dict().items() if k.startswith("ocs_") or k == "splitquant_range"})
    assert get_format(wide).stored_bytes(wide) == get_format(given).stored_bytes(given)
    a, b = quantize_weight(w, wide), quantize_weight(w, given)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ocs_appended_keeps_a_group_that_covers_only_the_original_columns():
    # version 1 layout: the copies form the last group, so 96 + 5 columns in groups of 96 are two groups
    spec = SplitQuantConfig(bits=3, group_size=96, transform="ocs", ocs_layout="appended").spec_for(96, 40, False)
    assert spec.group_size == 96


def test_natural_key_orders_module_paths_like_the_model():
    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp", "model.layers.0.mlp",
             "lm_head", "model.layers.1.attn"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.0.mlp", "model.layers.1.attn",
                                              "model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp"]


def test_inspect_lists_layers_in_model_order(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=12,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = hf_splitquant.quantize(LlamaForCausalLM(cfg), SplitQuantConfig(bits=4, group_size=None), progress=False)
    model.save_pretrained(tmp_path / "q")
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    names = [layer["name"] for layer in json.loads(capsys.readouterr().out)["layers"]]
    blocks = [int(re.search(r"\d+", name).group()) for name in names]  # map keys: layers.N....
    assert blocks == sorted(blocks) and blocks[0] == 0 and blocks[-1] == 11
    assert main(["inspect", str(tmp_path / "q")]) == 0
    table = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("layers.")]
    assert table == names
