"""Pure math of the CPU int4 kernel's *terms* (no kernel call here; see :mod:`hf_splitquant.kernels`).

torch's int4 kernel computes ``x @ ((q - 8) * step + zero)^T`` for codes ``q`` in 0..15 with one
(step, zero) per row and kernel group. A packed layer is written as one or more such terms whose
outputs add up to the layer's output exactly (given bf16 grid parameters). Formats build their terms
from the helpers here (:meth:`hf_splitquant.methods.base.QuantFormat.int4_parts`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Int4Term", "group_offsets", "affine_terms", "affine_offsets", "affine_codes", "compact_grid",
           "grid_from_compact", "compact_scales", "scales_from_compact", "zero_points_from_offsets"]

#: (codes 0..15 ``[out, cols]``, step ``[out, cols]``, zero ``[out, cols]``); step and zero are
#: constant over each kernel group (the kernel reads them from the group's first column)
Int4Term = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def group_offsets(d: torch.Tensor, group: int, low: int, high: int) -> torch.Tensor:
    """Per kernel group, the integer ``e`` closest to 0 with ``low <= d - e <= high`` for all its
    elements (feasible: a group's ``d`` spans at most ``high - low``), repeated over its columns."""
    rows, cols = d.shape
    pad = math.ceil(cols / group) * group - cols
    dg = F.pad(d, (0, pad), value=0.0).reshape(rows, -1, group)
    e = torch.clamp(dg.amax(-1) - high, min=0) + torch.clamp(dg.amin(-1) - low, max=0)
    return e.repeat_interleave(group, dim=1)[:, :cols]


def affine_terms(codes: torch.Tensor, scale: torch.Tensor, origin: torch.Tensor, bits: int,
                 group: int) -> list[Int4Term]:
    """The terms of ``w = (q - origin) * scale`` (integer ``origin``, per element).

    With ``d = q - origin`` and a per-group integer ``e`` (0 whenever the group allows, which is
    always the case up to 3 bits and for centred grids), the kernel's zero (code 8) is ours and the
    only float offset is ``e * scale``: no bf16 cancellation between codes and offsets. 2-4 bits take
    one term; 5-8 bits two (the high and low nibble of ``d - e``, steps ``16 * scale`` and ``scale``).
    With two terms the offset rides on the high one, so each term's output stays about the size of the
    layer's (an offset on the low term would make both large and opposite, and their bf16 outputs then
    lose the result to cancellation: seen as 2.9% of the output's range on a lopsided 8-bit group).
    """
    d = codes.float() - origin  # integer, |d| <= 2^bits - 1
    if bits <= 4:
        e = group_offsets(d, group, -8, 7)
        return [((d - e + 8).to(torch.uint8), scale, e * scale)]
    # 5..8 bits: d - e = 16 (hi - 8) + (lo - 8) with t = d - e + 136 in 0..255
    e = group_offsets(d, group, -136, 119)
    t = (d - e + 136).to(torch.int32)
    return [(t // 16, 16 * scale, e * scale), (t % 16, scale, torch.zeros_like(scale))]


def affine_offsets(terms: list[Int4Term], group: int, bits: int,
                   scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``d = q - origin`` (``[out, cols]``, int32) from the kernel's terms of :func:`affine_terms`, where each
    term's step and zero are given per kernel group (``[out, groups]``): what the kernel multiplies by the
    grid step, whatever the origin.

    The per-group offset ``e`` is read back from the first term as ``zero / scale`` with the exact grid
    ``scale`` per kernel group (default: the last term's bf16 step), an integer: exact whenever ``|e|`` times
    the relative rounding (``2^-9`` with the exact scale, ``2^-8`` with the step) is below 0.5. ``None`` when
    the terms are not of :func:`affine_terms`' form.
    """
    if len(terms) not in (1, 2) or (len(terms) == 2) != (bits > 4):
        return None
    step, zero = terms[-1][1], terms[0][2]  # the low step is the grid's; the offset rides on the first term
    e = torch.round(zero.float() / (step if scale is None else scale).float())
    # the checks read values back to Python (graph breaks under torch.compile); compiled code only reads back
    # layouts that passed them when they were built
    if not torch.compiler.is_compiling() and not torch.isfinite(e).all():
        return None
    if len(terms) == 1:
        d = terms[0][0].to(torch.int32) - 8
    else:
        d = terms[0][0].to(torch.int32) * 16 + terms[1][0].to(torch.int32) - 136
    cols = d.shape[1]
    return d + e.to(torch.int32).repeat_interleave(group, dim=1)[:, :cols]


def affine_codes(terms: list[Int4Term], origin: torch.Tensor, group: int, bits: int,
                 scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Inverse of :func:`affine_terms`: the integer codes ``q`` (``[out, cols]``, int32) from the kernel's
    terms (:func:`affine_offsets`, plus ``origin``). ``None`` when the terms are not of :func:`affine_terms`'
    form or give codes outside ``[0, 2^bits)``; callers compare the result with the stored codes before
    relying on it.
    """
    d = affine_offsets(terms, group, bits, scale)
    if d is None:
        return None
    codes = d + origin.round().to(torch.int32)
    if not torch.compiler.is_compiling() and codes.numel() and (
            int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        return None
    return codes


def compact_grid(scale: torch.Tensor, zero: torch.Tensor | None, kernel_scale: torch.Tensor) -> torch.Tensor | None:
    """One byte per group that, with the kernel's bf16 scales, gives back fp16 scales and zero points
    below 16 exactly: the zero point in the low nibble, the fp16 scale's distance (in fp16 steps, -8..7) from
    the kernel scale rounded to fp16 in the high nibble. ``None`` where that does not fit (the caller keeps
    the stored tensors); see :func:`grid_from_compact`."""
    if scale.dtype != torch.float16 or (zero is not None and (zero.numel() and int(zero.max()) > 15)):
        return None
    near = kernel_scale.to(torch.float16)
    if not torch.isfinite(near).all():
        return None
    offset = scale.view(torch.int16).to(torch.int32) - near.view(torch.int16).to(torch.int32)
    if offset.numel() and (int(offset.min()) < -8 or int(offset.max()) > 7):
        return None
    low = zero.to(torch.int32) if zero is not None else torch.zeros_like(offset)
    return (low | ((offset + 8) << 4)).to(torch.uint8)


def grid_from_compact(compact: torch.Tensor, kernel_scale: torch.Tensor,
                      has_zero: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`compact_grid`: ``(fp16 scales, uint8 zero points or None)``."""
    c = compact.to(torch.int32)
    near = kernel_scale.to(torch.float16).view(torch.int16).to(torch.int32)
    scale = (near + (c >> 4) - 8).to(torch.int16).view(torch.float16)
    return scale, ((c & 15).to(torch.uint8) if has_zero else None)


def compact_scales(scale: torch.Tensor, kernel_scale: torch.Tensor) -> torch.Tensor | None:
    """Half a byte per group: the fp16 scale's distance (in fp16 steps, -8..7) from the kernel's bf16 scale
    rounded to fp16, two groups per byte (``[out, ceil(groups / 2)]`` uint8; the even group in the low nibble).
    For grids whose zero points the codes give back (:func:`zero_points_from_offsets`) or that have none.
    ``None`` where that does not fit; see :func:`scales_from_compact`."""
    byte = compact_grid(scale, None, kernel_scale)
    if byte is None:
        return None
    nibble = byte >> 4
    if nibble.shape[1] % 2:
        nibble = torch.cat([nibble, torch.zeros_like(nibble[:, :1])], dim=1)
    return nibble[:, 0::2] | (nibble[:, 1::2] << 4)


def scales_from_compact(compact: torch.Tensor, kernel_scale: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`compact_scales`: the fp16 scales ``[out, groups]``."""
    nibble = torch.stack([compact & 15, compact >> 4], dim=-1).reshape(compact.shape[0], -1)[:, :groups]
    return grid_from_compact(nibble << 4, kernel_scale[:, :groups], False)[0]


def zero_points_from_offsets(d: torch.Tensor, group: int) -> torch.Tensor:
    """The zero points ``[out, groups]`` (uint8) of a grid whose every group holds the code 0, from the
    offsets ``d = q - zero_point`` (``[out, cols]``): ``-min(d)`` per group of ``group`` columns. (Min-max and
    clipped round to nearest always use code 0: the group's smallest weight, or a clipped one, rounds there.)"""
    rows, cols = d.shape
    pad = math.ceil(cols / group) * group - cols
    # padded columns must not lower the minimum: pad with the largest int32
    dg = F.pad(d, (0, pad), value=torch.iinfo(torch.int32).max).reshape(rows, -1, group)
    return (-dg.amin(-1)).to(torch.uint8)
