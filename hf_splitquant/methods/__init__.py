"""The format registry: one module per method, one :class:`~hf_splitquant.methods.base.QuantFormat`
per packed format. This is the only place that maps a format's name to its implementation; the rest
of the library asks the format (:func:`get_format`) instead of branching on names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch

from ..quant.grid import ElementGrid
from ..quant.rotation import rotate_hessian, rotate_inputs
from ..spec import LayerSpec
from .base import QuantFormat, TensorShapes
from .ocs import OCSFormat
from .rtn import RTNFormat
from .splitquant import SplitQuantFormat

#: Elements per block of rows when a format whose rows are independent quantizes a large weight (1 MiB
#: of float32): quantize-on-load's transient stays near one float layer however large the layer
QUANTIZE_BLOCK_ELEMENTS = 1 << 18

__all__ = [
    "QUANTIZE_BLOCK_ELEMENTS",
    "QuantFormat",
    "register_format",
    "get_format",
    "format_names",
    "tensor_shapes",
    "stored_bytes",
    "quantize_weight",
    "dequantize_weight",
    "element_grid",
    "pack_grid_codes",
    "stored_hessian",
    "to_input_basis",
]

_FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    """Add a format to the registry under ``fmt.name`` (refuses a second format with the same name)."""
    if not isinstance(fmt, QuantFormat) or not fmt.name:
        raise ValueError(f"a format must be a named QuantFormat instance, got {fmt!r}")
    if fmt.name in _FORMATS and type(_FORMATS[fmt.name]) is not type(fmt):
        raise ValueError(f"a format named {fmt.name!r} is already registered ({_FORMATS[fmt.name]!r})")
    _FORMATS[fmt.name] = fmt
    return fmt


for _format in (RTNFormat(), SplitQuantFormat(), OCSFormat()):
    register_format(_format)


def format_names() -> tuple[str, ...]:
    """Names of the registered formats (the accepted values of ``transform``)."""
    return tuple(_FORMATS)


def get_format(spec_or_name: LayerSpec | str) -> QuantFormat:
    """The format of a layer spec (or of a format name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.transform
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"`transform` names an unknown packed format {name!r}; known formats: {format_names()}") from None


def tensor_shapes(spec: LayerSpec) -> TensorShapes:
    """Names (state-dict suffixes), shapes and dtypes of a packed layer's stored tensors."""
    return get_format(spec).tensor_shapes(spec)


def stored_bytes(spec: LayerSpec) -> int:
    """Bytes one packed layer stores (codes with row padding, grids, cluster ids, duplicate indices)."""
    return get_format(spec).stored_bytes(spec)


def quantize_weight(
    weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None
) -> dict[str, torch.Tensor]:
    """Float ``[out, in]`` weight -> stored tensors. Raises ``ValueError`` on NaN/Inf or a shape mismatch.

    ``cache`` (a dict owned by the caller, one per weight) lets a method reuse bit-independent work
    (SplitQuant's k-means) when the same weight is quantized at several bit widths.
    """
    check_weight_shape(weight, spec)
    fmt = get_format(spec)
    if not fmt.rows_independent or spec.out_features <= _rows_per_block(spec):
        if not torch.isfinite(weight).all():
            raise ValueError("weight contains NaN or Inf values")
        return fmt.quantize(weight_in_stored_basis(weight, spec), spec, seed=seed, cache=cache)
    # Blocks of rows, written into the preallocated stored tensors: the float temporaries of the
    # quantization (upcast copy, grid search, codes before packing) stay at the size of one block, not
    # several copies of the layer (bit-identical: no statistic spans rows).
    shapes = fmt.tensor_shapes(spec)
    out = {name: torch.empty(shape, dtype=dtype, device=weight.device) for name, (shape, dtype) in shapes.items()}
    for start, block in weight_row_blocks(weight, spec):
        part = fmt.quantize(weight_in_stored_basis(block, spec), replace(spec, out_features=block.shape[0]), seed=seed)
        for name, tensor in part.items():
            per_row = out[name].shape[0] // spec.out_features
            out[name][start * per_row:(start + block.shape[0]) * per_row] = tensor
        del part, block
    return out


