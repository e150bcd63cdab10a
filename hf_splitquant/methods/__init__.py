"""One module per method; each maps a float weight and a :class:`~hf_splitquant.spec.LayerSpec`
to the stored tensors and back. This registry is the only place that dispatches on the name."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import torch

from ..spec import LayerSpec
from . import ocs, rtn, splitquant

__all__ = ["method_module", "tensor_shapes", "quantize_weight", "dequantize_weight"]

_METHODS: dict[str, ModuleType] = {"rtn": rtn, "splitquant": splitquant, "ocs": ocs}


def method_module(spec: LayerSpec) -> ModuleType:
    return _METHODS[spec.transform]


def tensor_shapes(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names (state-dict suffixes), shapes and dtypes of a packed layer's stored tensors."""
    return method_module(spec).tensor_shapes(spec)


def quantize_weight(
    weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None
) -> dict[str, torch.Tensor]:
    """Float ``[out, in]`` weight -> stored tensors. Raises ``ValueError`` on NaN/Inf or a shape mismatch.

    ``cache`` (a dict owned by the caller, one per weight) lets a method reuse bit-independent work
    (SplitQuant's k-means) when the same weight is quantized at several bit widths.
    """
    expected = (spec.out_features, spec.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the layer spec says {expected}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")
    return method_module(spec).quantize(weight, spec, seed=seed, cache=cache)


def dequantize_weight(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    """Stored tensors -> float ``[out, in]`` weight in ``dtype``."""
    return method_module(spec).dequantize(tensors, spec, dtype)
