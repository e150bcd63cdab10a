"""OCS, outlier channel splitting (Zhao et al., ICML 2019), for Linear layers.

The input channel holding the largest |w| is duplicated and both copies carry half of it, so the
layer computes the same function while its range shrinks; repeated ``n = ceil(r * in_features)``
times on the already expanded weight (a duplicated channel can be chosen again). The
quantization-aware ("qa") split gives the halves ``w/2 - delta/4`` and ``w/2 + delta/4`` on the final
grid (step ``delta``), so that the two rounded halves add up like the unsplit weight rounded on that
grid instead of both rounding the same way.

At run time the duplicated columns are folded back into their source columns when the weight is
dequantized (``W[:, src] += W_dup``), which gives the same ``y`` as gathering the duplicated input
features (``x' = [x, x[..., src]]``), with no extra matmul cost.

Stored tensors:
  ``weight``           uint8 codes of the expanded ``[out, in + n]`` weight (rows packed)
  ``weight_scale``     ``[out, groups(in + n)]``
  ``weight_zero``      uint8 ``[out, groups(in + n)]`` (asymmetric grids)
  ``weight_dup_index`` int32 ``[n]``: the original input channel each appended column duplicates
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..quant.grid import ElementGrid, dequantize_codes, num_groups, quantize_codes
from ..quant.packing import pack_codes, packed_row_bytes, unpack_codes
from ..spec import LayerSpec
from . import rtn
from .base import QuantFormat

__all__ = ["OCSFormat", "num_duplicated", "split_channels", "fold_back", "gather_inputs", "tensor_shapes", "quantize", "dequantize", "element_grid",
           "pack_grid_codes"]


def num_duplicated(spec: LayerSpec) -> int:
    """Input channels OCS duplicates in a layer: ``ceil(ocs_expand_ratio * in_features)``."""
    # round first so that e.g. 0.05 * 100 counts 5 channels, not 6
    return math.ceil(round(spec.ocs_expand_ratio * spec.in_features, 6))


def _group_of(columns: int, group_size: int | None, column: int) -> int:
    if group_size is None or group_size >= columns:
        return 0
    return column // group_size


def split_channels(
    weight: torch.Tensor,
    num_splits: int,
    split: str = "naive",
    delta: torch.Tensor | None = None,
    group_size: int | None = None,
    order: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Duplicate-and-halve ``num_splits`` input channels of a float ``[out, in]`` weight.

    Args:
        weight: the float weight.
        num_splits: how many channels to split (``n``).
        split: ``"naive"`` (both halves ``w/2``) or ``"qa"`` (``w/2 -+ delta/4``).
        delta: for ``"qa"``: the grid step per row and group of the *expanded* layout,
            ``[out, groups(in + n)]``; a pair uses the step of the source column's group.
        group_size: the group size ``delta`` refers to.
        order: replay these column choices instead of choosing by largest |w| (the QA pass reuses
            the naive pass's choices so that both describe the same expanded layout).

    Returns:
        ``(expanded [out, in + n], source_index [n] of original channels, chosen columns)``.
    """
    out_f, in_f = weight.shape
    total = in_f + num_splits
    expanded = torch.zeros(out_f, total, dtype=torch.float32, device=weight.device)
    expanded[:, :in_f] = weight.float()
    source = list(range(in_f))
    chosen: list[int] = []
    for k in range(num_splits):
        width = in_f + k
        if order is not None:
            j = order[k]
        else:
            j = int(expanded[:, :width].abs().amax(dim=0).argmax())
        column = expanded[:, j]
        if split == "qa":
            if delta is None:
                raise ValueError("the quantization-aware split needs the grid step `delta`")
            step = delta[:, _group_of(total, group_size, j)].float()
            low, high = column / 2 - step / 4, column / 2 + step / 4
        else:
            low = high = column / 2
        expanded[:, width] = high
        expanded[:, j] = low
        source.append(source[j])
        chosen.append(j)
    index = torch.tensor(source[in_f:], dtype=torch.int32, device=weight.device)
    return expanded, index, chosen