def check_weight_shape(weight: torch.Tensor, spec: LayerSpec) -> None:
    """Raise ``ValueError`` unless ``weight`` is ``[spec.out_features, spec.in_features]``."""
    expected = (spec.out_features, spec.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the layer spec says {expected}")


def _rows_per_block(spec: LayerSpec) -> int:
    """Rows of one block of :func:`weight_row_blocks` (at least one)."""
    return max(1, QUANTIZE_BLOCK_ELEMENTS // spec.in_features)


def weight_row_blocks(weight: torch.Tensor, spec: LayerSpec) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows)`` blocks of about ``QUANTIZE_BLOCK_ELEMENTS`` weights each, every block checked for
    NaN/Inf (``ValueError``): how row-independent quantization keeps its float temporaries small."""
    rows = _rows_per_block(spec)
    for start in range(0, spec.out_features, rows):
        block = weight[start:start + rows]
        if not torch.isfinite(block).all():
            raise ValueError("weight contains NaN or Inf values")
        yield start, block


def weight_in_stored_basis(weight: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The weight in the basis its codes describe: ``W R`` for a layer with ``input_rotation``, else ``W``."""
    if spec.input_rotation is None:
        return weight
    return rotate_inputs(weight.float(), spec.input_rotation)


def dequantize_weight(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype,
                      stored_basis: bool = False) -> torch.Tensor:
    """Stored tensors -> float ``[out, in]`` weight in ``dtype``: the weight the layer computes with on its
    inputs, or with ``stored_basis=True`` the one the codes describe (``W R`` for a rotated layer, which
    computes on rotated inputs)."""
    fmt = get_format(spec)
    if spec.input_rotation is None or stored_basis:
        return fmt.dequantize(tensors, spec, dtype)
    return rotate_inputs(fmt.dequantize(tensors, spec, torch.float32), spec.input_rotation).to(dtype)


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """The grid each element of ``weight`` is rounded on under ``spec`` (see :class:`ElementGrid`); for a
    rotated layer the grid's weight is ``W R`` (hessians for it: :func:`stored_hessian`)."""
    grid = get_format(spec).element_grid(weight_in_stored_basis(weight, spec), spec, seed=seed, cache=cache)
    grid.input_rotation = spec.input_rotation
    return grid


def stored_hessian(hessian: torch.Tensor, grid: ElementGrid) -> torch.Tensor:
    """The ``X^T X`` of the inputs ``grid.weight`` multiplies, from the ``X^T X`` of the layer's inputs
    (OCS: the duplicated channels appended; rotated layers: ``R^T H R``)."""
    from .attention_round import expand_hessian

    h = expand_hessian(hessian, grid.input_index)
    return h if grid.input_rotation is None else rotate_hessian(h, grid.input_rotation)


def to_input_basis(values: torch.Tensor, grid: ElementGrid) -> torch.Tensor:
    """Values on a rotated grid (``[out, in]``, ``W R`` basis) -> the weight they compute with on the layer's
    own inputs (unchanged for other grids)."""
    return values if grid.input_rotation is None else rotate_inputs(values, grid.input_rotation)


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Stored tensors for integer ``codes`` (``[out, cols]``, in ``0..grid.max_code``) chosen on ``grid``."""
    if codes.shape != grid.weight.shape:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the grid {tuple(grid.weight.shape)}")
    if codes.is_floating_point() or int(codes.min()) < 0 or int(codes.max()) > grid.max_code:
        raise ValueError(f"codes must be integers in 0..{grid.max_code}")
    return get_format(spec).pack_grid_codes(grid, codes.to(torch.uint8), spec)
