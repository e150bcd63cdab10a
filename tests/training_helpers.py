"""A tiny BERT classifier and a learnable toy dataset shared by the training tests (R2, QAT, LoRA)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB, SEQ = 60, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Tiny models train several times faster on one thread (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, num_labels=3, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def dataset(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Class ``c`` draws half of its tokens from its own third of the vocabulary: learnable in ~50 steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    own = 3 + labels[:, None] * 19 + torch.randint(0, 19, (n, SEQ), generator=g)
    noise = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    ids = torch.where(torch.rand(n, SEQ, generator=g) < 0.5, noise, own)
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
