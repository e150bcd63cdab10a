"""Shared fixtures: tiny real transformers models built from configs (no Hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

import hf_splitquant  # noqa: F401  (registers the quantizer)

torch.set_num_threads(2)
hf_logging.disable_progress_bar()

VOCAB = 120


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=100, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


TINY_MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def model_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="session")
def float_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each tiny model saved once as a float safetensors checkpoint."""
    root = tmp_path_factory.mktemp("float")
    paths = {}
    for name, build in TINY_MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        path = root / name
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
