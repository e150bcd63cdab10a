"""Evaluation: perplexity, classification accuracy and fidelity to the float model, on your data.

The library ships no dataset: texts and token blocks are arguments. Read a local file with
:func:`read_texts` and cut perplexity blocks with :func:`token_blocks_from_texts`, or pass your own
``[N, L]`` token ids. Needs the ``eval`` extra (``pip install 'hf-splitquant[eval]'``: ``evaluate``
and ``datasets``); the plot needs the ``plot`` extra (matplotlib).

* :mod:`hf_splitquant.metrics.functional`: the metric math (:func:`perplexity_from_nll`,
  :func:`kl_divergence`, :func:`top1_agreement`, :func:`cosine_similarity`, :func:`accuracy`),
  also exposed as ``evaluate`` metric modules (:func:`hf_splitquant.metrics.load`).
* :mod:`hf_splitquant.evaluation.harness`: running models (:func:`perplexity`, :func:`fidelity`,
  :func:`classification_accuracy`) and whole evaluations (:func:`evaluate_model`,
  :func:`evaluate_checkpoint`, used by ``hf-splitquant evaluate``).
* :mod:`hf_splitquant.evaluation.data`: :func:`read_texts`, :func:`token_blocks_from_texts`.
* :mod:`hf_splitquant.evaluation.plot`: :func:`pareto_front`, :func:`plot_quality_vs_bits`.

Results are plain dicts (JSON-ready) of the form::

    {"task": "perplexity", "dataset": "...", "metrics": {...}, "reference_metrics": {...},
     "bits_per_weight": 4.375, "method": "rtn", "label": "rtn-int4 g64", ...}

which :func:`hf_splitquant.integrations.hub.build_model_card` renders (``eval_results=``), and
:func:`plot_quality_vs_bits` draws quality against bits per weight with the Pareto front marked.

Example::

    from hf_splitquant.evaluation import evaluate_model, read_texts
    result = evaluate_model(packed, "perplexity", tokenizer, float_model,
                            texts=read_texts("my_eval.jsonl"), num_blocks=8, block_len=256)
"""

from __future__ import annotations

from ..metrics.functional import (
    accuracy,
    cosine_similarity,
    kl_divergence,
    perplexity_from_nll,
    top1_agreement,
)
from .data import read_texts, token_blocks_from_texts
from .harness import (
    TASKS,
    classification_accuracy,
    evaluate_checkpoint,
    evaluate_model,
    fidelity,
    perplexity,
    reference_outputs,
    token_nll,
    write_json,
)
from .plot import pareto_front, plot_quality_vs_bits

__all__ = [
    "TASKS",
    "accuracy",
    "classification_accuracy",
    "cosine_similarity",
    "evaluate_checkpoint",
    "evaluate_model",
    "fidelity",
    "kl_divergence",
    "pareto_front",
    "perplexity",
    "perplexity_from_nll",
    "plot_quality_vs_bits",
    "read_texts",
    "reference_outputs",
    "token_blocks_from_texts",
    "token_nll",
    "top1_agreement",
    "write_json",
]
