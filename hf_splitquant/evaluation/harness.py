"""Running models for evaluation: perplexity, classification accuracy, fidelity to the float model.

The metric math is :mod:`hf_splitquant.metrics.functional`; it is also exposed as `evaluate
<https://huggingface.co/docs/evaluate>`_ metric modules shipped inside the package
(``hf_splitquant/metrics/<name>/<name>.py``, loaded from those files with ``evaluate.load(path)``,
never from the Hub): see :func:`hf_splitquant.metrics.load`. The harness feeds per-token NLLs,
embeddings and predicted labels to those metric modules. Logits for the KL divergence and top-1
agreement are reduced per batch with the functional math instead: a causal LM's logits are
vocabulary-wide (49,152 floats per token for SmolLM2), and evaluate's Arrow writer takes about
14 s per 256 such rows on 2 cores.

The data comes from the caller: texts and token blocks are arguments (see
:mod:`hf_splitquant.evaluation.data` for reading a text file and cutting token blocks).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..metrics.functional import kl_divergence, top1_agreement
from .data import token_blocks_from_texts

logger = logging.get_logger(__name__)

__all__ = [
    "TASKS",
    "classification_accuracy",
    "evaluate_checkpoint",
    "evaluate_model",
    "fidelity",
    "perplexity",
    "reference_outputs",
    "token_nll",
    "write_json",
]

#: Tasks of :func:`evaluate_model` / ``hf-splitquant evaluate``.
TASKS = ("embedding-fidelity", "perplexity")
_ROW_CHUNK = 512


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
        from ..metrics import load as load_metric

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
        token_blocks: ``[num_blocks, block_len]`` token ids (e.g. from
            :func:`hf_splitquant.evaluation.token_blocks_from_texts`), or a ``datasets.Dataset``
            with an ``input_ids`` column of equal-length rows.
        batch_size: blocks per forward pass.

    Returns:
        ``{"perplexity", "mean_nll", "num_tokens"}`` from the ``perplexity_from_nll`` metric module.
    """
    from ..metrics import load as load_metric

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
    from ..metrics import load as load_metric

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
    """Bits per weight, method, bit widths and group sizes of a model (``method: "float"`` if none)."""
    from ..report import quantization_report

    report = quantization_report(model)
    if not report.layers:
        return {"bits_per_weight": None, "method": "float"}
    return {"bits_per_weight": report.bits_per_weight, "method": report.method,
            "bits": sorted({layer.bits for layer in report.layers}),
            "group_size": sorted({layer.group_size or 0 for layer in report.layers})}


