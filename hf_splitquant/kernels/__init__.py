"""Matmul paths for packed layers, chosen per call by device, dtype, bit width and shape.

* ``"reference"``: dequantize the packed weight to the input's dtype and call ``F.linear``. Exact
  with respect to the stored format; the fallback for everything.
* ``"int4"`` (CPU): torch's int4 kernel ``aten._weight_int4pack_mm_for_cpu``. Any RTN or OCS layer
  of 2, 3 or 4 bits fits its grid exactly (codes ``0..2^b-1`` are int4 codes, our integer zero
  point becomes the kernel's float zero ``(8 - zero) * scale``), so int2 and int3 stay compact on
  disk and run on the int4 kernel. The converted layout is built once per layer and cached (it
  is not part of the state dict). It computes in bfloat16 (activations, scales and output), which
  is its documented rounding; fp32 inputs are cast.
* For many tokens per call (``tokens > INT4_MAX_TOKENS``) the int4 kernel is slower than a bf16
  matmul, so ``"auto"`` dequantizes once per call to bf16 and uses the bf16 matmul.

Modes (:func:`set_kernel_mode`, the environment variable ``HF_SPLITQUANT_KERNEL``, or per layer
``PackedLinear.kernel_mode``):

* ``"auto"`` (default): fast paths for bfloat16 / float16 inputs (a model loaded with
  ``dtype=torch.bfloat16``); float32 inputs take the exact reference path.
* ``"fast"``: fast paths for every input, float32 ones computed in bfloat16.
* ``"reference"``: always the reference path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.grid import expand_params
from ..quant.packing import packed_row_bytes, unpack_codes
from ..spec import LayerSpec

__all__ = [
    "KERNEL_MODES",
    "INT4_MAX_TOKENS",
    "set_kernel_mode",
    "get_kernel_mode",
    "int4_available",
    "int4_reason",
    "Int4Layout",
    "build_int4_layout",
    "int4_linear",
]

KERNEL_MODES = ("auto", "fast", "reference")
#: Above this many tokens per call, "auto" uses dequantize + bf16 matmul instead of the int4 kernel.
INT4_MAX_TOKENS = 16
_KERNEL_GROUPS = (256, 128, 64, 32)
_mode = os.environ.get("HF_SPLITQUANT_KERNEL", "auto")


def set_kernel_mode(mode: str) -> None:
    """``"auto"``, ``"fast"`` or ``"reference"`` (see the module docstring)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


def get_kernel_mode() -> str:
    return _mode


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def _kernel_group(spec: LayerSpec) -> int | None:
    if spec.group_size is None:
        return 128  # one scale per row, repeated over kernel groups
    return spec.group_size if spec.group_size in _KERNEL_GROUPS else None


def int4_reason(spec: LayerSpec, device: torch.device) -> str | None:
    """Why the int4 kernel cannot run this layer, or ``None`` if it can."""
    if device.type != "cpu":
        return f"no int4 kernel for {device.type} here"
    if not int4_available():
        return "this torch has no int4 CPU kernel"
    if spec.transform not in ("rtn", "ocs"):
        return f"{spec.transform} uses one grid per cluster, not a single affine grid"
    if spec.bits > 4:
        return f"{spec.bits}-bit codes do not fit int4"
    if _kernel_group(spec) is None:
        return f"group size {spec.group_size} is not one of the kernel's {_KERNEL_GROUPS}"
    return None


@dataclass
class Int4Layout:
    """A packed layer converted once into the int4 kernel's layout."""

    weight: torch.Tensor  # kernel-packed uint8
    scales_and_zeros: torch.Tensor  # [K_pad / group, N_pad, 2] bfloat16
    group: int
    in_columns: int  # K: columns of the (OCS-expanded) weight
    padded_columns: int
    out_features: int
    padded_rows: int
    input_index: torch.Tensor | None


def build_int4_layout(spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> Int4Layout:
    """Convert stored codes and grid parameters into the int4 kernel's layout (exact)."""
    group = _kernel_group(spec)
    cols = spec.in_features + spec.num_duplicated
    rows = spec.out_features
    codes = unpack_codes(tensors["weight"].reshape(rows, packed_row_bytes(cols, spec.bits)), spec.bits, cols)
    scale = expand_params(tensors["weight_scale"].float(), cols, spec.group_size)
    zero = tensors.get("weight_zero")
    origin = expand_params(zero.float(), cols, spec.group_size) if zero is not None else torch.full_like(
        scale, float(2 ** (spec.bits - 1)))
    if spec.bits <= 3 or zero is None:
        # Shift the codes so the kernel's own zero (code 8) is ours: q - zero + 8 stays in 0..15 and
        # the float offset is exactly 0 (no bf16 cancellation between (q - 8) * s and the offset).
        codes = (codes.float() - origin + 8).to(torch.uint8)
        offset = torch.zeros_like(scale)
    else:
        offset = (8.0 - origin) * scale  # kernel: w = (q - 8) * s + offset  ==  (q - zero) * s
    padded_cols = math.ceil(cols / group) * group
    padded_rows = math.ceil(rows / 16) * 16
    q = torch.full((padded_rows, padded_cols), 8, dtype=torch.int32)
    q[:rows, :cols] = codes.to(torch.int32)
    # Each kernel group takes its parameters from its first column (groups never straddle ours).
    s = torch.zeros(padded_rows, padded_cols)
    o = torch.zeros(padded_rows, padded_cols)
    s[:rows, :cols], o[:rows, :cols] = scale, offset
    sz = torch.stack([s[:, ::group], o[:, ::group]], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    index = tensors.get("weight_dup_index")
    return Int4Layout(packed, sz, group, cols, padded_cols, rows, padded_rows,
                      index.long() if index is not None and index.numel() else None)


def int4_linear(x: torch.Tensor, layout: Int4Layout, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` on the int4 kernel (bf16 compute), returned in ``x``'s dtype."""
    shape = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if layout.input_index is not None:
        h = torch.cat([h, h.index_select(-1, layout.input_index)], dim=-1)
    if layout.padded_columns != layout.in_columns:
        h = F.pad(h, (0, layout.padded_columns - layout.in_columns))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(h.contiguous(), layout.weight, layout.group,
                                                   layout.scales_and_zeros)
    y = y[:, : layout.out_features].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape, layout.out_features)


def tokens_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def wants_fast_path(mode: str, x: torch.Tensor) -> bool:
    """Whether ``mode`` sends this input to the fast paths."""
    if mode == "reference" or torch.is_grad_enabled() and x.requires_grad:
        return False
    return mode == "fast" or x.dtype in (torch.bfloat16, torch.float16)


__all__ += ["tokens_of", "wants_fast_path"]
