"""The metric math: small torch functions shared by the metric scripts and the evaluation harness.

This module imports torch only (nothing from hf_splitquant), so the ``evaluate`` metric scripts in
``hf_splitquant/metrics/<name>/<name>.py`` and :mod:`hf_splitquant.evaluation` both depend on it
and never on each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "cosine_similarity", "kl_divergence", "perplexity_from_nll", "top1_agreement"]


def perplexity_from_nll(nll: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """``exp(mean NLL)`` over tokens.

    Args:
        nll: negative log-likelihood (natural log) of each predicted token.

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens"}``.

    Raises:
        ValueError: ``nll`` is empty.
    """
    values = torch.as_tensor(nll, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("perplexity needs at least one token NLL")
    mean = float(values.mean())
    return {"perplexity": math.exp(mean), "mean_nll": mean, "num_tokens": int(values.numel())}


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(reference) || softmax(logits))`` in nats, computed in float64.

    Args:
        reference_logits: ``[..., classes]`` logits of the float model (the "true" distribution).
        logits: the same shape, from the quantized model.

    Returns:
        A float64 tensor of shape ``reference_logits.shape[:-1]``.

    Raises:
        ValueError: the shapes differ.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    ref = F.log_softmax(reference_logits.to(torch.float64), dim=-1)
    other = F.log_softmax(logits.to(torch.float64), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row 1.0 where both argmaxes agree, else 0.0 (float64).

    Raises:
        ValueError: the shapes differ.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    return (reference_logits.argmax(-1) == logits.argmax(-1)).to(torch.float64)


def cosine_similarity(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity (float64); a zero row against anything gives 0.

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != other.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    a, b = reference.to(torch.float64), other.to(torch.float64)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def accuracy(predictions: Sequence[int] | torch.Tensor, references: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Fraction of equal labels: ``{"accuracy", "num_examples"}``.

    Raises:
        ValueError: the two differ in length, or are empty.
    """
    pred = torch.as_tensor(predictions).flatten()
    ref = torch.as_tensor(references).flatten()
    if pred.shape != ref.shape or pred.numel() == 0:
        raise ValueError(f"need as many predictions as references (at least one), got {pred.numel()} and {ref.numel()}")
    return {"accuracy": float((pred == ref).to(torch.float64).mean()), "num_examples": int(pred.numel())}