def _check_inputs(task: str, texts: Sequence[str] | None, token_blocks: torch.Tensor | None) -> None:
    """Validate the task and its data arguments before any model work (ValueError / TypeError)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if task == "embedding-fidelity":
        if token_blocks is not None:
            raise ValueError("the embedding-fidelity task takes texts, not token_blocks")
        if texts is None:
            raise ValueError("the embedding-fidelity task needs texts (the sentences to embed)")
    else:
        if texts is not None and token_blocks is not None:
            raise ValueError("pass either texts or token_blocks for the perplexity task, not both")
        if texts is None and token_blocks is None:
            raise ValueError("the perplexity task needs texts (cut into token blocks) or token_blocks")


def _digest(texts: Sequence[str]) -> str:
    """A short fingerprint of a list of texts (cache keys)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def evaluate_model(
    model: nn.Module,
    task: str,
    tokenizer: Any,
    reference_model: nn.Module | None = None,
    *,
    texts: Sequence[str] | None = None,
    token_blocks: torch.Tensor | None = None,
    num_sentences: int | None = None,
    num_blocks: int = 8,
    block_len: int = 256,
    batch_size: int = 8,
    max_length: int = 256,
    dataset: str | None = None,
    label: str | None = None,
    cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a (packed) model on one of :data:`TASKS`, on the caller's texts or token blocks.

    * ``"embedding-fidelity"``: :func:`fidelity` to ``reference_model`` on ``texts`` (the first
      ``num_sentences`` of them when given; each truncated to ``max_length`` tokens); the
      reference is required.
    * ``"perplexity"``: :func:`perplexity` on ``token_blocks`` (``[N, L]`` token ids), or on
      ``num_blocks`` x ``block_len`` tokens cut from ``texts`` with
      :func:`~hf_splitquant.evaluation.token_blocks_from_texts`; with a reference, also its
      perplexity (``reference_metrics``) and :func:`fidelity` (KL divergence, top-1 agreement) on
      the same blocks.

    Pass the same ``cache`` dict to several calls with the same reference model and data to
    compute its outputs once (the perplexity task keeps its logits: ``N * L * vocab`` floats).

    Args:
        model: the model to evaluate (float or packed).
        task: one of :data:`TASKS`.
        tokenizer: the models' tokenizer (unused when ``token_blocks`` are given).
        reference_model: the float model to compare with.
        texts: the evaluation texts.
        token_blocks: ready token blocks (perplexity only).
        num_sentences: embedding fidelity: use only the first ``num_sentences`` texts.
        num_blocks, block_len: perplexity on ``texts``: the blocks to cut.
        batch_size, max_length: batching and truncation.
        dataset: a description of the data for the result (and the model card); default: a
            count of texts or blocks.
        label: the result's label (default: method, bits and group size, e.g. ``rtn-int4 g64``).
        cache: a dict reused across calls (see above).

    Returns:
        A JSON-ready dict: ``{"task", "dataset", "metrics", "reference_metrics" (perplexity with a
        reference), "bits_per_weight", "method", "label", "num_examples", "seconds", ...}``, which
        :func:`hf_splitquant.integrations.hub.build_model_card` renders (``eval_results=``).

    Raises:
        ValueError: unknown task, missing or conflicting data, or no reference for embedding fidelity.
    """
    _check_inputs(task, texts, token_blocks)
    start = time.perf_counter()
    result: dict[str, Any] = {"task": task, **_bits_info(model)}
    if task == "embedding-fidelity":
        if reference_model is None:
            raise ValueError("the embedding-fidelity task needs the float reference model")
        sentences = list(texts if num_sentences is None else texts[:num_sentences])
        if not sentences:
            raise ValueError("the embedding-fidelity task needs at least one text")
        encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        key = ("embedding-fidelity", id(reference_model), len(sentences), _digest(sentences), max_length, batch_size)
        if cache is not None and key not in cache:
            cache[key] = reference_outputs(reference_model, encoded, batch_size)
        metrics = fidelity(reference_model, model, encoded, batch_size=batch_size,
                           float_outputs=None if cache is None else cache[key])
        result["dataset"] = dataset or f"{len(sentences)} texts"
        result["metrics"] = {k: metrics[k] for k in ("embedding_cosine", "embedding_cosine_min") if k in metrics}
        result["num_examples"] = len(sentences)
    else:
        if token_blocks is None:
            blocks = token_blocks_from_texts(tokenizer, texts, num_blocks, block_len)
        else:
            blocks = torch.as_tensor(token_blocks, dtype=torch.long)
            if blocks.dim() != 2:
                raise ValueError(f"token_blocks must be [num_blocks, block_len], got shape {tuple(blocks.shape)}")
        result["dataset"] = dataset or f"{blocks.shape[0]} blocks x {blocks.shape[1]} tokens"
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
    from ..metrics import load as load_metric

    batch = _as_batch_inputs(blocks)
    digest = hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()[:16]
    key = ("perplexity", id(reference_model), tuple(blocks.shape), digest, batch_size)
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

    Args:
        model_dir: folder of the packed checkpoint.
        task: one of :data:`TASKS`.
        reference: folder of the float model.
        **kwargs: passed to :func:`evaluate_model`; ``texts`` or ``token_blocks`` are required.

    Returns:
        The result of :func:`evaluate_model`, with ``model`` and ``reference`` (the folders).

    Raises:
        ValueError: as :func:`evaluate_model` (checked before any model is loaded).
    """
    import transformers

    import hf_splitquant  # noqa: F401  (registers the quantizer)

    _check_inputs(task, kwargs.get("texts"), kwargs.get("token_blocks"))
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
    """Write results as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
