"""Matmul paths for packed layers, chosen per call by device, dtype, bit width and shape.

* ``"reference"``: dequantize the packed weight to the input's dtype and call ``F.linear``. Exact
  with respect to the stored format; the fallback for everything.
* ``"int4"`` (CPU): torch's int4 kernel ``aten._weight_int4pack_mm_for_cpu``, which computes
  ``x @ ((q - 8) * scale + zero)^T`` for codes ``q`` in 0..15 with one bf16 (scale, zero) per row
  and kernel group. A layer becomes one or more such *terms* whose outputs add up to its output,
  exactly (each weight is represented exactly, given bf16 grid parameters):

  - RTN / OCS, 2-4 bits: one term. Codes ``0..2^b-1`` are int4 codes, shifted so the kernel's
    zero (code 8) is our integer zero point (or ``zero = (8 - zero_point) * scale`` when a 4-bit
    group does not allow the shift), so int2 and int3 stay compact on disk and run as fast as int4.
  - RTN / OCS, 5-8 bits: two terms, the high and the low nibble of the code offset (``16 * scale``
    and ``scale``), so int8 runs at about twice the int4 cost instead of dequantizing per call.
  - SplitQuant, 2-4 bits: six terms. The clusters partition the weights, so per cluster one term
    holds its codes (other weights at the kernel's zero) and one holds its grid offset as a 0/1
    mask: cheaper than a dense per-call dequantize of three grids.
  - OCS gathers the duplicated input features before the call (``[x, x[..., index]]``).

  The terms are built once per layer and cached (not part of the state dict; reset on ``.to()``
  and ``load_state_dict``). They compute in bfloat16 (activations, scales and output; several
  terms are summed in float32), which is the kernel's documented rounding; fp32 inputs are cast.
* For many tokens per call (more than ``INT4_MAX_TOKENS`` divided by the number of terms) the
  kernel is slower than a bf16 matmul, so ``"auto"`` dequantizes once per call to bf16 and uses
  the bf16 matmul (``"dequant-bf16"``). Inside ``torch.compile``, SplitQuant's dequantize runs as one
  opaque operator (:func:`dequantize_for_forward`): no graph break, eager speed.

Modes (:func:`set_kernel_mode`, the environment variable ``HF_SPLITQUANT_KERNEL``, or per layer
``PackedLinear.kernel_mode``):

* ``"auto"`` (default): the int4 terms for few tokens whatever the input dtype (float32 inputs are
  cast to bf16 for the kernel and the output back: decoding a float32 model must not pay a
  dequantize per token); for many tokens, bf16/fp16 inputs take dequantize + bf16 matmul and
  float32 inputs the exact reference path (a float32 model keeps float32 numerics where the
  kernel would not save time).
* ``"fast"``: fast paths for every input, float32 ones computed in bfloat16.
* ``"reference"``: always the exact reference path (also used whenever gradients flow).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..methods import dequantize_weight, get_format
from ..quant.int4 import Int4Term
from ..quant.packing import pack_codes, packed_row_bytes, unpack_codes
from ..spec import LayerSpec

__all__ = [
    "KERNEL_MODES",
    "INT4_MAX_TOKENS",
    "set_kernel_mode",
    "kernel_mode",
    "get_kernel_mode",
    "int4_available",
    "int4_reason",
    "Int4Layout",
    "int4_terms",
    "int4_max_tokens",
    "build_int4_layout",
    "stack_int4_layouts",
    "int4_linear",
    "unpack_int4_weight",
    "int4_stored_codes",
    "int4_stored_rows",
    "LAYOUT_BLOCK_ROWS",
    "int4_grid_residual",
    "int4_grid_tensors",
]

KERNEL_MODES = ("auto", "fast", "reference")
#: Above this many tokens per call (divided by the layout's number of terms), dequantize + matmul
#: beats the int4 kernel. Measured on 2 cores: the kernel's cost grows with the tokens (576x1536:
#: 0.04 ms at 1 token, 1.6 ms at 128, 6.6 ms at 512) while dequantizing costs ~1-2 ms once per call.
INT4_MAX_TOKENS = 128
_KERNEL_GROUPS = (256, 128, 64, 32)
_mode = os.environ.get("HF_SPLITQUANT_KERNEL", "auto")


def set_kernel_mode(mode: str) -> None:
    """``"auto"``, ``"fast"`` or ``"reference"`` (see the module docstring)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


