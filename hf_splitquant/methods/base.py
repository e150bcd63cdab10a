"""The contract every packed weight format implements (RTN, SplitQuant, OCS, ...).

A format maps a float ``[out, in]`` weight and a :class:`~hf_splitquant.spec.LayerSpec` to the
tensors stored in a checkpoint and back, and answers every question the rest of the library asks
about those tensors: their names and shapes (checkpoint validation, skeletons), their size in bytes
(bits per weight), the grid each element is rounded on (rounding optimisers and fake quantization),
how they become int4-kernel terms (CPU kernels), and how OCS-like formats expand and fold input
channels. Nothing outside :mod:`hf_splitquant.methods` branches on a format's name: it asks the
format returned by :func:`hf_splitquant.methods.get_format`.

Adding a format: one module in ``hf_splitquant/methods/`` with a :class:`QuantFormat` subclass,
registered with :func:`hf_splitquant.methods.register_format`, plus one row in the test matrix of
``tests/test_formats.py``. The stored layout must be described in ``docs/format.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar

import torch

from ..quant.grid import ElementGrid, expand_params, num_groups
from ..quant.int4 import Int4Term, affine_codes, affine_offsets, affine_terms
from ..spec import LayerSpec

__all__ = ["QuantFormat", "TensorShapes", "options_from_dict"]

#: state-dict suffix -> (shape, dtype) of a packed layer's stored tensors
TensorShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def options_from_dict(cls: type, options: Mapping[str, Any] | None, method: str,
                      field: str = "rounding_options") -> Any:
    """Build a method's frozen options dataclass from the config's ``field`` (``rounding_options``, or
    ``block_tuning``): ``None`` gives the defaults; unknown keys and bad values raise ``ValueError`` naming
    them (the dataclass validates)."""
    if options is None:
        return cls()
    if not isinstance(options, Mapping):
        raise ValueError(f"{field} must be a dict or None, got {type(options).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown {field} {unknown} for {method}; known options are {known}")
    return cls(**dict(options))


class QuantFormat:
    """Base class of the packed formats. Subclasses set :attr:`name` and implement the abstract methods.

    The defaults describe a plain affine format (codes ``weight``, ``weight_scale`` and an optional
    integer ``weight_zero`` per group over ``columns(spec)`` columns), so a format only overrides
    what differs.
    """

    #: the value of ``LayerSpec.transform`` (and ``SplitQuantConfig.transform``) naming this format
    name: ClassVar[str] = ""
    #: ``LayerSpec`` fields (besides the common ones) that this format reads; the config fills only these
    spec_fields: ClassVar[tuple[str, ...]] = ()
    #: whether the element grids depend on a clustering that fake quantization may re-fit while training
    refits_clusters: ClassVar[bool] = False
    #: whether the clipped straight-through estimator is meaningful (each weight has one grid position)
    supports_clipped_ste: ClassVar[bool] = True
    #: what each stored tensor is, for bits-per-weight reports (by state-dict suffix)
    tensor_roles: ClassVar[dict[str, str]] = {"weight": "codes", "weight_scale": "scales", "weight_zero": "zero_points"}
    #: whether :meth:`clipped_grid` exists (grids with ranges that may be shrunk)
    has_clipped_grids: ClassVar[bool] = False
    #: every output row is quantized on its own (no statistic spans rows): a large weight can be quantized
    #: in blocks of rows, which bounds the float temporaries (:func:`hf_splitquant.methods.quantize_weight`)
    rows_independent: ClassVar[bool] = False
    #: whether ``torch.compile`` traces :meth:`dequantize` into code as fast as eager, without graph breaks; where
    #: not (SplitQuant: its table gathers compile into scalar code; MiniLM batch 32, 0.72x bf16 traced against 0.79x
    #: opaque, `benchmarks/bench_compiled_dequantize.py`), a compiled forward runs the eager dequantize as one opaque
    #: operator (:func:`hf_splitquant.kernels.dequantize_for_forward`)
    dequantize_compiles_well: ClassVar[bool] = False

    # ---------------------------------------------------------------- stored tensors

    def tensor_shapes(self, spec: LayerSpec) -> TensorShapes:
        """Names (state-dict suffixes), shapes and dtypes of the stored tensors; they follow from ``spec`` alone."""
        raise NotImplementedError

    def tensor_bytes(self, spec: LayerSpec) -> dict[str, int]:
        """Bytes of each stored tensor of one layer, by state-dict suffix."""
        return {name: math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                for name, (shape, dtype) in self.tensor_shapes(spec).items()}

    def stored_bytes(self, spec: LayerSpec) -> int:
        """Bytes of every stored tensor of one layer (codes with row padding, grids, ids, indices)."""
        return sum(self.tensor_bytes(spec).values())

    def columns(self, spec: LayerSpec) -> int:
        """Columns of the weight the codes describe (OCS: the input features plus their duplicates)."""
        return spec.in_features

    # ---------------------------------------------------------------- quantize / dequantize

    def quantize(self, weight: torch.Tensor, spec: LayerSpec, seed: int = 0,
                 cache: dict | None = None) -> dict[str, torch.Tensor]:
        """Float ``[out, in]`` weight -> stored tensors (round to nearest on the format's grid)."""
        grid = self.element_grid(weight, spec, seed=seed, cache=cache)
        return self.pack_grid_codes(grid, grid.nearest_codes(), spec)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        """Stored tensors -> float ``[out, in]`` weight in ``dtype``."""
        raise NotImplementedError

    def invalid_values(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> tuple[str, str] | None:
        """``(tensor suffix, what is wrong)`` if loaded tensors hold values no save can have written
        (checkpoint validation), else ``None``. The base checks the affine grid parameters."""
        scale = tensors["weight_scale"].float()
        if not torch.isfinite(scale).all() or not (scale > 0).all():
            return "weight_scale", "holds NaN, Inf, zero or negative scales"
        if "weight_min" in tensors and not torch.isfinite(tensors["weight_min"].float()).all():
            return "weight_min", "holds NaN or Inf values"
        zero = tensors.get("weight_zero")
        if zero is not None and zero.numel() and int(zero.max()) > 2**spec.bits - 1:
            return "weight_zero", f"holds zero points above {2**spec.bits - 1} for {spec.bits}-bit codes"
        return None

    def element_grid(self, weight: torch.Tensor, spec: LayerSpec, seed: int = 0,
                     cache: dict | None = None) -> ElementGrid:
        """The grid every element of ``weight`` (after the format's transform) is rounded on."""
        raise NotImplementedError

    def pack_grid_codes(self, grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
        """Stored tensors for integer ``codes`` (uint8 ``[out, columns]``) chosen on ``grid``."""
        raise NotImplementedError

    def clipped_grid(self, weight: torch.Tensor, spec: LayerSpec, importance: torch.Tensor,
                     factors: tuple[float, ...]) -> ElementGrid:
        """The element grid with each group's range shrunk by the factor (from ``factors``, 1.0 first) that
        minimises ``sum_j importance_j * (w_j - q(w_j))^2`` over the group: with ``importance = diag(X^T X)``
        a clip for the layer's output error (:mod:`hf_splitquant.methods.output_clip`)."""
        raise ValueError(f"the {self.name!r} format has no clipped grids (its grids span their members exactly)")

    def element_param_index(self, state: Mapping[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
        """Index ``[out, columns]`` of each element's grid parameters in the flattened ``weight_scale``
        (learned scales train those entries): ``row * groups + group`` over the stored columns."""
        cols = self.columns(spec)
        groups = num_groups(cols, spec.group_size)
        size = cols if spec.group_size is None or spec.group_size >= cols else spec.group_size
        return torch.arange(spec.out_features).unsqueeze(1) * groups + (torch.arange(cols) // size).unsqueeze(0)

    # ---------------------------------------------------------------- input expansion (OCS)

    def input_index(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor | None:
        """Input features the int4 terms expect appended to ``x`` (``[x, x[..., index]]``), or ``None``."""
        return None

    def channel_order(self, weight: torch.Tensor, spec: LayerSpec) -> list[int] | None:
        """The format's data-dependent channel choices for ``weight`` (fixed when a grid is frozen)."""
        return None

    def expand_weight(self, weight: torch.Tensor, spec: LayerSpec, scale: torch.Tensor | None,
                      order: list[int] | None) -> torch.Tensor:
        """The weight the codes describe, differentiable in ``weight`` (identity unless the format expands)."""
        return weight

    def fold_weight(self, expanded: torch.Tensor, input_index: torch.Tensor | None, spec: LayerSpec) -> torch.Tensor:
        """The ``[out, in]`` weight computing what the expanded weight computes (identity unless expanded)."""
        return expanded

    # ---------------------------------------------------------------- CPU int4 kernel terms

    def int4_terms(self, spec: LayerSpec) -> int:
        """How many int4-kernel terms one forward of this layer takes."""
        return 1 if spec.bits <= 4 else 2

    def int4_unsupported(self, spec: LayerSpec) -> str | None:
        """Why this layer should not run on int4 terms (or ``None``)."""
        return None

    def int4_parts(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, codes: torch.Tensor,
                   group: int) -> list[Int4Term] | None:
        """The terms ``(codes 0..15, step, zero)`` whose kernel outputs add up to the layer's output
        (with the inputs of :meth:`input_index` appended), or ``None`` when these tensors cannot be
        written as :meth:`int4_terms` terms (the layer then takes the dequantize paths)."""
        cols = codes.shape[1]
        scale = expand_params(tensors["weight_scale"].float(), cols, spec.group_size)
        zero = tensors.get("weight_zero")
        origin = (expand_params(zero.float(), cols, spec.group_size) if zero is not None
                  else torch.full_like(scale, float(2 ** (spec.bits - 1))))
        return affine_terms(codes, scale, origin, spec.bits, group)

    def int4_codes(self, terms: list[Int4Term], tensors: Mapping[str, torch.Tensor], spec: LayerSpec,
                   group: int) -> torch.Tensor | None:
        """Inverse of :meth:`int4_parts`: the stored codes (``[out, columns]`` int32) from the kernel's terms
        (codes 0..15 ``[out, cols]``, step and zero per kernel group ``[out, groups]``) and the stored
        tensors other than the codes, or ``None`` when this format cannot read its codes back (the layer
        then keeps its stored codes next to the kernel layout)."""
        cols = terms[0][0].shape[1]
        if cols != self.columns(spec):
            return None
        zero = tensors.get("weight_zero")
        origin = (expand_params(zero.float(), cols, spec.group_size) if zero is not None
                  else torch.full((spec.out_features, cols), float(2 ** (spec.bits - 1))))
        return affine_codes(terms, origin, group, spec.bits, _kernel_group_scale(tensors["weight_scale"], terms))

    def int4_offsets(self, terms: list[Int4Term], scale: torch.Tensor, spec: LayerSpec,
                     group: int) -> torch.Tensor | None:
        """``q - zero point`` per weight (``[out, columns]`` int32) from the kernel's terms and the grid's exact
        ``scale``, without the zero points (:func:`~hf_splitquant.quant.int4.affine_offsets`); ``None`` where the
        terms are not of that form."""
        if terms[0][0].shape[1] != self.columns(spec):
            return None
        return affine_offsets(terms, group, spec.bits, _kernel_group_scale(scale, terms))

    def int4_grid_residual(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec,
                           kernel_scale: torch.Tensor) -> torch.Tensor | None:
        """What the grid tensors (scales, zero points) hold beyond the kernel's bf16 scales
        (``kernel_scale``, ``[out, kernel groups]``), compact, or ``None`` (the default: they stay stored)."""
        return None

    def int4_grid(self, residual: torch.Tensor, spec: LayerSpec, kernel_scale: torch.Tensor,
                  offsets: Callable[[torch.Tensor], torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`int4_grid_residual`: the grid tensors, by state-dict suffix. ``offsets(scale)``
        gives :meth:`int4_offsets` of the layout's terms (read from the layout only when called)."""
        raise NotImplementedError(f"the {self.name!r} format keeps its grid tensors")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _kernel_group_scale(scale: torch.Tensor, terms: list[Int4Term]) -> torch.Tensor | None:
    """The grid's exact scale per kernel group (``[out, kernel groups]``), where the format's groups are the
    kernel's (or one per row); ``None`` otherwise (the kernel's bf16 step is then used)."""
    groups = terms[-1][1].shape[1]
    scale = scale.float()
    scale = scale.expand(-1, groups) if scale.shape[1] == 1 else scale[:, :groups]
    return scale if scale.shape[1] == groups else None
