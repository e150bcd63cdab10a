"""One module per method; each maps a float weight and a :class:`~hf_splitquant.spec.LayerSpec`
to the stored tensors and back. This registry is the only place that dispatches on the name."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import torch

from ..quant.grid import ElementGrid
from ..spec import LayerSpec
from . import ocs, rtn, splitquant

__all__ = ["method_module", "tensor_shapes", "quantize_weight", "dequantize_weight", "element_grid", "pack_grid_codes"]

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


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """The grid each element of ``weight`` is rounded on under ``spec`` (see :class:`ElementGrid`)."""
    return method_module(spec).element_grid(weight, spec, seed=seed, cache=cache)


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Stored tensors for integer ``codes`` (``[out, cols]``, in ``0..grid.max_code``) chosen on ``grid``."""
    if codes.shape != grid.weight.shape:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the grid {tuple(grid.weight.shape)}")
    if codes.is_floating_point() or int(codes.min()) < 0 or int(codes.max()) > grid.max_code:
        raise ValueError(f"codes must be integers in 0..{grid.max_code}")
    return method_module(spec).pack_grid_codes(grid, codes.to(torch.uint8), spec)
