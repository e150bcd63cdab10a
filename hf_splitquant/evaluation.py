"""Evaluation harness: perplexity, classification accuracy and fidelity to the float model.

The metric math lives in small torch functions here (:func:`perplexity_from_nll`,
:func:`kl_divergence`, :func:`top1_agreement`, :func:`cosine_similarity`, :func:`accuracy`) and is
exposed as `evaluate <https://huggingface.co/docs/evaluate>`_ metric modules shipped inside the
package (``hf_splitquant/metrics/<name>/<name>.py``, loaded from those files with
``evaluate.load(path)``, never from the Hub): see :func:`hf_splitquant.metrics.load`.

The harness feeds per-token NLLs, embeddings and predicted labels to those metric modules. Logits
for the KL divergence and top-1 agreement are reduced per batch with the same functions instead:
a causal LM's logits are vocabulary-wide (49,152 floats per token for SmolLM2), and evaluate's
Arrow writer takes about 14 s per 256 such rows on 2 cores.

Results are plain dicts (JSON-ready) of the form::

    {"task": "perplexity", "dataset": "...", "metrics": {...}, "reference_metrics": {...},
     "bits_per_weight": 4.375, "method": "rtn", "label": "rtn-int4 g64", ...}

which :func:`hf_splitquant.integrations.hub.build_model_card` renders (``eval_results=``), and
:func:`plot_quality_vs_bits` draws quality against bits per weight with the Pareto front marked.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

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
    "reference_outputs",
    "token_nll",
    "top1_agreement",
    "write_json",
]

#: Tasks of :func:`evaluate_model` / ``hf-splitquant evaluate``.
TASKS = ("embedding-fidelity", "perplexity")
_ROW_CHUNK = 512


# --------------------------------------------------------------------------------------------
# Metric math (shared with the evaluate metric modules in hf_splitquant/metrics/)
# --------------------------------------------------------------------------------------------


def perplexity_from_nll(nll: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """``exp(mean NLL)`` over tokens.

    Args:
        nll: negative log-likelihood (natural log) of each predicted token.

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens"}``.
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
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    ref = F.log_softmax(reference_logits.to(torch.float64), dim=-1)
    other = F.log_softmax(logits.to(torch.float64), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row 1.0 where both argmaxes agree, else 0.0 (float64)."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    return (reference_logits.argmax(-1) == logits.argmax(-1)).to(torch.float64)


def cosine_similarity(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity (float64); a zero row against anything gives 0."""
    if reference.shape != other.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    a, b = reference.to(torch.float64), other.to(torch.float64)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def accuracy(predictions: Sequence[int] | torch.Tensor, references: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Fraction of equal labels: ``{"accuracy", "num_examples"}``."""
    pred = torch.as_tensor(predictions).flatten()
    ref = torch.as_tensor(references).flatten()
    if pred.shape != ref.shape or pred.numel() == 0:
        raise ValueError(f"need as many predictions as references (at least one), got {pred.numel()} and {ref.numel()}")
    return {"accuracy": float((pred == ref).to(torch.float64).mean()), "num_examples": int(pred.numel())}


# --------------------------------------------------------------------------------------------
# Running models
# --------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_batch_inputs(inputs: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    batch = {k: torch.as_tensor(v) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if "input_ids" not in batch:
        raise ValueError("inputs need `input_ids` (a [batch, seq] tensor or a mapping holding it)")
    if batch["input_ids"].dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(batch['input_ids'].shape)}")
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    return batch


def _slices(batch: dict[str, torch.Tensor], batch_size: int):  # noqa: ANN202
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = batch["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in batch.items()}


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last hidden state, logits or None) of one batch."""
    device = _device(model)
    outputs = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden_states = getattr(outputs, "hidden_states", None)
        if not hidden_states:
            raise ValueError(f"{type(model).__name__} returned no hidden states; cannot compare embeddings")
        hidden = hidden_states[-1]
    logits = getattr(outputs, "logits", None)
    return hidden.float().cpu(), None if logits is None else logits.float().cpu()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL (float64) of tokens ``1..T-1`` given the logits at ``0..T-2``, over positions where both are unmasked."""
    logp = F.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return nll[(mask[:, 1:] * mask[:, :-1]).bool()]


def token_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """NLL (nats, float64) of every predicted token of a causal LM: token ``t+1`` given ``0..t``.

    Returns a 1-D tensor over the predicted positions where both tokens are unmasked.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.inference_mode():
        _, logits = _forward(model, {"input_ids": input_ids, "attention_mask": mask})
    if logits is None:
        raise ValueError(f"{type(model).__name__} returns no logits; perplexity needs a causal LM")
    return _nll_from_logits(logits, input_ids, mask)


def reference_outputs(model: nn.Module, inputs: Mapping[str, Any] | torch.Tensor,
                      batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The float model's ``(last hidden state, logits)`` per batch of ``inputs``, to reuse across
    :func:`fidelity` calls that compare several quantized models with the same float model
    (pass the same ``inputs`` and ``batch_size``). Logits are kept in float32 on the CPU."""
    batch = _as_batch_inputs(inputs)
    model.eval()
    with torch.inference_mode():
        return [_forward(model, part) for part in _slices(batch, batch_size)]


class _FidelityAccumulator:
    """Running sums of the fidelity statistics over batches."""

    def __init__(self) -> None:
        from .metrics import load as load_metric

        self.cosine = load_metric("embedding_cosine")
        self.kl_sum = self.top1_sum = 0.0
        self.rows = 0

    def add(self, ref: tuple[torch.Tensor, torch.Tensor | None], quant: tuple[torch.Tensor, torch.Tensor | None],
            mask: torch.Tensor) -> None:
        (ref_hidden, ref_logits), (q_hidden, q_logits) = ref, quant
        self.cosine.add_batch(predictions=_mean_pool(q_hidden, mask).tolist(),
                              references=_mean_pool(ref_hidden, mask).tolist())
        if ref_logits is None or q_logits is None:
            return
        if ref_logits.dim() == 3:  # per token
            valid = mask.bool()
            ref_rows, q_rows = ref_logits[valid], q_logits[valid]
        else:  # per sequence (classifiers)
            ref_rows, q_rows = ref_logits, q_logits
        for i in range(0, ref_rows.shape[0], _ROW_CHUNK):  # bounded float64 memory for big vocabularies
            r, q = ref_rows[i : i + _ROW_CHUNK], q_rows[i : i + _ROW_CHUNK]
            self.kl_sum += float(kl_divergence(r, q).sum())
            self.top1_sum += float(top1_agreement(r, q).sum())
        self.rows += ref_rows.shape[0]

    def result(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        cos = self.cosine.compute()
        result: dict[str, float] = {"embedding_cosine": cos["cosine"], "embedding_cosine_min": cos["min_cosine"],
                                    "num_sequences": int(batch["input_ids"].shape[0]),
                                    "num_tokens": int(batch["attention_mask"].sum())}
        if self.rows:
            result["kl_divergence"] = self.kl_sum / self.rows
            result["top1_agreement"] = self.top1_sum / self.rows
        return result


def perplexity(model: nn.Module, token_blocks: torch.Tensor | Any, batch_size: int = 4) -> dict[str, float]:
    """Perplexity of a causal LM on token blocks (each block predicts its tokens 1..T-1).

    Args:
        model: a causal LM (float or packed).
        token_blocks: ``[num_blocks, block_len]`` token ids (e.g.
            :func:`hf_splitquant.assets.perplexity_token_blocks`), or a ``datasets.Dataset`` with
            an ``input_ids`` column of equal-length rows.
        batch_size: blocks per forward pass.

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens"}`` from the ``perplexity_from_nll`` metric module.
    """
    from .metrics import load as load_metric

    if not isinstance(token_blocks, torch.Tensor):
        token_blocks = torch.as_tensor(list(token_blocks["input_ids"]), dtype=torch.long)
    batch = _as_batch_inputs(token_blocks)
    if batch["input_ids"].shape[1] < 2:
        raise ValueError("token blocks need at least 2 tokens each")
    metric = load_metric("perplexity_from_nll")
    model.eval()
    for part in _slices(batch, batch_size):
        metric.add_batch(nll=token_nll(model, part["input_ids"], part["attention_mask"]).tolist())
    return metric.compute()


def classification_accuracy(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | Any,
    labels: Sequence[int] | Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int | None = 256,
    label_map: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Accuracy of a sequence classifier.

    Args:
        model: a ``...ForSequenceClassification`` model.
        tokenizer: its tokenizer.
        texts: the inputs, or a ``datasets.Dataset`` with ``text`` and ``label`` columns.
        labels: gold labels (ids, or names mapped with ``label_map`` / ``model.config.label2id``).
        batch_size, max_length: batching and truncation.
        label_map: name -> id, for string labels.

    Returns:
        ``{"accuracy", "num_examples"}`` from the ``classification_accuracy`` metric module.
    """
    from .metrics import load as load_metric

    if labels is None:
        if not hasattr(texts, "column_names"):
            raise ValueError("pass labels, or a datasets.Dataset with `text` and `label` columns")
        texts, labels = list(texts["text"]), list(texts["label"])
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"need as many labels as texts (at least one), got {len(texts)} texts and {len(labels)} labels")
    if any(isinstance(label, str) for label in labels):
        mapping = label_map or getattr(getattr(model, "config", None), "label2id", None) or {}
        missing = sorted({lab for lab in labels if lab not in mapping})
        if missing:
            raise ValueError(f"labels {missing} are not in the label map {dict(mapping)}")
        labels = [mapping[label] for label in labels]
    metric = load_metric("classification_accuracy")
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            _, logits = _forward(model, _as_batch_inputs(encoded))
            if logits is None:
                raise ValueError(f"{type(model).__name__} returns no logits; accuracy needs a classifier")
            metric.add_batch(predictions=logits.argmax(-1).tolist(), references=labels[start : start + batch_size])
    return metric.compute()


def fidelity(
    float_model: nn.Module,
    quantized_model: nn.Module,
    inputs: Mapping[str, Any] | torch.Tensor,
    batch_size: int = 8,
    *,
    float_outputs: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> dict[str, float]:
    """How close a quantized model stays to its float model on the same inputs.

    Args:
        float_model, quantized_model: the two models (same architecture and tokenizer).
        inputs: ``[batch, seq]`` token ids, or a mapping with ``input_ids`` and ``attention_mask``
            (e.g. a tokenizer's ``BatchEncoding``).
        batch_size: sequences per forward pass.
        float_outputs: the float model's outputs from :func:`reference_outputs` on the same
            ``inputs`` and ``batch_size``, to skip its forward passes.

    Returns:
        ``embedding_cosine``: mean over sequences of the cosine between the mean-pooled (attention
        mask) last hidden states, with ``embedding_cosine_min``; when the models return logits,
        ``kl_divergence``: mean over tokens (unmasked positions; for sequence classifiers, over
        sequences) of ``KL(float || quantized)`` in nats, and ``top1_agreement``: fraction of those
        positions where both argmaxes agree; ``num_sequences`` and ``num_tokens``.
    """
    batch = _as_batch_inputs(inputs)
    parts = list(_slices(batch, batch_size))
    if float_outputs is None:
        float_outputs = reference_outputs(float_model, batch, batch_size)
    if len(float_outputs) != len(parts):
        raise ValueError(f"float_outputs has {len(float_outputs)} batches, the inputs make {len(parts)}: "
                         "compute them with reference_outputs on the same inputs and batch_size")
    accumulator = _FidelityAccumulator()
    quantized_model.eval()
    with torch.inference_mode():
        for part, ref in zip(parts, float_outputs):
            accumulator.add(ref, _forward(quantized_model, part), part["attention_mask"])
    return accumulator.result(batch)


# --------------------------------------------------------------------------------------------
# Whole evaluations (CLI and examples)
# --------------------------------------------------------------------------------------------


def _bits_info(model: nn.Module) -> dict[str, Any]:
    from .report import quantization_report

    report = quantization_report(model)
    if not report.layers:
        return {"bits_per_weight": None, "method": "float"}
    return {"bits_per_weight": report.bits_per_weight, "method": report.method,
            "bits": sorted({layer.bits for layer in report.layers}),
            "group_size": sorted({layer.group_size or 0 for layer in report.layers})}


def evaluate_model(
    model: nn.Module,
    task: str,
    tokenizer: Any,
    reference_model: nn.Module | None = None,
    *,
    num_sentences: int = 300,
    num_blocks: int = 8,
    block_len: int = 256,
    batch_size: int = 8,
    max_length: int = 256,
    label: str | None = None,
    cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a (packed) model on one of :data:`TASKS` with the offline assets.

    * ``"embedding-fidelity"``: :func:`fidelity` to ``reference_model`` on
      :func:`hf_splitquant.assets.embedding_sentences` (``num_sentences``); the reference is required.
    * ``"perplexity"``: :func:`perplexity` on :func:`hf_splitquant.assets.perplexity_token_blocks`
      (``num_blocks`` x ``block_len`` tokens of the Wikipedia eval part); with a reference, also its
      perplexity (``reference_metrics``) and :func:`fidelity` (KL divergence, top-1 agreement) on
      the same blocks.

    Pass the same ``cache`` dict to several calls with the same reference model to compute its
    outputs once (the perplexity task keeps its logits: ``num_blocks * block_len * vocab`` floats).

    Returns:
        The result dict (see the module docstring), JSON-ready.
    """
    from . import assets

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    start = time.perf_counter()
    result: dict[str, Any] = {"task": task, **_bits_info(model)}
    if task == "embedding-fidelity":
        if reference_model is None:
            raise ValueError("the embedding-fidelity task needs the float reference model")
        sentences = assets.embedding_sentences(num_sentences)
        encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        key = ("embedding-fidelity", id(reference_model), num_sentences, max_length, batch_size)
        if cache is not None and key not in cache:
            cache[key] = reference_outputs(reference_model, encoded, batch_size)
        metrics = fidelity(reference_model, model, encoded, batch_size=batch_size,
                           float_outputs=None if cache is None else cache[key])
        result["dataset"] = f"{len(sentences)} real English sentences (hf_splitquant.assets.embedding_sentences)"
        result["metrics"] = {k: metrics[k] for k in ("embedding_cosine", "embedding_cosine_min") if k in metrics}
        result["num_examples"] = len(sentences)
    else:
        blocks = assets.perplexity_token_blocks(tokenizer, num_blocks, block_len)
        result["dataset"] = f"Wikipedia eval part (hf_splitquant.assets), {num_blocks} blocks x {block_len} tokens"
        if reference_model is None:
            metrics = perplexity(model, blocks, batch_size=batch_size)
        else:
            metrics = _perplexity_and_fidelity(model, reference_model, blocks, batch_size, cache)
            result["reference_metrics"] = {"perplexity": metrics.pop("reference_perplexity")}
        result["metrics"] = {k: metrics[k] for k in ("perplexity", "kl_divergence", "top1_agreement") if k in metrics}
        result["num_examples"] = metrics["num_tokens"]
    result["label"] = label or _label(result)
    result["seconds"] = time.perf_counter() - start
    return result


def _perplexity_and_fidelity(model: nn.Module, reference_model: nn.Module, blocks: torch.Tensor, batch_size: int,
                             cache: dict[Any, Any] | None) -> dict[str, float]:
    """Perplexity of both models and fidelity, with one forward pass of each model per batch."""
    from .metrics import load as load_metric

    batch = _as_batch_inputs(blocks)
    key = ("perplexity", id(reference_model), tuple(blocks.shape), int(blocks.sum()), batch_size)
    if cache is not None and key in cache:
        ref_outputs, ref_ppl = cache[key]
    else:
        ref_outputs = reference_outputs(reference_model, batch, batch_size)
        ref_metric = load_metric("perplexity_from_nll")
        for part, (_, logits) in zip(_slices(batch, batch_size), ref_outputs):
            ref_metric.add_batch(nll=_nll_from_logits(logits, part["input_ids"], part["attention_mask"]).tolist())
        ref_ppl = ref_metric.compute()["perplexity"]
        if cache is not None:
            cache[key] = (ref_outputs, ref_ppl)
    metric = load_metric("perplexity_from_nll")
    accumulator = _FidelityAccumulator()
    model.eval()
    with torch.inference_mode():
        for part, ref in zip(_slices(batch, batch_size), ref_outputs):
            out = _forward(model, part)
            if out[1] is None:
                raise ValueError(f"{type(model).__name__} returns no logits; perplexity needs a causal LM")
            metric.add_batch(nll=_nll_from_logits(out[1], part["input_ids"], part["attention_mask"]).tolist())
            accumulator.add(ref, out, part["attention_mask"])
    ppl = metric.compute()
    return {**accumulator.result(batch), "perplexity": ppl["perplexity"], "num_tokens": ppl["num_tokens"],
            "reference_perplexity": ref_ppl}


def _label(result: Mapping[str, Any]) -> str:
    if result.get("bits_per_weight") is None:
        return "float"
    bits = "/".join(str(b) for b in result.get("bits", []))
    groups = "/".join("chan" if g == 0 else str(g) for g in result.get("group_size", []))
    return f"{result['method']}-int{bits} g{groups}"


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    task: str,
    reference: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a packed checkpoint (and its float reference) and run :func:`evaluate_model`.

    The model class follows the task (``AutoModel`` for embedding fidelity, ``AutoModelForCausalLM``
    for perplexity); the tokenizer comes from ``model_dir``, else from ``reference``.
    """
    import transformers

    import hf_splitquant  # noqa: F401  (registers the quantizer)

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cls = transformers.AutoModel if task == "embedding-fidelity" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError):
        if reference is None:
            raise ValueError(f"{model_dir} has no tokenizer; pass the float reference folder") from None
        tokenizer = transformers.AutoTokenizer.from_pretrained(reference)
    reference_model = cls.from_pretrained(reference) if reference is not None else None
    result = evaluate_model(model, task, tokenizer, reference_model, **kwargs)
    result["model"] = str(model_dir)
    result["reference"] = None if reference is None else str(reference)
    return result


def write_json(results: Any, path: str | os.PathLike) -> Path:
    """Write results as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _quality(result: Mapping[str, Any], key: str) -> float:
    metrics = result.get("metrics") if isinstance(result.get("metrics"), Mapping) else {}
    value = metrics.get(key, result.get(key))
    if value is None:
        raise KeyError(f"result {result.get('label', '?')!r} has no quality value {key!r}")
    return float(value)


def pareto_front(results: Sequence[Mapping[str, Any]], quality_key: str, higher_is_better: bool = True,
                 bits_key: str = "bits_per_weight") -> list[int]:
    """Indices of the results no other result beats on both bits (fewer) and quality.

    A result is on the front when no other has ``bits <=`` and quality at least as good with one
    of the two strictly better. Returned in order of increasing bits.
    """
    points = [(float(r[bits_key]), _quality(r, quality_key) * (1 if higher_is_better else -1)) for r in results]
    front = []
    for i, (bits, quality) in enumerate(points):
        dominated = any(
            b <= bits and q >= quality and (b < bits or q > quality) for j, (b, q) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_quality_vs_bits(
    results: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    quality_key: str,
    higher_is_better: bool = True,
    *,
    bits_key: str = "bits_per_weight",
    label_key: str = "label",
    group_key: str = "method",
    title: str | None = None,
    reference: float | None = None,
    log_y: bool = False,
    y_max: float | None = None,
) -> Path:
    """Plot quality against bits per weight (one marker series per method), the Pareto front marked.

    Args:
        results: result dicts with ``bits_per_weight`` and the quality (under ``metrics`` or at the
            top level); ``label`` annotates each point, ``method`` groups markers.
        path: the PNG to write (parent folders created).
        quality_key: e.g. ``"perplexity"`` or ``"embedding_cosine"``.
        higher_is_better: direction of the quality for the Pareto front.
        reference: optional float-model value drawn as a horizontal dashed line.
        log_y: logarithmic quality axis (useful for perplexity).
        y_max: clip the quality axis here; points above it are drawn on the top edge as
            triangles annotated with their value (a collapsed configuration would otherwise
            squash the rest of the plot).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get(bits_key) is not None]
    if not rows:
        raise ValueError(f"no result has `{bits_key}`; nothing to plot")
    front = pareto_front(rows, quality_key, higher_is_better, bits_key)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = "osD^vP*X"

    def shown(value: float) -> float:
        return min(value, y_max) if y_max is not None else value

    groups = list(dict.fromkeys(str(r.get(group_key, "")) for r in rows))
    for g, group in enumerate(groups):
        members = [r for r in rows if str(r.get(group_key, "")) == group]
        ax.scatter([float(r[bits_key]) for r in members], [shown(_quality(r, quality_key)) for r in members],
                   marker=markers[g % len(markers)], s=46, label=group or None, zorder=3)
    for r in rows:
        value = _quality(r, quality_key)
        off_scale = y_max is not None and value > y_max
        text = f"{r.get(label_key, '')}\n{value:.4g}" + (" (off scale)" if off_scale else "")
        ax.annotate(text, (float(r[bits_key]), shown(value)), textcoords="offset points",
                    xytext=(5, -12 if off_scale else 4), fontsize=7, color="0.25")
        if off_scale:
            ax.scatter([float(r[bits_key])], [y_max], marker="^", s=70, color="0.3", zorder=5)
    fx = [float(rows[i][bits_key]) for i in front]
    fy = [shown(_quality(rows[i], quality_key)) for i in front]
    ax.plot(fx, fy, "-", color="crimson", lw=1.4, zorder=2)
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="crimson", lw=1.4, zorder=4, label="Pareto front")
    if reference is not None:
        ax.axhline(reference, ls="--", color="0.4", lw=1, label=f"float reference ({reference:.4g})")
    if log_y:
        ax.set_yscale("log")
    if y_max is not None:
        ax.set_ylim(top=y_max * (1.15 if log_y else 1.03))
    ax.set_xlabel("bits per weight (overheads included)")
    ax.set_ylabel(f"{quality_key} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{quality_key} vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    logger.info(f"Wrote {path}")
    return path
