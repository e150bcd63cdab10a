"""Real pretrained weights and real text (offline assets): all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import pytest
from transformers import AutoModel, AutoTokenizer

import splitquant_assets as assets
from hf_splitquant import SplitQuantConfig, quantization_report


@pytest.fixture(scope="module")
def minilm():
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = assets.embedding_sentences(96)
    reference = assets.mean_pooled_embeddings(AutoModel.from_pretrained(path).eval(), tokenizer, sentences)
    return path, tokenizer, sentences, reference


def _cosine(minilm, model) -> float:
    _, tokenizer, sentences, reference = minilm
    return float((assets.mean_pooled_embeddings(model.eval(), tokenizer, sentences) * reference).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [None, 64])
def test_splitquant_int2_beats_rtn_int2_on_minilm(minilm, tmp_path, group_size):
    path = minilm[0]
    cosines, bpw = {}, {}
    for transform in (None, "splitquant"):
        config = SplitQuantConfig(bits=2, group_size=group_size, transform=transform)
        model = AutoModel.from_pretrained(path, quantization_config=config)
        folder = tmp_path / str(transform)
        model.save_pretrained(folder)
        reloaded = AutoModel.from_pretrained(folder)  # the figure is measured on the reloaded checkpoint
        assert len(quantization_report(reloaded).layers) == 36
        cosines[transform] = _cosine(minilm, reloaded)
        bpw[transform] = quantization_report(reloaded).bits_per_weight
    # SplitQuant's claim at INT2: far closer to float than plain INT2 at the same group size
    assert cosines["splitquant"] > cosines[None] + 0.3, cosines
    assert cosines["splitquant"] > 0.8, cosines
    # and it pays for it in bits: cluster ids and three grids are counted
    assert bpw["splitquant"] > bpw[None] + 1.5, bpw


@pytest.mark.slow
def test_int8_is_near_lossless_on_minilm(minilm):
    model = AutoModel.from_pretrained(minilm[0], quantization_config=SplitQuantConfig(bits=8, group_size=None))
    assert _cosine(minilm, model) > 0.999
