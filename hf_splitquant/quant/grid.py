"""Affine integer grids for weight matrices: per output channel or per group of inputs.

Conventions (the storage format depends on them, see ``docs/format.md``):

* A weight matrix is ``[out_features, in_features]``. Groups run along the input dimension:
  ``group_size=None`` means one group per output row (per-channel). When ``in_features`` is not a
  multiple of ``group_size`` the last group of each row is shorter.
* Codes are unsigned integers in ``[0, 2**bits - 1]``.
* Asymmetric: ``w ~ (code - zero) * scale`` with an integer ``zero`` in ``[0, 2**bits - 1]``, so
  0.0 is always exactly representable. The range of each group is widened to contain 0.
* Symmetric: ``w ~ (code - 2**(bits-1)) * scale`` with ``scale = absmax / (2**(bits-1) - 1)``; no
  zero point is stored.
* Min-offset (``compute_offset_qparams``): ``w ~ code * scale + minimum`` with a float ``minimum``;
  the grid spans exactly the members' range and need not contain 0 (SplitQuant's per-cluster grids).
* Scales are rounded *up* to the storage dtype, so that every weight inside its group's range stays
  within ``scale / 2`` of a grid level after rounding (the property the tests check).

Everything here is pure torch, without transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "num_groups",
    "compute_qparams",
    "compute_offset_qparams",
    "compute_aligned_qparams",
    "search_clip_qparams",
    "quantize_codes",
    "dequantize_codes",
    "group_view",
    "expand_params",
    "ElementGrid",
    "group_range",
    "qparams_from_range",
]


@dataclass
class ElementGrid:
    """The grid every element of a (possibly transformed) weight is rounded on: element ``(r, c)``
    may take the values ``offset[r, c] + k * scale[r, c]`` for ``k = 0 .. max_code``.

    This is what a rounding optimiser (Attention Round) needs: it chooses the integer codes, and
    the method's ``pack(grid, codes, spec)`` stores them with the grid's parameters (``state``).

    Attributes:
        weight: ``[out, cols]`` float weight the codes approximate (OCS: the expanded weight).
        scale / offset: ``[out, cols]`` float32 step and value of code 0 per element.
        max_code: ``2**bits - 1``.
        input_index: OCS only: the input features appended to ``x`` (``[x, x[..., index]]``) so that
            ``x' @ weight.T`` equals the layer's output; ``None`` otherwise.
        state: the method's stored grid tensors (scales, zero points, cluster ids, ...).
        input_rotation: the Hadamard block when ``weight`` is ``W R`` (a rotated layer,
            :mod:`hf_splitquant.quant.rotation`); ``None`` otherwise.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    max_code: int
    input_index: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    input_rotation: int | None = None

    def nearest_codes(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Round-to-nearest codes of ``values`` (default: the weight) on this grid, as uint8."""
        v = self.weight if values is None else values
        return torch.round((v.float() - self.offset) / self.scale).clamp_(0, self.max_code).to(torch.uint8)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The float values of integer (or soft, fractional) codes."""
        return self.offset + codes.float() * self.scale


def num_groups(in_features: int, group_size: int | None) -> int:
    """Number of groups per row: 1 for per-channel, else ``ceil(in_features / group_size)``."""
    if group_size is None or group_size >= in_features:
        return 1
    return math.ceil(in_features / group_size)


def _effective_group(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size >= in_features:
        return in_features
    return group_size


def group_view(t: torch.Tensor, group_size: int | None, fill: float | bool = 0) -> torch.Tensor:
    """Reshape ``[out, in]`` to ``[out, groups, group]``, padding the ragged last group with ``fill``."""
    out_f, in_f = t.shape
    g = _effective_group(in_f, group_size)
    n = num_groups(in_f, group_size)
    pad = n * g - in_f
    if pad:
        t = torch.cat([t, t.new_full((out_f, pad), fill)], dim=1)
    return t.reshape(out_f, n, g)


def _round_up_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast positive float32 scales to ``dtype``, moving up one ulp where the cast rounded down."""
    stored = scale.to(dtype)
    low = stored.float() < scale
    if low.any():
        bumped = torch.nextafter(stored, torch.full_like(stored, math.inf))
        stored = torch.where(low, bumped, stored)
    return stored


def compute_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of every group of ``weight``.

    Args:
        weight: ``[out, in]`` float tensor.
        bits: code width, 2..8.
        group_size: inputs per group, or ``None`` for per-channel.
        symmetric: symmetric grid (no zero point) instead of asymmetric min-max.
        scale_dtype: storage dtype of the scales.
        mask: optional boolean ``[out, in]``; only ``True`` entries define the range (used by
            SplitQuant, where each cluster gets its own grid). A group without members gets
            scale 1 and zero 0.

    Returns:
        ``(scale [out, groups] in scale_dtype, zero [out, groups] uint8 or None)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot compute quantization scales")
    lo, hi, present = _masked_range(w, group_size, mask)
    return _qparams_from_range(lo, hi, present, bits, symmetric, scale_dtype)


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, present: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    levels = 2**bits - 1
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = absmax / (2 ** (bits - 1) - 1)
    else:
        # Widen to contain 0 so that the integer zero point lies on the grid.
        lo = lo.clamp(max=0.0)
        hi = hi.clamp(min=0.0)
        scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = _round_up_to_dtype(scale, scale_dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"a quantization scale overflows {scale_dtype} (weights larger than the scale dtype can hold); "
            "use scale_dtype='float32'"
        )
    if symmetric:
        return stored, None
    zero = torch.round(-lo / stored.float()).clamp(0, levels)
    zero = torch.where(present, zero, torch.zeros_like(zero))
    return stored, zero.to(torch.uint8)


#: Range shrink factors tried by the MSE clip search (1.0 = no clipping).
CLIP_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))


def search_clip_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    factors: tuple[float, ...] = CLIP_FACTORS,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`compute_qparams`, but each group's range is shrunk by the factor (from
    ``factors``) that minimises that group's squared rounding-plus-clipping error (an MSE clip
    search, as in OCS + clipping). Weights outside the shrunk range are clamped to its ends.

    ``importance`` (optional, non-negative, ``[out, in]`` or ``[in]``) weights each element's squared
    error, e.g. ``diag(X^T X)`` per input for an output-aware search
    (:mod:`hf_splitquant.methods.output_clip`); ``None`` weights all elements equally."""
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot compute quantization scales")
    lo, hi, present = _masked_range(w, group_size, None)
    valid = group_view(torch.ones_like(w, dtype=torch.bool), group_size, fill=False)
    if importance is not None:
        valid = group_view(importance.float().expand_as(w), group_size) * valid  # padding stays 0
    best_err = best_scale = best_zero = None
    for factor in factors:
        scale, zero = _qparams_from_range(lo * factor, hi * factor, present, bits, symmetric, scale_dtype)
        restored = dequantize_codes(quantize_codes(w, scale, zero, bits, group_size), scale, zero, bits, group_size)
        err = (group_view(restored - w, group_size) ** 2 * valid).sum(dim=-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _masked_range(
    w: torch.Tensor, group_size: int | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (min, max, has_members); groups without members get (0, 0, False)."""
    gw = group_view(w, group_size)
    if mask is None and gw.shape[1] * gw.shape[2] != w.shape[1]:
        mask = torch.ones_like(w, dtype=torch.bool)  # keep the ragged last group's padding out of the range
    if mask is None:
        return gw.amin(dim=-1), gw.amax(dim=-1), torch.ones(gw.shape[:2], dtype=torch.bool, device=w.device)
    gm = group_view(mask, group_size, fill=False)
    lo = torch.where(gm, gw, torch.full_like(gw, math.inf)).amin(dim=-1)
    hi = torch.where(gm, gw, torch.full_like(gw, -math.inf)).amax(dim=-1)
    present = gm.any(dim=-1)
    return torch.where(present, lo, 0.0), torch.where(present, hi, 0.0), present


def compute_offset_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    scale_dtype: torch.dtype = torch.float16,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and float minimum of every group: a grid over exactly ``[min, max]`` of the members.

    The minimum is rounded *down* and the scale *up* to ``scale_dtype``, so the stored grid covers
    the members' range and the rounding error stays within ``scale / 2``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot compute quantization scales")
    lo, hi, _ = _masked_range(w, group_size, mask)
    minimum = lo.to(scale_dtype)
    high = minimum.float() > lo
    if high.any():
        minimum = torch.where(high, torch.nextafter(minimum, torch.full_like(minimum, -math.inf)), minimum)
    scale = (hi - minimum.float()) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = _round_up_to_dtype(scale, scale_dtype)
    if not (torch.isfinite(stored).all() and torch.isfinite(minimum).all()):
        raise ValueError(
            f"a quantization parameter overflows {scale_dtype}; use scale_dtype='float32'"
        )
    return stored, minimum


def compute_aligned_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_range: tuple[int, int],
    scale_dtype: torch.dtype = torch.float16,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of every group for the grid ``(code - zero) * scale``, with the zero in
    ``zero_range`` (inclusive), chosen to minimise the members' squared rounding error.

    Unlike :func:`compute_qparams` the grid need not contain 0 (the zero may lie outside ``0 .. 2**bits - 1``),
    so it spans a cluster of all-positive or all-negative weights almost as tightly as a float minimum
    (:func:`compute_offset_qparams`), while its origin stays a whole number of steps from zero: a layer whose
    zeros lie in the int4 kernel's range is one kernel term per grid (:mod:`hf_splitquant.quant.int4`).
    Two candidates per group: the smallest step (over the allowed zeros) whose grid covers the members'
    ``[min, max]``, and the usual asymmetric grid (step ``(max - min) / (2**bits - 1)``, zero the integer
    nearest ``-min / step``, which may clip an end by half a step) where that zero is allowed.

    Args:
        weight: ``[out, in]`` float tensor.
        bits: code width.
        group_size: inputs per group, or ``None`` for per-channel.
        zero_range: the allowed integer zero points, inclusive; it must allow a grid that contains 0
            (``low <= 2**bits - 1`` and ``high >= 0``) and lie in -128..127.
        scale_dtype: storage dtype of the scales.
        mask: optional boolean ``[out, in]``: only ``True`` entries count. A group without members (or whose
            members are all 0) gets scale 1 and the allowed zero closest to 0.

    Returns:
        ``(scale [out, groups] in scale_dtype, zero [out, groups] int8)``.
    """
    levels = 2**bits - 1
    low, high = zero_range
    if not (-128 <= low <= high <= 127 and low <= levels and high >= 0):
        raise ValueError(f"zero_range {zero_range} must lie in -128..127 and allow a grid containing 0 "
                         f"(low <= {levels}, high >= 0)")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot compute quantization scales")
    lo, hi, present = _masked_range(w, group_size, mask)
    # the covering candidate: per group, the zero whose covering grid has the smallest step (cheap: [out, groups])
    cover_step = torch.full_like(lo, math.inf)
    cover_zero = torch.full_like(lo, float(min(max(0, low), high)))
    for z in range(low, high + 1):
        # the grid spans -z * s .. (levels - z) * s: an end on the far side of 0 bounds s from below (it must
        # reach the range), an end on the range's side of 0 from above (it must not overshoot it)
        need = torch.zeros_like(lo)
        cap = torch.full_like(lo, math.inf)
        if z > 0:
            need = torch.maximum(need, -lo / z)
        elif z < 0:
            cap = torch.where(lo > 0, lo / -z, torch.zeros_like(lo))
        else:
            cap = torch.where(lo >= 0, cap, torch.zeros_like(lo))
        top = levels - z
        if top > 0:
            need = torch.maximum(need, hi / top)
        elif top < 0:
            cap = torch.minimum(cap, torch.where(hi < 0, hi / top, torch.zeros_like(hi)))
        else:
            cap = torch.where(hi <= 0, cap, torch.zeros_like(cap))
        better = (need <= cap) & (need > 0) & (need < cover_step)
        cover_step = torch.where(better, need, cover_step)
        cover_zero = torch.where(better, torch.full_like(lo, float(z)), cover_zero)
    # the min-max candidate: the usual asymmetric grid, where its rounded zero is allowed
    minmax = (hi - lo) / levels
    minmax_zero = torch.round(-lo / torch.where(minmax > 0, minmax, torch.ones_like(minmax)))
    gw = group_view(w, group_size)
    members = group_view(mask if mask is not None else torch.ones_like(w, dtype=torch.bool), group_size, fill=False)
    fallback = float(min(max(0, low), high))
    best_err = torch.full_like(lo, math.inf)
    best_scale = torch.ones_like(lo)
    best_zero = torch.full_like(lo, fallback)
    for step, zero, valid in ((cover_step, cover_zero, torch.isfinite(cover_step)),
                              (minmax, minmax_zero, (minmax > 0) & (minmax_zero >= low) & (minmax_zero <= high))):
        stored = _round_up_to_dtype(torch.where(valid, step, torch.ones_like(step)), scale_dtype).float()
        z = torch.where(valid, zero, torch.zeros_like(zero)).unsqueeze(-1)
        s = stored.unsqueeze(-1)
        codes = torch.round(gw / s).add_(z).clamp_(0, levels)
        err = (((codes - z) * s - gw).square_() * members).sum(dim=-1)
        better = valid & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, stored, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    empty = ~present | ~torch.isfinite(best_err)  # no members, or only zeros (no positive step needed)
    scale = torch.where(empty, torch.ones_like(best_scale), best_scale).to(scale_dtype)
    zero = torch.where(empty, torch.full_like(best_zero, fallback), best_zero)
    if not torch.isfinite(scale).all():
        raise ValueError(
            f"a quantization scale overflows {scale_dtype} (weights larger than the scale dtype can hold); "
            "use scale_dtype='float32'"
        )
    return scale, zero.to(torch.int8)


def expand_params(params: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """``[out, groups]`` -> ``[out, in]`` by repeating each group's value over its inputs."""
    g = _effective_group(in_features, group_size)
    return params.repeat_interleave(g, dim=1)[:, :in_features]


def quantize_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``weight`` to the nearest level of its group's grid; returns uint8 codes ``[out, in]``.

    With ``minimum`` (from :func:`compute_offset_qparams`) the grid is ``code * scale + minimum``.
    """
    # Work on the [out, groups, group] view with broadcast grid parameters and in-place ops: one
    # float temporary of the layer's size (this bounds the peak memory of quantize-on-load).
    out_f, in_f = weight.shape
    w = group_view(weight.float(), group_size)
    if minimum is not None:
        codes = (w - minimum.float().unsqueeze(-1)).div_(scale.float().unsqueeze(-1)).round_()
    else:
        codes = torch.div(w, scale.float().unsqueeze(-1)).round_()
        codes.add_(zero.float().unsqueeze(-1) if zero is not None else float(2 ** (bits - 1)))
    codes = codes.clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.reshape(out_f, -1)[:, :in_f]


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes`: ``(code - zero) * scale`` (or ``code * scale + minimum``)."""
    out_f, in_f = codes.shape
    n = num_groups(in_f, group_size)
    g = _effective_group(in_f, group_size)
    # a fresh float32 copy computed in place: the same operations as out-of-place, fewer full-size buffers
    q = group_view(codes, group_size).to(torch.float32, copy=True)
    if minimum is not None:
        w = q.mul_(scale.float().unsqueeze(-1)).add_(minimum.float().unsqueeze(-1))
    else:
        w = q.sub_(zero.float().unsqueeze(-1) if zero is not None else float(2 ** (bits - 1)))
        w = w.mul_(scale.float().unsqueeze(-1))
    return w.reshape(out_f, n * g)[:, :in_f].to(dtype)


def group_range(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group, the ``(min, max)`` of ``weight`` (``[out, groups]`` each)."""
    lo, hi, _ = _masked_range(weight.float(), group_size, None)
    return lo, hi


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of grids spanning ``[lo, hi]`` per entry, with :func:`compute_qparams`'s rules."""
    return _qparams_from_range(lo.float(), hi.float(), torch.ones_like(lo, dtype=torch.bool), bits, symmetric,
                               scale_dtype)
