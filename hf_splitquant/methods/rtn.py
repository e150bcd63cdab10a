"""Plain round-to-nearest on an affine grid: the baseline every transform builds on.

Stored tensors (suffixes of the module's state-dict keys):
  ``weight``       uint8 ``[out * row_bytes]`` codes, rows packed by :mod:`hf_splitquant.quant.packing`
  ``weight_scale`` ``[out, groups]`` in the spec's scale dtype
  ``weight_zero``  uint8 ``[out, groups]`` (asymmetric grids only)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..quant.grid import (
    ElementGrid,
    compute_qparams,
    dequantize_codes,
    expand_params,
    num_groups,
    quantize_codes,
    search_clip_qparams,
)
from ..quant.int4 import (
    compact_grid,
    compact_scales,
    grid_from_compact,
    scales_from_compact,
    zero_points_from_offsets,
)
from ..quant.packing import pack_codes, packed_row_bytes, unpack_codes
from ..spec import LayerSpec
from .base import QuantFormat

__all__ = ["RTNFormat", "tensor_shapes", "quantize", "dequantize", "pack", "unpack", "element_grid",
           "pack_grid_codes"]


def tensor_shapes(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the stored tensors; they follow from the spec alone."""
    groups = num_groups(spec.in_features, spec.group_size)
    shapes = {
        "weight": ((spec.out_features * packed_row_bytes(spec.in_features, spec.bits),), torch.uint8),
        "weight_scale": ((spec.out_features, groups), spec.torch_scale_dtype),
    }
    if not spec.symmetric:
        shapes["weight_zero"] = ((spec.out_features, groups), torch.uint8)
    return shapes


def pack(codes: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return pack_codes(codes, spec.bits).reshape(-1)


def unpack(packed: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    row_bytes = packed_row_bytes(spec.in_features, spec.bits)
    return unpack_codes(packed.reshape(spec.out_features, row_bytes), spec.bits, spec.in_features)


def grid_params(weight: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of every group (with the MSE clip search when ``spec.clip == "mse"``)."""
    search = search_clip_qparams if spec.clip == "mse" else compute_qparams
    return search(weight, spec.bits, spec.group_size, spec.symmetric, spec.torch_scale_dtype)


def grid_from_params(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     spec: LayerSpec) -> ElementGrid:
    cols = weight.shape[1]
    step = expand_params(scale.float(), cols, spec.group_size)
    origin = expand_params(zero.float(), cols, spec.group_size) if zero is not None else float(2 ** (spec.bits - 1))
    state = {"weight_scale": scale} | ({"weight_zero": zero} if zero is not None else {})
    return ElementGrid(weight.float(), step, -origin * step, 2**spec.bits - 1, None, state)


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """The per-element grid RTN rounds on (for rounding optimisers)."""
    scale, zero = grid_params(weight, spec)
    return grid_from_params(weight, scale, zero, spec)


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Stored tensors for integer ``codes`` chosen on ``grid``."""
    return {"weight": pack(codes, spec), **grid.state}


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Quantize a float ``[out, in]`` weight; ``seed`` and ``cache`` are unused (RTN is deterministic)."""
    scale, zero = grid_params(weight, spec)
    codes = quantize_codes(weight, scale, zero, spec.bits, spec.group_size)
    out = {"weight": pack(codes, spec), "weight_scale": scale}
    if zero is not None:
        out["weight_zero"] = zero
    return out


def dequantize(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(tensors["weight"], spec)
    return dequantize_codes(
        codes, tensors["weight_scale"], tensors.get("weight_zero"), spec.bits, spec.group_size, dtype
    )


class RTNFormat(QuantFormat):
    """Plain round-to-nearest on an affine grid per output channel or group (``transform="rtn"``)."""

    name = "rtn"
    has_clipped_grids = True
    rows_independent = True
    dequantize_compiles_well = True  # one fused kernel (int4 g64, 1536 x 384: 0.35 ms against 0.58 eager)

    # the module's functions are the format's implementation
    tensor_shapes = staticmethod(tensor_shapes)
    quantize = staticmethod(quantize)
    dequantize = staticmethod(dequantize)
    element_grid = staticmethod(element_grid)
    pack_grid_codes = staticmethod(pack_grid_codes)

    def int4_grid_residual(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec,
                           kernel_scale: torch.Tensor) -> torch.Tensor | None:
        # Two forms, told apart by their width (int4_grid): half a byte per group (the scales only) where the
        # codes give the zero points back (every group uses code 0, as min-max and clipped rounding do) or
        # there are none; else a byte per group (zero point and scale).
        if spec.bits > 4:
            return None
        scale, zero = tensors["weight_scale"], tensors.get("weight_zero")
        groups = scale.shape[1]
        kernel_scale = kernel_scale[:, :groups]
        if groups > 1 and (zero is None or self._uses_code_zero(tensors, spec)):
            return compact_scales(scale, kernel_scale)
        return compact_grid(scale, zero, kernel_scale)

    def _uses_code_zero(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> bool:
        # int4_grid reads each zero point back as -min(q - zero point): right exactly where min(q) = 0
        codes = unpack(tensors["weight"], spec).to(torch.int32)
        return not zero_points_from_offsets(codes, spec.group_size).any()

    def int4_grid(self, residual: torch.Tensor, spec: LayerSpec, kernel_scale: torch.Tensor,
                  offsets: Callable[[torch.Tensor], torch.Tensor | None]) -> dict[str, torch.Tensor]:
        groups = num_groups(spec.in_features, spec.group_size)
        if residual.shape[1] == groups:  # a byte per group
            scale, zero = grid_from_compact(residual, kernel_scale[:, :groups], not spec.symmetric)
        else:  # half a byte per group, the zero points from the codes
            scale = scales_from_compact(residual, kernel_scale, groups)
            zero = None
            if not spec.symmetric:
                d = offsets(scale)
                if d is None:
                    raise RuntimeError("hf_splitquant: the int4 layout no longer gives this layer's codes back; "
                                       "please report this bug")
                zero = zero_points_from_offsets(d, spec.group_size)
        return {"weight_scale": scale} | ({"weight_zero": zero} if zero is not None else {})

    def clipped_grid(self, weight: torch.Tensor, spec: LayerSpec, importance: torch.Tensor,
                     factors: tuple[float, ...]) -> ElementGrid:
        scale, zero = search_clip_qparams(weight, spec.bits, spec.group_size, spec.symmetric, spec.torch_scale_dtype,
                                          factors=factors, importance=importance)
        return grid_from_params(weight, scale, zero, spec)
