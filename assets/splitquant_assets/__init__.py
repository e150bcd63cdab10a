"""Offline real models and text for hf_splitquant's tests, demo, benchmarks and examples.

This package (distribution ``hf-splitquant-assets``, folder ``assets/`` of the repository) is
deliberately separate from the ``hf-splitquant`` library: the library takes its evaluation texts
and token blocks as arguments and ships no dataset code. Install it from a clone with::

    pip install -e ./assets          # or: make install

The loaders live in :mod:`splitquant_assets.loaders` (re-exported here); the demo (the README's
``make demo``) is :mod:`splitquant_assets.demo`.
"""

from __future__ import annotations

from .loaders import (
    CACHE_ENV_VAR,
    MODELDATA_DEB_ENV_VAR,
    AssetUnavailableError,
    cache_dir,
    embedding_sentences,
    finefood_reviews,
    lee_similarity_pairs,
    mean_pooled_embeddings,
    minilm_path,
    perplexity_token_blocks,
    smollm2_gguf_path,
    smollm2_path,
    wikipedia_split,
    wikipedia_texts,
)

__version__ = "0.1.0"

__all__ = [
    "CACHE_ENV_VAR",
    "MODELDATA_DEB_ENV_VAR",
    "AssetUnavailableError",
    "cache_dir",
    "embedding_sentences",
    "finefood_reviews",
    "lee_similarity_pairs",
    "mean_pooled_embeddings",
    "minilm_path",
    "perplexity_token_blocks",
    "smollm2_gguf_path",
    "smollm2_path",
    "wikipedia_split",
    "wikipedia_texts",
]
