"""The model's structure as calibration sees it: the repeated blocks, their inputs and outputs, and
what one block's activations cost in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psutil
import torch
from torch import nn

__all__ = ["find_blocks", "StopForward", "first_output", "with_hidden", "hidden_of", "to_device", "model_device",
           "no_cache", "anonymous_memory", "MemoryMeter", "tensor_bytes"]


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


class StopForward(Exception):
    """Raised by the hook that captures the first block's inputs, to skip the rest of the model."""


def first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise TypeError(f"cannot read the hidden states from a block output of type {type(out).__name__}")


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
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


class MemoryMeter:
    """Peak anonymous memory (see :func:`anonymous_memory`), sampled at the end of every pass."""

    def __init__(self) -> None:
        self.start = anonymous_memory()
        self.peak = self.start

    def sample(self) -> None:
        self.peak = max(self.peak, anonymous_memory())


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


