"""Calibration data: samples from a dataset, texts, token tensors or a DataLoader, batched the same way
on every process, and sharded across processes (batch ``i`` to process ``i % N``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..extras import require

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_MAX_LENGTH", "global_batches", "shard_batches", "load_calibration_file",
           "batch_size_of"]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 512


def _text_column(column_names: Sequence[str], features: Any) -> str:
    if "text" in column_names:
        return "text"
    strings = [c for c in column_names if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(
        f"cannot tell which column of the calibration dataset holds the text (columns: {list(column_names)}); "
        "name it 'text', keep one string column, or give tokenized 'input_ids'"
    )


def _sample_indices(total: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` of ``range(total)`` chosen with ``seed``, in corpus order (all if fewer)."""
    if total <= num_samples:
        return list(range(total))
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return sorted(perm.tolist())


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    if tokenizer is None:
        raise ValueError("calibration_data holds text: pass `tokenizer=` to tokenize it")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def _token_samples(data: Any, tokenizer: Any, num_samples: int, max_length: int, seed: int) -> list[list[int]]:
    """Token-id lists from a ``datasets.Dataset``, a list of strings or of token-id lists, or a 2-D tensor."""
    try:
        import datasets
    except ImportError:  # an optional dependency: without it, no caller can pass a Dataset
        datasets = None
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise ValueError("calibration_data is a DatasetDict: pass one split, e.g. dataset['train']")
    if datasets is not None and isinstance(data, datasets.Dataset):
        if "input_ids" in data.column_names:
            subset = data.select(_sample_indices(len(data), num_samples, seed))
            samples = [list(ids)[:max_length] for ids in subset["input_ids"]]
        else:
            column = _text_column(data.column_names, data.features)
            texts = [text for text in data[column] if isinstance(text, str) and text.strip()]
            samples = _tokenize([texts[i] for i in _sample_indices(len(texts), num_samples, seed)], tokenizer,
                                max_length)
    elif isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.is_floating_point():
            raise ValueError(f"a calibration tensor must be [samples, tokens] integer ids, got {tuple(data.shape)} "
                             f"{data.dtype}")
        idx = _sample_indices(data.shape[0], num_samples, seed)
        samples = [data[i, :max_length].tolist() for i in idx]
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if all(isinstance(x, str) for x in data):
            data = [x for x in data if x.strip()]  # blank lines are no samples
        if not data:
            raise ValueError("calibration_data is empty")
        idx = _sample_indices(len(data), num_samples, seed)
        chosen = [data[i] for i in idx]
        if all(isinstance(x, str) for x in chosen):
            samples = _tokenize(chosen, tokenizer, max_length)
        elif all(isinstance(x, (list, tuple)) and all(isinstance(t, int) for t in x) for x in chosen):
            samples = [list(x)[:max_length] for x in chosen]
        else:
            raise ValueError("a calibration list must hold strings (with a tokenizer) or lists of token ids")
    else:
        raise ValueError(
            f"calibration_data must be a datasets.Dataset, a list of strings, a 2-D tensor of token ids or a "
            f"torch DataLoader, got {type(data).__name__}"
        )
    samples = [s for s in samples if s]
    if not samples:
        raise ValueError("calibration_data has no non-empty sample")
    return samples


def load_calibration_file(path: str | os.PathLike) -> Any:
    """A local calibration file as a ``datasets.Dataset``: ``.txt`` (one sample per line), ``.json`` /
    ``.jsonl`` or ``.csv`` (a ``text`` column, one string column, or ``input_ids``)."""
    datasets = require("datasets", "eval", "reading calibration files")

    suffix = os.path.splitext(str(path))[1].lower()
    builders = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    if suffix not in builders:
        raise ValueError(f"calibration file {path}: expected .txt, .json, .jsonl or .csv, got {suffix or 'no suffix'!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path} does not exist")
    return datasets.load_dataset(builders[suffix], data_files=str(path), split="train")


def _collate(samples: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for one batch."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("a calibration batch holds no tensor")


def _truncate(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def global_batches(data: Any, tokenizer: Any, num_samples: int, batch_size: int, max_length: int,
                    seed: int) -> Iterator[dict[str, Any]]:
    """The calibration batches, in the same order and composition on every process."""
    if isinstance(data, torch.utils.data.DataLoader):
        seen = 0
        for batch in data:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            if not isinstance(batch, Mapping):
                raise ValueError(f"a calibration DataLoader must yield dicts of tensors, got {type(batch).__name__}")
            batch = {k: v for k, v in batch.items() if k != "labels"}
            n = batch_size_of(batch)
            if seen + n > num_samples:
                batch = _truncate(batch, num_samples - seen)
                n = num_samples - seen
            if n > 0:
                yield batch
            seen += n
            if seen >= num_samples:
                return
        return
    samples = _token_samples(data, tokenizer, num_samples, max_length, seed)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)
    for start in range(0, len(samples), batch_size):
        yield _collate(samples[start : start + batch_size], pad_id)


def shard_batches(batches: Iterable[dict[str, Any]], process_index: int,
                  num_processes: int) -> tuple[list[dict[str, Any]], int, int]:
    """Batch ``i`` of the global stream goes to process ``i % num_processes`` (accelerate's split with
    ``even_batches=False``). Returns ``(local batches, global batch count, global sample count)``."""
    local, count, samples = [], 0, 0
    for i, batch in enumerate(batches):
        if i % num_processes == process_index:
            local.append(batch)
        count += 1
        samples += batch_size_of(batch)
    return local, count, samples


