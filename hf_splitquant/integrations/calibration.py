"""Quantization with calibration data: sequential, block-by-block Attention Round, on one or many processes.

:func:`calibrate_and_quantize` (what ``hf_splitquant.quantize(model, config, calibration_data=...)``
calls) works like GPTQ-style sequential calibration:

1. Bit widths (``config.bit_allocation``: MixQuant or coding length) are decided first, from the
   weights alone; every layer then keeps its width.
2. The calibration samples run through the model up to the first transformer block, whose inputs
   (hidden states and the keyword arguments the model passes it: masks, rotary embeddings, ...) are
   kept. Only one block's activations are ever held.
3. For each block: the block runs on the kept inputs with forward hooks on its quantized Linear
   layers, which sum ``H = X^T X`` of each layer's inputs (padding tokens excluded). The inputs come
   from the *already quantized* previous blocks, so errors do not compound unseen. Each layer's codes
   are chosen by Attention Round (:mod:`hf_splitquant.methods.attention_round`) on the objective
   ``|X (W_q - W)^T|^2``, the layer is replaced by a :class:`~hf_splitquant.nn.packed_linear.PackedLinear`,
   and the now-quantized block runs again to produce the next block's inputs.
4. Quantized layers outside the repeated blocks (e.g. BERT's pooler) are calibrated last, with one
   pass of the whole (already quantized) model.
5. ``config.layers`` is written and the quantizer attached: ``save_pretrained`` writes the usual
   packed format.

Several processes (``torchrun --nproc_per_node N script.py``; ``accelerate.Accelerator``, gloo on CPU)
split the calibration batches: global batch ``i`` goes to process ``i % N`` (the split of accelerate's
``prepare_data_loader`` with ``even_batches=False``: no sample is repeated to even out the shards).
Each process sums its local statistics; after the local pass they are summed once across processes
(``accelerator.reduce``), never inside a loop over the uneven shards. The optimisation needs only
``H`` and the token count, so it is a full-batch optimisation identical to the one-process run. The
layers of a block are then divided among the processes (layer ``j`` on process ``j % N``) and the packed
results broadcast, so every process ends with the same packed model; only the main process shows
progress (and should save).

Bit-exactness across process counts. The result is bit-identical to the one-process run with the
same ``batch_size`` because: (a) batches are formed globally before sharding, so each batch has the
same composition (and padding) on every process count, and the same per-batch forward and per-batch
``X^T X`` (same shapes, same kernels, same number of torch threads per process: run both with
e.g. ``OMP_NUM_THREADS=1``); (b) the per-batch statistics are summed *exactly*, in fixed-point
integers (:class:`ExactSum`: each value split into four signed 32-bit limbs at fixed binary positions
``2^48 .. 2^-48``, summed as int64), so the sum does not depend on the order or grouping of the
additions (float sums do: ``(a+b)+c != a+(b+c)``; even float64 would differ in the last bits and could
flip a float32 rounding; the test shows that the per-layer objectives then differ between 1 and 2
processes); (c) the optimisation then runs on identical inputs, and each layer on one process only.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..config import SplitQuantConfig
from ..methods import element_grid, get_format, pack_grid_codes
from ..methods.attention_round import AttentionRoundOptions, attention_round, expand_hessian
from ..nn.packed_linear import PackedLinear
from .transformers import (
    _float_weight,
    _set_module,
    _shape_of,
    attach_quantizer,
    iter_packed_modules,
    normalise_name,
    quantize_model,
    search_bit_widths,
    select_modules,
)

logger = logging.get_logger(__name__)

__all__ = ["calibrate_and_quantize", "ExactSum", "anonymous_memory", "find_blocks", "load_calibration_file",
           "quantize_from_file", "shard_batches"]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 512


# --------------------------------------------------------------------------------------------
# Exact, order-independent sums
# --------------------------------------------------------------------------------------------


class ExactSum:
    """Sum of float tensors that does not depend on the order or grouping of the additions.

    Each added value is converted to float64 and split exactly into four signed 32-bit limbs at
    fixed binary positions, ``v = sum_k l_k * 2^p_k`` with ``p = 48, 16, -16, -48`` (truncation toward
    zero and exact fractional parts; only the last limb is rounded, to ``2^-48 ~ 3.6e-15`` absolute,
    value by value, so the rounding does not depend on what else is summed). The limbs are summed as
    int64, which is exact and associative (``|l_k| <= 2^32``: up to ``2^31`` additions), also across
    processes. :meth:`value` converts back to float64 in a fixed order. Values must satisfy
    ``|v| < 2^79``.
    """

    POSITIONS = (48, 16, -16, -48)
    LIMIT = 2.0**79

    def __init__(self, shape: Sequence[int]) -> None:
        self.limbs = torch.zeros((len(self.POSITIONS), *shape), dtype=torch.int64)

    def add(self, value: torch.Tensor) -> None:
        scaled = value.detach().to(device="cpu", dtype=torch.float64)
        if scaled.numel():
            peak = float(scaled.abs().max())
            if not peak < self.LIMIT:  # also catches NaN
                raise ValueError("calibration statistics contain NaN or Inf or exceed 2^79 (the model's "
                                 "activations overflow)")
        scaled = scaled.mul_(2.0 ** (-self.POSITIONS[0]))  # exact: a power-of-two scaling
        last = len(self.POSITIONS) - 1
        for k in range(last):
            part = torch.trunc(scaled)
            self.limbs[k] += part.to(torch.int64)
            scaled = scaled.sub_(part).mul_(2.0 ** (self.POSITIONS[k] - self.POSITIONS[k + 1]))  # exact
        self.limbs[last] += torch.round(scaled).to(torch.int64)

    def value(self) -> torch.Tensor:
        """The sum as float64 (deterministic: fixed conversion and summation order)."""
        total = torch.zeros(self.limbs.shape[1:], dtype=torch.float64)
        for k in reversed(range(len(self.POSITIONS))):
            total += self.limbs[k].to(torch.float64) * 2.0 ** self.POSITIONS[k]
        return total


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


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
    except ImportError:  # pragma: no cover - datasets is a dependency
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
    import datasets

    suffix = os.path.splitext(str(path))[1].lower()
    builders = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    if suffix not in builders:
        raise ValueError(f"calibration file {path}: expected .txt, .json, .jsonl or .csv, got {suffix or 'no suffix'!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path} does not exist")
    return datasets.load_dataset(builders[suffix], data_files=str(path), split="train")


def quantize_from_file(model_class: Any, model_path: str, config: SplitQuantConfig, data_file: str | None,
                       num_samples: int = 1024, **load_kwargs: Any) -> nn.Module:
    """The command line's calibration path: load the float model and its tokenizer from ``model_path``,
    the samples from ``data_file`` (:func:`load_calibration_file`), and quantize with calibration."""
    from transformers import AutoTokenizer

    if data_file is None:
        raise ValueError(f"rounding={config.rounding!r} needs --calibration-data FILE")
    data = load_calibration_file(data_file)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = model_class.from_pretrained(model_path, **load_kwargs)
    return calibrate_and_quantize(model, config, data, tokenizer=tokenizer, num_samples=num_samples)


def _collate(samples: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for one batch."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("a calibration batch holds no tensor")


def _truncate(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def _global_batches(data: Any, tokenizer: Any, num_samples: int, batch_size: int, max_length: int,
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
            n = _batch_size_of(batch)
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
        samples += _batch_size_of(batch)
    return local, count, samples


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------


def find_blocks(model: nn.Module, layer_names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of repeated blocks holding the most quantized layers (``None`` if none)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for n in layer_names if n.startswith(prefix))
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    return None if best is None else (best[1], best[2])


class _StopForward(Exception):
    """Raised by the hook that captures the first block's inputs, to skip the rest of the model."""


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise TypeError(f"cannot read the hidden states from a block output of type {type(out).__name__}")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` and eval mode while calibrating (restored afterwards)."""
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    was_training = model.training
    if config is not None and old_cache is not None:
        config.use_cache = False
    model.eval()
    try:
        yield
    finally:
        if config is not None and old_cache is not None:
            config.use_cache = old_cache
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Statistics of layer inputs
# --------------------------------------------------------------------------------------------


class _InputStatistics:
    """Forward hooks summing ``X^T X`` (and the row count) of each watched layer's inputs, exactly.

    Layers called on the very same input tensor (q/k/v, gate/up) share one sum: the later ones are
    recorded as aliases of the first. ``X^T X`` is symmetric, so only its upper triangle is summed.
    """

    def __init__(self, layers: Mapping[str, nn.Module], sizes: Mapping[str, int]) -> None:
        self.names = list(layers)
        self.sizes = dict(sizes)
        self.sums: dict[str, ExactSum] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.batches = 0
        self.mask: torch.Tensor | None = None  # [batch, tokens] bool of the current batch
        self._last: tuple[torch.Tensor, str] | None = None
        self._triu: dict[int, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in layers.items()]

    def _upper(self, n: int) -> torch.Tensor:
        if n not in self._triu:
            rows, cols = torch.triu_indices(n, n)
            self._triu[n] = rows * n + cols
        return self._triu[n]

    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:  # same input as the previous layer
                self.alias[name] = self._last[1]
                return
            flat = x.detach()
            if self.mask is not None and tuple(flat.shape[:-1]) == tuple(self.mask.shape):
                flat = flat[self.mask]  # padding tokens excluded
            flat = flat.reshape(-1, flat.shape[-1]).float()
            h = flat.t() @ flat
            n = h.shape[0]
            if name not in self.sums:
                self.sums[name] = ExactSum((n * (n + 1) // 2,))
                self.counts[name] = 0
            self.sums[name].add(h.reshape(-1).index_select(0, self._upper(n).to(h.device)))
            self.counts[name] += flat.shape[0]
            self._last = (x, name)

        return hook

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._last = None
        self.batches += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def reduce(self, accelerator: Any) -> None:
        """Sum the statistics over all processes: one collective per shared input, after the local pass.

        Process 0 always holds batch 0, so its aliases are the reference (every process that saw a batch
        must agree); layers that saw no token get zero sums so that every process reduces the same tensors.
        """
        if accelerator is not None and accelerator.num_processes > 1:
            alias = _broadcast(dict(self.alias), 0, accelerator)
            if self.batches and alias != self.alias:
                raise RuntimeError("the layers sharing an input differ between processes")
            self.alias = alias
        for name in self.names:
            if name not in self.alias and name not in self.sums:
                n = self.sizes[name]
                self.sums[name] = ExactSum((n * (n + 1) // 2,))
                self.counts[name] = 0
        if accelerator is None or accelerator.num_processes == 1:
            return
        leaders = [n for n in self.names if n not in self.alias]
        for name in leaders:
            self.sums[name].limbs = accelerator.reduce(self.sums[name].limbs, reduction="sum")
        counts = accelerator.reduce(torch.tensor([self.counts[n] for n in leaders], dtype=torch.int64), reduction="sum")
        self.counts = {n: int(c) for n, c in zip(leaders, counts.tolist())}

    def leader(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def count(self, name: str) -> int:
        return self.counts[self.leader(name)]

    def hessian(self, name: str) -> torch.Tensor:
        """The summed ``X^T X`` of ``name``'s inputs, ``[in, in]`` float32 (symmetric)."""
        n = self.sizes[name]
        upper = self.sums[self.leader(name)].value()
        full = torch.zeros(n * n, dtype=torch.float64)
        full[self._upper(n)] = upper
        full = full.reshape(n, n)
        return (full + full.triu(1).t()).float()


# --------------------------------------------------------------------------------------------
# The calibration
# --------------------------------------------------------------------------------------------


def anonymous_memory() -> int:
    """Bytes of anonymous (private, heap) memory of this process: Linux ``/proc/self/smaps_rollup``,
    else the resident set size. Unlike the RSS it leaves out the memory-mapped float weights that
    ``from_pretrained`` loads lazily from safetensors (touching them is not a cost of calibration)."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each block frees its statistics, optimisation buffers and float layers while the small packed
    tensors it keeps stay scattered over the heap, so glibc would otherwise hold on to the freed
    memory and the process would grow block after block (measured on SmolLM2: ~15 MB per block).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


class _Memory:
    """Peak anonymous memory (see :func:`anonymous_memory`), sampled at the end of every pass."""

    def __init__(self) -> None:
        self.start = anonymous_memory()
        self.peak = self.start

    def sample(self) -> None:
        self.peak = max(self.peak, anonymous_memory())


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _broadcast(payload: Any, owner: int, accelerator: Any) -> Any:
    if accelerator is None or accelerator.num_processes == 1:
        return payload
    from accelerate.utils import broadcast_object_list

    box = [payload]
    broadcast_object_list(box, from_process=owner)
    return box[0]


def _make_accelerator(device: torch.device) -> Any:
    """An Accelerator for the model's device (on CPU ``cpu=True``, which makes torchrun processes use gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(even_batches=False))


def calibrate_and_quantize(
    model: nn.Module,
    config: SplitQuantConfig,
    calibration_data: Any,
    tokenizer: Any = None,
    num_samples: int = 1024,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    progress: bool = True,
    accelerator: Any = None,
) -> nn.Module:
    """Quantize ``model`` in place with calibration data (Attention Round) and return it, packed.

    Args:
        model: a float transformers model (or any ``nn.Module`` whose Linear layers ``config`` selects).
        config: the :class:`~hf_splitquant.SplitQuantConfig`; ``rounding="attention_round"`` with its
            ``rounding_options`` (see :class:`~hf_splitquant.methods.attention_round.AttentionRoundOptions`).
            Not modified; the model gets a copy with ``layers`` filled in.
        calibration_data: a ``datasets.Dataset`` (a ``text`` column, or one string column, or tokenized
            ``input_ids``), a list of strings (or of token-id lists), a 2-D tensor of token ids, or a
            ``torch.utils.data.DataLoader`` yielding dicts of model inputs (used in its own order).
        tokenizer: tokenizes text samples (truncation to ``max_length``); its pad token pads batches.
        num_samples: number of calibration samples; from a larger dataset they are drawn with ``seed``
            (the same subset on every process), a DataLoader is cut after that many samples.
        batch_size: samples per forward pass (not for DataLoaders). The result depends on it only
            through float rounding; it is identical across process counts for one ``batch_size``.
        max_length: tokens per sample at most.
        seed: seed of the sample subset.
        progress: show a progress bar (main process only).
        accelerator: an ``accelerate.Accelerator`` for several processes (``torchrun``); by default one is
            created, which is a single process unless launched by ``torchrun``.

    Returns:
        ``model``, with the selected layers packed, ``quantization_config`` attached (``save_pretrained``
        writes the packed format) and ``model.calibration_report`` (a dict: samples, tokens, processes,
        seconds, peak anonymous memory (``peak_memory_mb``, ``memory_increase_mb``; sampled after every
        pass) and one block's activations (``activations_mb``), and per layer its bits and objective
        before/after).
    """
    started = time.perf_counter()
    config = SplitQuantConfig.from_dict(config.to_dict())  # the caller's object stays untouched
    if config.rounding is None:
        logger.warning("calibration_data is ignored: config.rounding is None (round to nearest needs no data); "
                       "set rounding='attention_round' to use it")
        return quantize_model(model, config, progress=progress)
    options = AttentionRoundOptions.from_dict(config.rounding_options)
    if calibration_data is None:
        raise ValueError(f"rounding={config.rounding!r} needs calibration_data (a datasets.Dataset, a list of "
                         "strings or a DataLoader)")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if any(True for _ in iter_packed_modules(model)):
        raise ValueError("this model is already quantized; load or build the float model to quantize it again")
    device = _model_device(model)
    if accelerator is None:
        accelerator = _make_accelerator(device)
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and world == 1:
        logger.warning(f"launched with WORLD_SIZE={launched} but the Accelerator sees one process, so every process "
                       "calibrates on all the data by itself; on CPU create it with Accelerator(cpu=True)")
    is_main = accelerator.is_main_process
    show = progress and is_main and logging.is_progress_bar_enabled()
    memory = _Memory()

    selected = select_modules(model, config)
    if not selected:
        raise ValueError("no Linear layer to quantize: every Linear/Conv1D is listed in `modules_to_not_convert` or tied")
    modules = dict(selected)
    if config.bit_allocation == "coding_length":
        widths = _coding_length_widths(selected, config) if is_main else None
        widths = _broadcast(widths, 0, accelerator)
    elif config.bit_allocation:
        widths = search_bit_widths(selected, config, progress=show) if is_main else None
        widths = _broadcast(widths, 0, accelerator)
    else:
        widths = {}
    specs = {}
    for name, module in selected:
        in_f, out_f, source = _shape_of(module)
        specs[name] = config.spec_for(in_f, out_f, module.bias is not None, source, bits=widths.get(name))
    del selected  # `modules` holds the float layers until each is replaced

    if isinstance(calibration_data, torch.utils.data.DataLoader) and world > 1 and isinstance(
        getattr(calibration_data, "sampler", None), torch.utils.data.RandomSampler
    ):
        raise ValueError("with several processes the calibration DataLoader must not shuffle (each process must see "
                         "the same global order); use shuffle=False")
    batches, num_batches, total_samples = shard_batches(
        _global_batches(calibration_data, tokenizer, num_samples, batch_size, max_length, seed), rank, world
    )
    masks = [b["attention_mask"].bool() if isinstance(b.get("attention_mask"), torch.Tensor) else None for b in batches]

    found = find_blocks(model, list(modules))
    block_prefix, blocks = (found[0], list(found[1])) if found is not None else ("", [])
    prefix = f"{block_prefix}." if block_prefix else ""
    in_block: list[list[str]] = [[] for _ in blocks]
    leftover: list[str] = []
    for name in modules:
        if blocks and name.startswith(prefix):
            index = int(name[len(prefix) :].split(".", 1)[0])
            in_block[index].append(name)
        else:
            leftover.append(name)

    report: dict[str, Any] = {"num_samples": total_samples, "num_batches": num_batches, "processes": world,
                              "options": options.to_dict(), "layers": {}}
    order = {name: i for i, name in enumerate(modules)}  # seeds of the layers (model order)
    activation_peak = 0

    def quantize_group(names: list[str], stats: _InputStatistics) -> None:
        stats.reduce(accelerator)
        # each layer is optimised by one process (all of a process's layers first, then the broadcasts, so
        # the processes work in parallel); every process then installs the same packed tensors
        owners = _assign_owners(names, specs, world)
        mine = {name: _round_layer(name, modules[name], specs[name], stats, options, config.seed + order[name])
                for name in names if owners[name] == rank}
        for name in names:
            packed, info = _broadcast(mine.get(name), owners[name], accelerator)
            _install(model, name, modules.pop(name), specs[name], packed)  # the float layer is freed
            report["layers"][normalise_name(model, name)] = {"bits": specs[name].bits, **info}

    with torch.no_grad(), _no_cache(model):
        # 1. the first block's inputs
        stored: list[tuple[tuple, dict]] = []
        if blocks:
            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                stored.append((args, kwargs))
                raise _StopForward

            handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
            try:
                for batch in batches:
                    with contextlib.suppress(_StopForward):
                        model(**_to_device(batch, device))
            finally:
                handle.remove()
        bar = tqdm(total=len(blocks) + (1 if leftover else 0), desc="Calibrating (Attention Round)", unit="block",
                   disable=not show)
        # 2. block by block
        for index, block in enumerate(blocks):
            names = in_block[index]
            if names:
                sizes = {n: _shape_of(modules[n])[0] for n in names}
                stats = _InputStatistics({n: modules[n] for n in names}, sizes)
                try:
                    for (args, kwargs), mask in zip(stored, masks):
                        stats.new_batch(None if mask is None else mask.to(device))
                        block(*args, **kwargs)
                finally:
                    stats.remove()
                memory.sample()
                quantize_group(names, stats)
                del stats
            if index + 1 < len(blocks):
                outputs = []
                for args, kwargs in stored:
                    outputs.append(_with_hidden(args, kwargs, _first_output(block(*args, **kwargs))))
                activation_peak = max(activation_peak, _tensor_bytes([_hidden_of(*s) for s in stored]) +
                                      _tensor_bytes([_hidden_of(*s) for s in outputs]))
                memory.sample()
                stored = outputs
            for module in block.modules():  # drop the dequantized copies used for this block's passes
                if isinstance(module, PackedLinear):
                    module.cache_dequantized = False
                    module._cached = None
            _release_free_memory()
            bar.update(1)
        stored = []
        # 3. layers outside the blocks, with the whole (quantized) model
        if leftover:
            sizes = {n: _shape_of(modules[n])[0] for n in leftover}
            stats = _InputStatistics({n: modules[n] for n in leftover}, sizes)
            try:
                for batch, mask in zip(batches, masks):
                    stats.new_batch(None if mask is None else mask.to(device))
                    model(**_to_device(batch, device))
            finally:
                stats.remove()
            memory.sample()
            quantize_group(leftover, stats)
            bar.update(1)
        bar.close()

    for _, packed_module in iter_packed_modules(model):
        packed_module.cache_dequantized = False
        packed_module._cached = None
    config.layers = {normalise_name(model, name): spec.to_dict() for name, spec in specs.items()}
    attach_quantizer(model, config)
    memory.sample()
    layers = report["layers"].values()
    report.update({
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": memory.peak / 2**20,
        "memory_increase_mb": (memory.peak - memory.start) / 2**20,
        "activations_mb": activation_peak / 2**20,
        "mean_mse_ratio": float(sum(i["mse"] / i["mse_rtn"] for i in layers if i["mse_rtn"] > 0)
                                / max(1, sum(1 for i in layers if i["mse_rtn"] > 0))),
    })
    model.calibration_report = report
    accelerator.wait_for_everyone()
    return model


def _assign_owners(names: Sequence[str], specs: Mapping[str, Any], world: int) -> dict[str, int]:
    """Process of each layer: largest first, each to the least loaded process (cost ~ out * cols^2, the
    per-iteration product of Attention Round), deterministically."""
    def cost(name: str) -> int:
        spec = specs[name]
        cols = get_format(spec).columns(spec)
        return spec.out_features * cols * (cols + 64)

    load = [0] * world
    owners = {}
    for name in sorted(names, key=lambda n: (-cost(n), names.index(n))):
        owner = min(range(world), key=lambda p: (load[p], p))
        owners[name] = owner
        load[owner] += cost(name)
    return owners


def _coding_length_widths(selected: list[tuple[str, nn.Module]], config: SplitQuantConfig) -> dict[str, int]:
    """Bit widths by coding length (``config.mixquant_candidates`` are the candidates); weights only."""
    from ..methods.coding_length import allocate_by_coding_length
    from ..methods.mixquant import spec_bits

    weights, costs, sizes = {}, {}, {}
    for name, module in selected:
        in_f, out_f, source = _shape_of(module)
        weights[name] = _float_weight(module)
        costs[name] = {b: spec_bits(config.spec_for(in_f, out_f, module.bias is not None, source, bits=b))
                       for b in config.mixquant_candidates}
        sizes[name] = in_f * out_f
    return allocate_by_coding_length(weights, costs, sizes, config.target_bits, config.coding_length_eps)


def _round_layer(name: str, module: nn.Module, spec: Any, stats: _InputStatistics,
                 options: AttentionRoundOptions, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Attention Round of one layer from its summed input statistics: (packed tensors, info)."""
    weight = _float_weight(module).float().cpu()
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer `{name}` has NaN or Inf weights; cannot quantize it")
    count = stats.count(name)
    if count == 0:
        raise ValueError(f"layer `{name}` saw no calibration token (is it used by the model's forward pass?)")
    hessian = stats.hessian(name)
    try:
        grid = element_grid(weight, spec, seed=seed)
    except ValueError as err:
        raise ValueError(f"cannot quantize layer `{name}`: {err}") from None
    hessian = expand_hessian(hessian, grid.input_index)
    codes, info = attention_round(grid, hessian, count, options, seed=seed)
    packed = pack_grid_codes(grid, codes, spec)
    info = {"tokens": count, **{k: v for k, v in info.items() if k != "iterations"}}
    if math.isfinite(info["mse_rtn"]) and info["mse_rtn"] > 0:
        info["mse_ratio"] = info["mse"] / info["mse_rtn"]
    return {k: v.contiguous() for k, v in packed.items()}, info


def _install(model: nn.Module, name: str, module: nn.Module, spec: Any, packed: dict[str, torch.Tensor]) -> None:
    """Replace the float ``module`` at ``name`` by a PackedLinear holding ``packed`` (and its float bias)."""
    device = module.weight.device
    dtype = module.bias.dtype if module.bias is not None else module.weight.dtype
    new = PackedLinear(spec, device=device, dtype=dtype)
    new.load_packed({k: v.to(device) for k, v in packed.items()})
    if module.bias is not None:
        new.bias.copy_(module.bias.detach())
    new.cache_dequantized = True  # while calibrating: dequantize once, not once per batch (reset at the end)
    _set_module(model, name, new)