def get_kernel_mode() -> str:
    """The process-wide kernel mode (see :func:`kernel_mode` to change it for a block of code)."""
    return _mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Run a block with another kernel mode, e.g. ``with kernel_mode("reference"): model(**batch)``."""
    previous = get_kernel_mode()
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


_INT4_AVAILABLE = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def int4_available() -> bool:
    return _INT4_AVAILABLE


def _kernel_group(spec: LayerSpec) -> int | None:
    if spec.group_size is None:
        return 128  # one scale per row, repeated over kernel groups
    return spec.group_size if spec.group_size in _KERNEL_GROUPS else None


def int4_terms(spec: LayerSpec) -> int:
    """How many int4-kernel calls one forward of this layer takes (see the module docstring)."""
    return get_format(spec).int4_terms(spec)


def int4_reason(spec: LayerSpec, device: torch.device) -> str | None:
    """Why the int4 kernel cannot run this layer, or ``None`` if it can."""
    if device.type != "cpu":
        return f"no int4 kernel for {device.type} here"
    if not int4_available():
        return "this torch has no int4 CPU kernel"
    reason = get_format(spec).int4_unsupported(spec)
    if reason is not None:
        return reason
    if _kernel_group(spec) is None:
        return f"group size {spec.group_size} is not one of the kernel's {_KERNEL_GROUPS}"
    return None


def int4_max_tokens(spec: LayerSpec) -> int:
    """Above this many tokens per call, dequantize + bf16 matmul beats this layer's int4 terms."""
    return max(1, INT4_MAX_TOKENS // int4_terms(spec))


@dataclass
class Int4Layout:
    """A packed layer converted once into the int4 kernel's layout.

    Its ``terms`` are stacked along the output rows (row ``t * out_features + r`` is row ``r`` of
    term ``t``), so one kernel call computes all of them and their outputs are summed after.
    """

    weight: torch.Tensor  # kernel-packed uint8
    scales_and_zeros: torch.Tensor  # [K_pad / group, rows_pad, 2] bfloat16
    terms: int
    group: int
    in_columns: int  # K: columns of the (OCS-expanded) weight
    padded_columns: int
    out_features: int
    padded_rows: int  # of all the stacked terms
    input_index: torch.Tensor | None
    #: the layer's grid tensors beyond the kernel's scales, compact (set where the layer dropped them)
    residual: torch.Tensor | None = None

    def __post_init__(self) -> None:
        #: one term, no gathered inputs, no padding: the kernel's output is the layer's (the common case,
        #: decided once so a decoding step does not re-check it per call)
        self.plain = (self.terms == 1 and self.input_index is None and self.padded_columns == self.in_columns
                      and self.padded_rows == self.out_features and self.weight.is_contiguous()
                      and self.scales_and_zeros.is_contiguous())

    def nbytes(self) -> int:
        extra = self.residual.numel() * self.residual.element_size() if self.residual is not None else 0
        return self.weight.numel() * self.weight.element_size() + self.scales_and_zeros.numel() * 2 + extra


def _pack_terms(parts: list[Int4Term], group: int, rows: int,
                cols: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the terms' ``(codes, step, zero)`` along the rows and convert them in one layout.

    Element ``(r, c)`` of a term is ``(codes - 8) * step + zero``, codes in 0..15, ``step`` and ``zero``
    constant over each kernel group (they are read from its first column).
    """
    total = rows * len(parts)
    padded_cols = math.ceil(cols / group) * group
    padded_rows = math.ceil(total / 16) * 16
    q = torch.full((padded_rows, padded_cols), 8, dtype=torch.int32)
    s = torch.zeros(padded_rows, padded_cols)
    z = torch.zeros(padded_rows, padded_cols)
    for t, (codes, step, zero) in enumerate(parts):
        block = slice(t * rows, (t + 1) * rows)
        q[block, :cols], s[block, :cols], z[block, :cols] = codes.to(torch.int32), step, zero
    sz = torch.stack([s[:, ::group], z[:, ::group]], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, padded_rows


#: rows converted at a time when a large one-term layer (an embedding table used as the output head) is
#: converted into the kernel layout: the float and int32 temporaries stay at this many rows
LAYOUT_BLOCK_ROWS = 4096


def _row_slice(tensors: dict[str, torch.Tensor], rows: int, start: int, n: int) -> dict[str, torch.Tensor]:
    """Rows ``start .. start + n`` of stored tensors whose first dimension is proportional to the rows."""
    out = {}
    for name, t in tensors.items():
        per_row = t.shape[0] // rows
        out[name] = t[start * per_row:(start + n) * per_row]
    return out


def _build_in_row_blocks(spec: LayerSpec, tensors: dict[str, torch.Tensor], group: int) -> Int4Layout | None:
    """:func:`build_int4_layout` of a one-term layer whose rows are independent, converted
    ``LAYOUT_BLOCK_ROWS`` rows at a time (blocks of the kernel's row blocks, so the packed blocks follow
    each other as in one conversion)."""
    fmt = get_format(spec)
    rows, stored_cols = spec.out_features, fmt.columns(spec)
    weights, sz_parts, cols = [], [], None
    for start in range(0, rows, LAYOUT_BLOCK_ROWS):
        n = min(LAYOUT_BLOCK_ROWS, rows - start)
        sub = _row_slice(tensors, rows, start, n)
        sub_spec = replace(spec, out_features=n)
        codes = unpack_codes(sub["weight"].reshape(n, packed_row_bytes(stored_cols, spec.bits)), spec.bits, stored_cols)
        parts = fmt.int4_parts(sub, sub_spec, codes, group)
        if parts is None or len(parts) != 1:
            return None
        cols = parts[0][0].shape[1]
        weight, sz, _ = _pack_terms(parts, group, n, cols)
        weights.append(weight)
        sz_parts.append(sz)
        del parts, codes
    padded_rows = math.ceil(rows / 16) * 16
    return Int4Layout(torch.cat(weights), torch.cat(sz_parts, dim=1), 1, group, cols, math.ceil(cols / group) * group,
                      rows, padded_rows, fmt.input_index(tensors, spec))


def build_int4_layout(spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> Int4Layout | None:
    """Convert stored codes and grid parameters into int4-kernel terms (exact up to bf16 grids), or
    ``None`` when the format cannot write these tensors as terms."""
    fmt = get_format(spec)
    group = _kernel_group(spec)
    block = _pack_block()
    if (fmt.rows_independent and fmt.int4_terms(spec) == 1 and spec.out_features > LAYOUT_BLOCK_ROWS
            and block is not None and LAYOUT_BLOCK_ROWS % block == 0):
        return _build_in_row_blocks(spec, tensors, group)
    stored_cols = fmt.columns(spec)
    rows = spec.out_features
    codes = unpack_codes(tensors["weight"].reshape(rows, packed_row_bytes(stored_cols, spec.bits)), spec.bits,
                         stored_cols)
    parts = fmt.int4_parts(tensors, spec, codes, group)
    if parts is None:
        return None
    cols = parts[0][0].shape[1]  # the columns the terms multiply (OCS may fold its copies back)
    weight, scales_and_zeros, padded_rows = _pack_terms(parts, group, rows, cols)
    return Int4Layout(weight, scales_and_zeros, len(parts), group, cols, math.ceil(cols / group) * group, rows,
                      padded_rows, fmt.input_index(tensors, spec))


def stack_int4_layouts(layouts: list[Int4Layout]) -> tuple[Int4Layout, list[Int4Layout]] | None:
    """One layout for plain layouts that multiply the same input, their rows stacked in order, and each of them
    again as views into it (the weights are not held twice). The kernel computes every output row on its own,
    so the stacked call's outputs are the members' outputs, bit for bit, for one kernel call instead of
    several. ``None`` when they cannot be stacked: a layout that is not plain, other kernel groups or columns,
    rows that are not whole blocks of the CPU packing, an unknown packing, or different devices."""
    block = _pack_block()
    first = layouts[0] if layouts else None
    if block is None or len(layouts) < 2 or any(
            not lay.plain or lay.group != first.group or lay.in_columns != first.in_columns
            or lay.out_features % block or lay.weight.shape[0] != lay.out_features
            or lay.weight.device != first.weight.device for lay in layouts):
        return None
    weight = torch.cat([lay.weight for lay in layouts])
    scales = torch.cat([lay.scales_and_zeros for lay in layouts], dim=1)
    rows = weight.shape[0]
    stacked = Int4Layout(weight, scales, 1, first.group, first.in_columns, first.padded_columns, rows, rows, None)
    members, start = [], 0
    for lay in layouts:
        end = start + lay.out_features
        members.append(replace(lay, weight=weight[start:end], scales_and_zeros=scales[:, start:end]))
        start = end
    return stacked, members


#: rows per block of torch's CPU int4 packing (``_convert_weight_to_int4pack_for_cpu``): 32 with AVX2 kernels,
#: 64 with AVX-512 ones; found once per process by packing a probe (``None``: unknown layout)
_PACK_BLOCK: int | None | bool = False


def _unpack_blocks(packed: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Codes ``[rows, cols]`` of a CPU int4pack weight laid out as ``[rows / block][cols][block / 2]`` bytes,
    byte ``j`` of a block holding rows ``j`` (low nibble) and ``j + block / 2`` (high nibble); a last
    partial block holds rows ``2j`` and ``2j + 1`` per byte."""
    flat = packed.reshape(-1)
    out = torch.empty(rows, cols, dtype=torch.uint8)
    full = rows // block
    if full:
        b = flat[: full * cols * block // 2].reshape(full, cols, block // 2)
        out[: full * block] = torch.cat([b & 15, b >> 4], dim=-1).permute(0, 2, 1).reshape(full * block, cols)
    tail = rows - full * block
    if tail:
        b = flat[full * cols * block // 2:].reshape(cols, tail // 2)
        out[full * block:] = torch.stack([b & 15, b >> 4], dim=-1).reshape(cols, tail).t()
    return out


def _pack_block() -> int | None:
    global _PACK_BLOCK
    if _PACK_BLOCK is False:
        _PACK_BLOCK = None
        if int4_available():
            probe = torch.randint(0, 16, (144, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
            for block in (32, 64):
                if packed.numel() * 2 == probe.numel() and torch.equal(
                        _unpack_blocks(packed, 144, 64, block).to(torch.int32), probe):
                    _PACK_BLOCK = block
                    break
    return _PACK_BLOCK


def unpack_int4_weight(layout: Int4Layout) -> torch.Tensor | None:
    """The kernel codes (0..15, ``[padded_rows, padded_columns]`` uint8) of ``layout``, or ``None`` when this
    torch packs them in a way this function does not know."""
    block = _pack_block()
    if block is None or layout.weight.numel() * 2 != layout.padded_rows * layout.padded_columns:
        return None
    return _unpack_blocks(layout.weight, layout.padded_rows, layout.padded_columns, block)


def int4_stored_codes(spec: LayerSpec, layout: Int4Layout, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The stored ``weight`` tensor (packed codes) read back from the kernel layout and the layer's other
    stored tensors (``tensors``), or ``None`` where the format or this torch cannot do it."""
    fmt = get_format(spec)
    rows = layout.out_features
    if fmt.rows_independent and rows > LAYOUT_BLOCK_ROWS and _pack_block() is not None:
        # a large table (an embedding) in blocks of rows: the integer temporaries stay at one block
        per_row = packed_row_bytes(fmt.columns(spec), spec.bits)
        out = torch.empty(rows * per_row, dtype=torch.uint8)
        others = {k: v for k, v in tensors.items() if k != "weight" and v is not None}
        for start in range(0, rows, LAYOUT_BLOCK_ROWS):
            n = min(LAYOUT_BLOCK_ROWS, rows - start)
            codes = _stored_rows(spec, layout, _row_slice(others, rows, start, n), torch.arange(start, start + n))
            if codes is None:
                return None
            out[start * per_row:(start + n) * per_row] = codes
        return out
    terms = _layout_terms(layout)
    if terms is None:
        return None
    codes = get_format(spec).int4_codes(terms, tensors, spec, layout.group)
    if codes is None:
        return None
    return pack_codes(codes, spec.bits).reshape(-1)


def _unpack_rows(layout: Int4Layout, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Kernel codes of the layout rows ``rows`` (``[n, padded_columns]`` uint8), gathered without unpacking the
    others (the layout of :func:`_unpack_blocks`)."""
    cols, total = layout.padded_columns, layout.padded_rows
    half, full = block // 2, (total // block) * block
    k = torch.arange(cols).unsqueeze(0)
    r = rows.unsqueeze(1)
    in_block = r < full
    tail = max(total - full, 2)
    byte = torch.where(in_block, (r // block) * cols * half + k * half + (r % block) % half,
                       (full // block) * cols * half + k * (tail // 2) + (r - full).clamp(min=0) // 2)
    high = torch.where(in_block, (r % block) >= half, (r - full).clamp(min=0) % 2 == 1)
    b = layout.weight.reshape(-1)[byte]
    return torch.where(high, b >> 4, b & 15)


def int4_stored_rows(spec: LayerSpec, layout: Int4Layout, tensors: dict[str, torch.Tensor],
                     rows: torch.Tensor) -> torch.Tensor:
    """The stored codes of rows ``rows`` (packed, flat), read back from the int4 layout of a one- or
    two-term layer whose codes were dropped; ``tensors`` are the layer's other stored tensors already
    restricted to those rows (an embedding lookup reads only the rows it needs)."""
    codes = _stored_rows(spec, layout, tensors, rows)
    if codes is None:
        raise RuntimeError("hf_splitquant: the int4 layout does not give these rows' codes back (they should not "
                           "have been dropped); please report this bug")
    return codes


def _layout_terms(layout: Int4Layout, rows: torch.Tensor | None = None) -> list[Int4Term] | None:
    """The layout's terms as ``(codes [n, in_columns], step [n, groups], zero [n, groups])`` for all its rows
    or ``rows``; ``None`` when this torch packs the codes in a way :func:`_unpack_blocks` does not know."""
    cols, sz = layout.in_columns, layout.scales_and_zeros.float()
    if rows is None:
        q, n = unpack_int4_weight(layout), layout.out_features
        if q is None:
            return None
        return [(q[t * n:(t + 1) * n, :cols], sz[:, t * n:(t + 1) * n, 0].t(), sz[:, t * n:(t + 1) * n, 1].t())
                for t in range(layout.terms)]
    block = _pack_block()
    if block is None:
        return None
    terms = []
    for t in range(layout.terms):
        picked = rows + t * layout.out_features
        terms.append((_unpack_rows(layout, picked, block)[:, :cols], sz[:, picked, 0].t(), sz[:, picked, 1].t()))
    return terms


def _stored_rows(spec: LayerSpec, layout: Int4Layout, tensors: dict[str, torch.Tensor],
                 rows: torch.Tensor) -> torch.Tensor | None:
    terms = _layout_terms(layout, rows)
    if terms is None:
        return None
    codes = get_format(spec).int4_codes(terms, tensors, replace(spec, out_features=max(rows.numel(), 1)),
                                        layout.group)
    return None if codes is None else pack_codes(codes, spec.bits).reshape(-1)


def int4_grid_residual(spec: LayerSpec, layout: Int4Layout, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The compact remainder of the layer's grid tensors beyond the layout's bf16 scales, or ``None``."""
    if layout.terms != 1:
        return None
    kernel_scale = layout.scales_and_zeros[:, : layout.out_features, 0].t()
    return get_format(spec).int4_grid_residual(tensors, spec, kernel_scale)


def int4_grid_tensors(spec: LayerSpec, layout: Int4Layout, residual: torch.Tensor,
                      rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The grid tensors (all rows, or ``rows``) from the layout's scales and the compact ``residual``."""
    sz = layout.scales_and_zeros
    fmt = get_format(spec)

    def offsets(scale: torch.Tensor) -> torch.Tensor | None:  # what the kernel multiplies by the step, per weight
        terms = _layout_terms(layout, rows)
        return None if terms is None else fmt.int4_offsets(terms, scale, spec, layout.group)

    if rows is None:
        return fmt.int4_grid(residual, spec, sz[:, : layout.out_features, 0].t(), offsets)
    return fmt.int4_grid(residual.index_select(0, rows), spec, sz[:, rows, 0].t(), offsets)


def int4_linear(x: torch.Tensor, layout: Int4Layout, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` on the int4 kernel (bf16 compute), returned in ``x``'s dtype."""
    if layout.plain and bias is None and x.dtype == torch.bfloat16 and x.is_contiguous():
        # bf16 decoding: the kernel call and two views, nothing else
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(-1, layout.in_columns), layout.weight, layout.group,
                                                       layout.scales_and_zeros)
        return y.view(*x.shape[:-1], layout.out_features)
    h = x.reshape(-1, x.shape[-1])
    if h.dtype != torch.bfloat16:
        h = h.to(torch.bfloat16)
    if layout.input_index is not None:
        h = torch.cat([h, h.index_select(-1, layout.input_index)], dim=-1)
    if layout.padded_columns != layout.in_columns:
        h = F.pad(h, (0, layout.padded_columns - layout.in_columns))
    elif not h.is_contiguous():
        h = h.contiguous()
    weight, scales = layout.weight, layout.scales_and_zeros
    if not (weight.is_contiguous() and scales.is_contiguous()):
        # a member of a stacked layout (stack_int4_layouts) called on its own: the kernel reads its tensors as
        # contiguous (a strided view gives wrong numbers, silently)
        weight, scales = weight.contiguous(), scales.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(h, weight, layout.group, scales)
    rows = layout.out_features
    if layout.terms > 1:
        y = y[:, : layout.terms * rows].unflatten(1, (layout.terms, rows)).sum(1, dtype=torch.float32)
    elif layout.padded_rows != rows:
        y = y[:, :rows]
    if bias is not None:
        y = y + bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], layout.out_features)


@functools.cache
def _layer_of(key: str) -> tuple[LayerSpec, tuple[str, ...]]:
    data = json.loads(key)
    return LayerSpec.from_dict(data["spec"]), tuple(data["names"])


@torch.library.custom_op("hf_splitquant::dequantize", mutates_args=(),
                         schema="(Tensor[] tensors, str layer, ScalarType dtype) -> Tensor")
def _dequantize_op(tensors: list[torch.Tensor], layer: str, dtype: torch.dtype) -> torch.Tensor:
    spec, names = _layer_of(layer)
    return dequantize_weight(dict(zip(names, tensors)), spec, dtype, stored_basis=True)


@_dequantize_op.register_fake
def _(tensors: list[torch.Tensor], layer: str, dtype: torch.dtype) -> torch.Tensor:
    spec, _ = _layer_of(layer)
    return tensors[0].new_empty((spec.out_features, spec.in_features), dtype=dtype)


def dequantize_key(spec: LayerSpec) -> tuple[str, tuple[str, ...]] | None:
    """What :func:`dequantize_for_forward` needs to run this layer's dequantize as one opaque operator inside
    ``torch.compile`` (the layer as text, and its stored tensors' names; computed once per layer, outside the
    traced code), or ``None`` where the compiled code is good
    (:attr:`~hf_splitquant.methods.base.QuantFormat.dequantize_compiles_well`)."""
    fmt = get_format(spec)
    if fmt.dequantize_compiles_well:
        return None
    names = tuple(sorted(fmt.tensor_shapes(spec)))
    return json.dumps({"spec": spec.to_dict(), "names": list(names)}, sort_keys=True), names


def dequantize_for_forward(tensors: dict[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype,
                           key: tuple[str, tuple[str, ...]] | None = None) -> torch.Tensor:
    """The weight a forward pass multiplies (stored basis), as :func:`hf_splitquant.methods.dequantize_weight`.

    Inside ``torch.compile``, with ``key`` from :func:`dequantize_key`, the eager dequantize runs as one opaque
    operator: no graph break (a per-call value check would break the graph), and faster than the compiled code
    for table gathers (which the CPU code generator leaves unvectorised).
    """
    if key is not None and torch.compiler.is_compiling():
        layer, names = key
        return _dequantize_op([tensors[n] for n in names], layer, dtype)
    return dequantize_weight(tensors, spec, dtype, stored_basis=True)


def tokens_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def wants_fast_path(mode: str, x: torch.Tensor) -> bool:
    """Whether ``mode`` sends this input to the fast paths."""
    if mode == "reference" or torch.is_grad_enabled() and x.requires_grad:
        return False
    return mode == "fast" or x.dtype in (torch.bfloat16, torch.float16)


__all__ += ["tokens_of", "wants_fast_path", "dequantize_for_forward", "dequantize_key"]
