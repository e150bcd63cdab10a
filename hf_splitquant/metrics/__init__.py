"""``evaluate`` metric modules shipped with hf_splitquant, loaded from the package's own files.

Each metric is a folder ``hf_splitquant/metrics/<name>/`` holding the script ``<name>.py``, the
layout ``evaluate.load(path)`` expects for a local metric; nothing is fetched from the Hub.
The math is in :mod:`hf_splitquant.metrics.functional` (torch only, it imports nothing back), shared
with :mod:`hf_splitquant.evaluation`. Loading a metric needs the ``eval`` extra
(``pip install 'hf-splitquant[eval]'``: ``evaluate`` and ``datasets``).

=========================  ========================================  ============================================
metric                     inputs (one row each)                     result
=========================  ========================================  ============================================
``perplexity_from_nll``    ``nll``: NLL of one token (nats)           ``perplexity``, ``mean_nll``, ``num_tokens``
``kl_fidelity``            ``predictions``/``references``: logits     ``kl_divergence`` (reference || prediction),
                           rows of the quantized / float model        ``top1_agreement``, ``num_rows``
``embedding_cosine``       ``predictions``/``references``:            ``cosine`` (mean), ``min_cosine``,
                           embedding rows                             ``num_rows``
``classification_accuracy``  ``predictions``/``references``: labels  ``accuracy``, ``num_examples``
=========================  ========================================  ============================================

Example::

    from hf_splitquant import metrics
    kl = metrics.load("kl_fidelity")
    kl.compute(predictions=quantized_logits_rows, references=float_logits_rows)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS", "load", "metric_path"]

#: Names of the bundled metric modules.
METRICS = ("perplexity_from_nll", "kl_fidelity", "embedding_cosine", "classification_accuracy")


def metric_path(name: str) -> Path:
    """Folder of a bundled metric (pass it to ``evaluate.load``)."""
    if name not in METRICS:
        raise ValueError(f"unknown hf_splitquant metric {name!r}; available: {METRICS}")
    path = Path(__file__).resolve().parent / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric script {path / (name + '.py')} is missing from the installed package")
    return path


def load(name: str, **kwargs: Any) -> Any:  # -> evaluate.EvaluationModule
    """``evaluate.load`` of a bundled metric from its local script (kept in memory by default).

    Raises:
        ValueError: ``name`` is not one of :data:`METRICS`.
        ImportError: ``evaluate`` or ``datasets`` is missing (the ``eval`` extra).
    """
    from ..extras import require

    evaluate = require("evaluate", "eval", "hf_splitquant's evaluation metrics")
    require("datasets", "eval", "hf_splitquant's evaluation metrics")
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)