def fold_back(expanded: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Add each duplicated column back onto its source column: ``[out, in + n] -> [out, in]``."""
    folded = expanded[:, :in_features].clone()
    if index.numel():
        folded.index_add_(1, index.long(), expanded[:, in_features:])
    return folded


def gather_inputs(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The expanded input ``[..., in + n]`` that the expanded weight multiplies (run-time OCS)."""
    return torch.cat([x, x.index_select(-1, index.long())], dim=-1)


def tensor_shapes(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    total = spec.in_features + num_duplicated(spec)
    groups = num_groups(total, spec.group_size)
    shapes = {
        "weight": ((spec.out_features * packed_row_bytes(total, spec.bits),), torch.uint8),
        "weight_scale": ((spec.out_features, groups), spec.torch_scale_dtype),
    }
    if not spec.symmetric:
        shapes["weight_zero"] = ((spec.out_features, groups), torch.uint8)
    shapes["weight_dup_index"] = ((num_duplicated(spec),), torch.int32)
    return shapes


def _split(weight: torch.Tensor, spec: LayerSpec):  # noqa: ANN202
    """Split outlier channels, fit the grid on the split weight, then (``"qa"``) re-split on that grid.

    ``"auto"`` builds both and keeps the one whose quantized, folded-back weight is closer to ``weight``.
    """
    n = num_duplicated(spec)
    expanded, index, chosen = split_channels(weight, n, "naive")
    scale, zero = rtn.grid_params(expanded, spec)
    if spec.ocs_split == "naive" or not n:
        return expanded, index, scale, zero
    qa, qa_index, _ = split_channels(weight, n, "qa", delta=scale, group_size=spec.group_size, order=chosen)
    if spec.ocs_split == "qa" or _split_error(qa, qa_index, scale, zero, weight, spec) <= _split_error(
            expanded, index, scale, zero, weight, spec):
        return qa, qa_index, scale, zero
    return expanded, index, scale, zero


def _split_error(expanded: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 weight: torch.Tensor, spec: LayerSpec) -> float:
    codes = quantize_codes(expanded, scale, zero, spec.bits, spec.group_size)
    restored = fold_back(dequantize_codes(codes, scale, zero, spec.bits, spec.group_size), index, spec.in_features)
    return float((restored - weight.float()).pow(2).sum())


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """The grid of the expanded weight; ``input_index`` gives the duplicated input features."""
    expanded, index, scale, zero = _split(weight, spec)
    grid = rtn.grid_from_params(expanded, scale, zero, spec)
    grid.input_index = index
    grid.state["weight_dup_index"] = index.to(torch.int32)
    return grid


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    return {"weight": pack_codes(codes, spec.bits).reshape(-1), **grid.state}


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Split outlier channels, fit the grid on the split weight, then (``"qa"``) re-split on that grid."""
    expanded, index, scale, zero = _split(weight, spec)
    codes = quantize_codes(expanded, scale, zero, spec.bits, spec.group_size)
    out = {"weight": pack_codes(codes, spec.bits).reshape(-1), "weight_scale": scale}
    if zero is not None:
        out["weight_zero"] = zero
    out["weight_dup_index"] = index.to(torch.int32)
    return out


def dequantize(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    total = spec.in_features + num_duplicated(spec)
    codes = unpack_codes(tensors["weight"].reshape(spec.out_features, packed_row_bytes(total, spec.bits)), spec.bits,
                         total)
    index = tensors["weight_dup_index"]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= spec.in_features):
        raise ValueError("OCS duplicate index out of range (corrupt `weight_dup_index` tensor)")
    expanded = dequantize_codes(codes, tensors["weight_scale"], tensors.get("weight_zero"), spec.bits,
                                spec.group_size)
    return fold_back(expanded, index, spec.in_features).to(dtype)


def expand_differentiable(weight: torch.Tensor, spec: LayerSpec, scale: torch.Tensor | None,
                          order: list[int] | None) -> torch.Tensor:
    """The expanded ``[out, in + n]`` weight of ``weight`` with the fixed channel choices ``order``.

    The split is linear in ``weight`` (plus constant ``-+ delta / 4`` offsets for the "qa" halves), so
    the result is differentiable: each copy's gradient reaches its source column scaled by its
    halving factor, and fold-back sums the copies (fake quantization trains through it).
    """
    n = num_duplicated(spec)
    split = spec.ocs_split if n else "naive"
    with torch.no_grad():
        expanded, index, _ = split_channels(weight.detach().float(), n, split, delta=scale,
                                            group_size=spec.group_size, order=order)
        ones = torch.ones(1, weight.shape[1], device=weight.device)
        factor = split_channels(ones, n, "naive", order=order)[0]
        source = torch.cat([torch.arange(weight.shape[1], device=weight.device), index.long()])
    linear = weight.float()[:, source] * factor
    return expanded + (linear - linear.detach())


class OCSFormat(QuantFormat):
    """Outlier channel splitting: an affine grid over the expanded weight, duplicated inputs gathered."""

    name = "ocs"
    spec_fields = ("ocs_expand_ratio", "ocs_split")
    supports_clipped_ste = False  # a weight's copies sit on different grid positions

    def tensor_shapes(self, spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return tensor_shapes(spec)

    def columns(self, spec: LayerSpec) -> int:
        return spec.in_features + num_duplicated(spec)

    def quantize(self, weight: torch.Tensor, spec: LayerSpec, seed: int = 0,
                 cache: dict | None = None) -> dict[str, torch.Tensor]:
        return quantize(weight, spec, seed, cache)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(tensors, spec, dtype)

    def element_grid(self, weight: torch.Tensor, spec: LayerSpec, seed: int = 0,
                     cache: dict | None = None) -> ElementGrid:
        return element_grid(weight, spec, seed, cache)

    def pack_grid_codes(self, grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
        return pack_grid_codes(grid, codes, spec)

    def input_index(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        index = tensors.get("weight_dup_index")
        return index.long() if index is not None and index.numel() else None

    def channel_order(self, weight: torch.Tensor, spec: LayerSpec) -> list[int] | None:
        return split_channels(weight, num_duplicated(spec), "naive")[2]

    def expand_weight(self, weight: torch.Tensor, spec: LayerSpec, scale: torch.Tensor | None,
                      order: list[int] | None) -> torch.Tensor:
        return expand_differentiable(weight, spec, scale, order)

    def fold_weight(self, expanded: torch.Tensor, input_index: torch.Tensor | None, spec: LayerSpec) -> torch.Tensor:
        if input_index is None:
            return expanded[:, : spec.in_features]
        return fold_back(expanded, input_index, spec.in_features)
