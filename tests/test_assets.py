"""Tests for :mod:`splitquant_assets` (``assets/`` in the repository: real offline models and text).

Caches: the Wikipedia, sentence and fine-food tests build into a temporary cache shared by this
module (a few seconds each), so the build path itself is tested every run. The SmolLM2 test uses
the normal cache -- ``$HF_SPLITQUANT_CACHE``, else ``~/.cache/hf_splitquant`` -- because its
one-time GGUF conversion takes about 30 s; later runs reuse it. Everything runs offline
(``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from splitquant_assets import loaders as assets

_USER_CACHE = os.environ.get(assets.CACHE_ENV_VAR)


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point the asset cache at a fresh temporary folder for the rest of this module."""
    path = tmp_path_factory.mktemp("hf_splitquant_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(assets.CACHE_ENV_VAR, str(path))
        yield path


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 (model, tokenizer) from the installed package."""
    from transformers import AutoModel, AutoTokenizer

    folder = assets.minilm_path()
    model = AutoModel.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _no_leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp-" in path.name]


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV_VAR)
    assert assets.cache_dir() == Path.home() / ".cache" / "hf_splitquant"


def test_building_dir_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="killed"), assets._building_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed half-way")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with assets._building_dir(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in final.iterdir()] == ["whole.bin"]
    assert _no_leftovers(tmp_path) == []


@pytest.mark.slow
def test_minilm_embeddings(minilm) -> None:
    model, tokenizer = minilm
    assert model.config.hidden_size == 384
    pairs = [
        ("A man is playing a guitar.", "Someone is playing an acoustic guitar."),
        ("The cat sat on the mat.", "A cat was sitting on a rug."),
        ("The stock market fell sharply today.", "Share prices dropped steeply on Wall Street today."),
        ("How do I bake bread at home?", "What is a good recipe for homemade bread?"),
    ]
    sentences = [sentence for pair in pairs for sentence in pair]
    emb = assets.mean_pooled_embeddings(model, tokenizer, sentences, batch_size=3)
    assert emb.shape == (len(sentences), 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(sentences)), atol=1e-5, rtol=0)
    cos = emb @ emb.T
    same = torch.tensor([float(cos[2 * k, 2 * k + 1]) for k in range(len(pairs))])
    mask = torch.ones_like(cos, dtype=torch.bool)
    for k in range(len(pairs)):
        mask[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = False
    assert same.min() > cos[mask].max() + 0.1, (same, cos[mask].max())


@pytest.mark.slow
def test_mean_pooling_ignores_padding_and_batching(minilm) -> None:
    model, tokenizer = minilm
    sentences = ["Short one.", "A noticeably longer sentence, with many more tokens than the first."] * 3
    batched = assets.mean_pooled_embeddings(model, tokenizer, sentences, batch_size=6)
    single = assets.mean_pooled_embeddings(model, tokenizer, sentences, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert assets.mean_pooled_embeddings(model, tokenizer, []).shape == (0, 384)
    with pytest.raises(TypeError):
        assets.mean_pooled_embeddings(model, tokenizer, "not a list")


@pytest.mark.slow
def test_wikipedia_texts(tmp_cache: Path) -> None:
    start = time.perf_counter()
    texts = assets.wikipedia_texts()
    built = time.perf_counter() - start
    assert 100 <= len(texts) <= 110
    assert 2_900_000 <= sum(map(len, texts)) <= 3_300_000
    assert texts[0].startswith("Anarchism is a political philosophy")
    for text in texts:
        assert len(text.split()) >= 50
        assert "''" not in text and "\n\n\n" not in text and text == text.strip()
        assert not text.lower().startswith("#redirect")
        assert "\n==" not in text  # heading markup removed
    cached = tmp_cache / "wikipedia" / "articles-v1.jsonl"
    assert cached.is_file() and _no_leftovers(tmp_cache) == []
    start = time.perf_counter()
    assert assets.wikipedia_texts() == texts
    assert time.perf_counter() - start < max(0.5, built / 2)


@pytest.mark.slow
def test_wikipedia_split_is_disjoint(tmp_cache: Path) -> None:
    texts = assets.wikipedia_texts()
    assert len(set(texts)) == len(texts)
    eval_part = assets.wikipedia_split("eval")
    calibration = assets.wikipedia_split("calibration")
    assert eval_part == texts[::5]
    assert set(eval_part).isdisjoint(calibration)
    assert len(eval_part) + len(calibration) == len(texts)
    assert 0.1 < sum(map(len, eval_part)) / sum(map(len, texts)) < 0.35
    with pytest.raises(ValueError):
        assets.wikipedia_split("test")


@pytest.mark.slow
def test_perplexity_token_blocks(tmp_cache: Path, minilm) -> None:
    _, tokenizer = minilm
    blocks = assets.perplexity_token_blocks(tokenizer, 3, 64)
    assert blocks.shape == (3, 64) and blocks.dtype == torch.long
    eval_text = "\n\n".join(assets.wikipedia_split("eval"))
    expected = tokenizer(eval_text, add_special_tokens=False, verbose=False)["input_ids"]
    assert blocks.flatten().tolist() == expected[:192]
    assert tokenizer.cls_token_id not in blocks  # no special tokens
    calibration = assets.perplexity_token_blocks(tokenizer, 3, 64, part="calibration")
    assert not torch.equal(blocks, calibration)
    with pytest.raises(ValueError, match="tokens"):
        assets.perplexity_token_blocks(tokenizer, 1, len(expected) + 1)
    with pytest.raises(ValueError):
        assets.perplexity_token_blocks(tokenizer, 0, 8)


@pytest.mark.slow
def test_embedding_sentences(tmp_cache: Path) -> None:
    sentences = assets.embedding_sentences()
    assert 300 <= len(sentences) <= 2000
    assert len({s.lower() for s in sentences}) == len(sentences)
    assert all(5 <= len(s.split()) <= 60 for s in sentences)
    assert not any("__label__" in s or "''" in s for s in sentences)
    assert assets.embedding_sentences(25) == sentences[:25]
    assert assets.embedding_sentences() == sentences  # deterministic
    joined = "\n".join(sentences)
    assert "Mugabe" in joined  # Lee news corpus
    assert "doug liman, the director of bourne" in joined  # Pang & Lee reviews, detokenized
    assert "Anarchism is a political philosophy" in joined  # Wikipedia
    with pytest.raises(ValueError):
        assets.embedding_sentences(len(sentences) + 1)


def test_lee_similarity_pairs() -> None:
    documents, pairs = assets.lee_similarity_pairs()
    assert len(documents) == 50 and all(len(d.split()) > 40 for d in documents)
    assert len(pairs) == 1225
    assert len({(i, j) for i, j, _ in pairs}) == 1225
    assert all(0 <= i < j < 50 and 0.0 <= r <= 1.0 for i, j, r in pairs)
    assert len({r for _, _, r in pairs}) > 20


@pytest.mark.slow
def test_lee_spearman_with_minilm(minilm) -> None:
    stats = pytest.importorskip("scipy.stats")
    model, tokenizer = minilm
    documents, pairs = assets.lee_similarity_pairs()
    emb = assets.mean_pooled_embeddings(model, tokenizer, documents)
    cosine = [float(emb[i] @ emb[j]) for i, j, _ in pairs]
    rho = stats.spearmanr(cosine, [r for _, _, r in pairs]).statistic
    assert 0.4 < rho < 0.7, rho  # about 0.51 for the float model when the asset was chosen


@pytest.mark.slow
def test_finefood_reviews(tmp_cache: Path) -> None:
    with pytest.raises(ValueError):
        assets.finefood_reviews("validation")
    try:
        train = assets.finefood_reviews("train")
    except assets.AssetUnavailableError as error:  # no apt-get / package unknown to apt
        pytest.skip(f"r-cran-modeldata cannot be downloaded here: {error}")
    test = assets.finefood_reviews("test")
    assert (len(train), sum(r["score"] == "great" for r in train)) == (4000, 2600)
    assert (len(test), sum(r["score"] == "great" for r in test)) == (1000, 658)
    for record in train[:50] + test[:50]:
        assert set(record) == {"review", "score", "product"}
        assert record["score"] in {"great", "other"} and len(record["review"]) > 10
    provenance = json.loads((tmp_cache / "finefood" / "provenance.json").read_text())
    assert provenance["debian_package"] == "r-cran-modeldata"
    assert provenance["objects"] == {"train": "training_data", "test": "testing_data"}
    assert len(provenance["deb_sha256"]) == 64
    assert _no_leftovers(tmp_cache) == []


@pytest.mark.slow
def test_smollm2_reloads_and_has_sane_perplexity(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if _USER_CACHE is None:  # use the normal cache: the conversion is slow to repeat
        monkeypatch.delenv(assets.CACHE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(assets.CACHE_ENV_VAR, _USER_CACHE)
    folder = assets.smollm2_path()
    start = time.perf_counter()
    assert assets.smollm2_path() == folder
    assert time.perf_counter() - start < 0.5  # cached: only checks the marker
    for name in ("config.json", "model.safetensors", "tokenizer.json", "provenance.json"):
        assert (folder / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = assets.perplexity_token_blocks(tokenizer, 2, 128)
    model.eval()
    with torch.inference_mode():
        loss = model(input_ids=blocks, labels=blocks).loss
    perplexity = math.exp(float(loss))
    assert math.isfinite(perplexity) and perplexity < 100, perplexity
