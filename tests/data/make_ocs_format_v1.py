"""How ``tests/data/ocs_format_v1`` was made: run with the packed format version 1 code (any commit before the "source_group" OCS layout) as
``python tests/data/make_ocs_format_v1.py tests/data/ocs_format_v1``. Kept to document the fixture."""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_splitquant
from hf_splitquant import SplitQuantConfig

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2)
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    model.model.layers[0].mlp.down_proj.weight[:, 5] *= 8  # an outlier channel for OCS to split
config = SplitQuantConfig(bits=4, group_size=32, transform="ocs", ocs_expand_ratio=0.05)
quantized = hf_splitquant.quantize(model, config, progress=False)
out = sys.argv[1]
hf_splitquant.save_quantized(quantized, out)
ids = torch.arange(3, 19).reshape(2, 8)
with torch.no_grad(), hf_splitquant.kernel_mode("reference"):
    logits = quantized(input_ids=ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out}/expected_logits.safetensors")
with open(f"{out}/config.json") as fh:
    print(json.load(fh)["quantization_config"]["format_version"])
