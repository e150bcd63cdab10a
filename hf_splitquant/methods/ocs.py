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

Where a copy's grid comes from (``LayerSpec.ocs_layout``):

* ``"source_group"`` (written since packed format version 2): every appended column is rounded on the
  grid of its source column's group, and that group's range covers the copy. Both halves of a split
  then sit on one grid, which is what the quantization-aware split assumes, also with groups; the
  scales cover the ``in`` original columns only.
* ``"appended"`` (format version 1, still read): the appended columns form the last group(s) of the
  expanded row, so with groups a copy is rounded on another grid than its source (the QA offsets then
  do not cancel; measured in ``benchmarks/results/ocs_mixquant.md``).

Stored tensors:
  ``weight``           uint8 codes of the expanded ``[out, in + n]`` weight (rows packed)
  ``weight_scale``     ``[out, groups(in)]`` (``"appended"``: ``[out, groups(in + n)]``)
  ``weight_zero``      uint8, the scales' shape (asymmetric grids)
  ``weight_dup_index`` int32 ``[n]``: the original input channel each appended column duplicates
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..quant.grid import (
    ElementGrid,
    dequantize_codes,
    expand_params,
    group_range,
    num_groups,
    qparams_from_range,
    search_clip_qparams,
)
from ..quant.int4 import Int4Term, affine_terms
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


def _source_group_layout(spec: LayerSpec) -> bool:
    return spec.ocs_layout == "source_group"


def tensor_shapes(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    total = spec.in_features + num_duplicated(spec)
    groups = num_groups(spec.in_features if _source_group_layout(spec) else total, spec.group_size)
    shapes = {
        "weight": ((spec.out_features * packed_row_bytes(total, spec.bits),), torch.uint8),
        "weight_scale": ((spec.out_features, groups), spec.torch_scale_dtype),
    }
    if not spec.symmetric:
        shapes["weight_zero"] = ((spec.out_features, groups), torch.uint8)
    shapes["weight_dup_index"] = ((num_duplicated(spec),), torch.int32)
    return shapes


def copy_sources(order: list[int], in_features: int) -> list[int]:
    """The original input channel of each appended column, for the split choices ``order``."""
    source = list(range(in_features))
    for j in order:
        source.append(source[j])
    return source[in_features:]


def _copy_groups(sources: torch.Tensor | list[int], spec: LayerSpec) -> torch.Tensor:
    """The group (of the original columns) each appended column's source lies in."""
    index = torch.as_tensor(sources, dtype=torch.long)
    g = spec.in_features if spec.group_size is None or spec.group_size >= spec.in_features else spec.group_size
    return index // g


def column_params(params: torch.Tensor, sources: torch.Tensor | list[int], spec: LayerSpec) -> torch.Tensor:
    """``"source_group"`` layout: per-group ``[out, groups(in)]`` -> per-column ``[out, in + n]``, each
    appended column taking its source's group."""
    base = expand_params(params, spec.in_features, spec.group_size)
    return torch.cat([base, params[:, _copy_groups(sources, spec).to(params.device)]], dim=1)


#: an output-aware clip search: (importance of each original input [in], shrink factors tried)
Clip = tuple[torch.Tensor, tuple[float, ...]]


def _source_group_params(expanded: torch.Tensor, sources: list[int], spec: LayerSpec,
                         clip: Clip | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grids per group of the original columns whose ranges cover the group's appended copies too
    (or, clipped, whose ranges minimise the importance-weighted error of the original columns)."""
    in_f = spec.in_features
    if clip is not None:  # the naive copies equal their halved sources, which the search sees
        importance, factors = clip
        return search_clip_qparams(expanded[:, :in_f], spec.bits, spec.group_size, spec.symmetric,
                                   spec.torch_scale_dtype, factors=factors, importance=importance)
    if spec.clip == "mse":  # the naive copies equal their halved sources, which the search sees
        return search_clip_qparams(expanded[:, :in_f], spec.bits, spec.group_size, spec.symmetric,
                                   spec.torch_scale_dtype)
    lo, hi = group_range(expanded[:, :in_f], spec.group_size)
    if sources:
        groups = _copy_groups(sources, spec).to(expanded.device).expand(expanded.shape[0], -1)
        copies = expanded[:, in_f:].float()
        lo = lo.scatter_reduce(1, groups, copies, reduce="amin")
        hi = hi.scatter_reduce(1, groups, copies, reduce="amax")
    return qparams_from_range(lo, hi, spec.bits, spec.symmetric, spec.torch_scale_dtype)


def _split_source_group(weight: torch.Tensor, spec: LayerSpec, clip: Clip | None = None):  # noqa: ANN202
    """``"source_group"``: split, fit each source group's grid over its columns and copies, then (``"qa"``)
    re-split with each pair's own step, refitting the ranges to the halves until the grids are stable
    (a clipped grid is not refitted: values beyond it are clamped by design)."""
    n = num_duplicated(spec)
    expanded, index, chosen = split_channels(weight, n, "naive")
    sources = copy_sources(chosen, spec.in_features)
    scale, zero = _source_group_params(expanded, sources, spec, clip)
    if spec.ocs_split == "naive" or not n:
        return expanded, index, scale, zero
    best = (expanded, index, scale, zero)
    for _ in range(1 if clip is not None else _QA_REFITS):
        # the halves w/2 -+ delta/4 may widen their group's range, which changes delta: refit until stable
        steps = column_params(scale.float(), sources, spec)
        qa, qa_index, _ = split_channels(weight, n, "qa", delta=steps, group_size=1, order=chosen)
        if clip is not None:
            break
        new_scale, new_zero = _source_group_params(qa, sources, spec)
        stable = torch.equal(new_scale, scale) and (zero is None or torch.equal(new_zero, zero))
        scale, zero = new_scale, new_zero
        if stable:
            break
    importance = clip[0] if clip is not None else None
    if spec.ocs_split == "qa" or _split_error(qa, qa_index, scale, zero, weight, spec, importance) <= _split_error(
            *best, weight, spec, importance):
        return qa, qa_index, scale, zero
    return best


#: refits of the source groups' grids to the quantization-aware halves (one or two suffice in practice)
_QA_REFITS = 4


def _grid(expanded: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
          spec: LayerSpec) -> ElementGrid:
    """The per-element grid of the expanded weight for either layout."""
    if not _source_group_layout(spec):
        grid = rtn.grid_from_params(expanded, scale, zero, spec)
    else:
        step = column_params(scale.float(), index, spec)
        origin = column_params(zero.float(), index, spec) if zero is not None else float(2 ** (spec.bits - 1))
        state = {"weight_scale": scale} | ({"weight_zero": zero} if zero is not None else {})
        grid = ElementGrid(expanded.float(), step, -origin * step, 2**spec.bits - 1, None, state)
    grid.input_index = index
    grid.state["weight_dup_index"] = index.to(torch.int32)
    return grid


def _split(weight: torch.Tensor, spec: LayerSpec, clip: Clip | None = None):  # noqa: ANN202
    """Split outlier channels, fit the grid on the split weight, then (``"qa"``) re-split on that grid.

    ``"auto"`` builds both and keeps the one whose quantized, folded-back weight is closer to ``weight``
    (weighted by the clip's input importance, when clipped for the output error).
    """
    if _source_group_layout(spec):
        return _split_source_group(weight, spec, clip)
    n = num_duplicated(spec)
    expanded, index, chosen = split_channels(weight, n, "naive")
    importance = None
    if clip is not None:
        importance, factors = clip
        wide = torch.cat([importance, importance[index.long()]])  # a duplicated column sees its source's input
        scale, zero = search_clip_qparams(expanded, spec.bits, spec.group_size, spec.symmetric, spec.torch_scale_dtype,
                                          factors=factors, importance=wide)
    else:
        scale, zero = rtn.grid_params(expanded, spec)
    if spec.ocs_split == "naive" or not n:
        return expanded, index, scale, zero
    qa, qa_index, _ = split_channels(weight, n, "qa", delta=scale, group_size=spec.group_size, order=chosen)
    if spec.ocs_split == "qa" or _split_error(qa, qa_index, scale, zero, weight, spec, importance) <= _split_error(
            expanded, index, scale, zero, weight, spec, importance):
        return qa, qa_index, scale, zero
    return expanded, index, scale, zero


def _split_error(expanded: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 weight: torch.Tensor, spec: LayerSpec, importance: torch.Tensor | None = None) -> float:
    """Squared error of the folded quantized weight (each input weighted by ``importance`` when given)."""
    grid = _grid(expanded, index, scale, zero, spec)
    error = (fold_back(grid.values(grid.nearest_codes()), index, spec.in_features) - weight.float()).pow(2)
    return float(error.sum() if importance is None else (error * importance.float()).sum())


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """The grid of the expanded weight; ``input_index`` gives the duplicated input features."""
    return _grid(*_split(weight, spec), spec)


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    return {"weight": pack_codes(codes, spec.bits).reshape(-1), **grid.state}


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Split outlier channels, fit the grid on the split weight, then (``"qa"``) re-split on that grid."""
    grid = element_grid(weight, spec, seed, cache)
    return pack_grid_codes(grid, grid.nearest_codes(), spec)


def dequantize(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    total = spec.in_features + num_duplicated(spec)
    codes = unpack_codes(tensors["weight"].reshape(spec.out_features, packed_row_bytes(total, spec.bits)), spec.bits,
                         total)
    index = tensors["weight_dup_index"]
    # checked at load too (`invalid_values`); skipped while compiling, where it would break the graph
    if not torch.compiler.is_compiling() and index.numel() and (
            int(index.min()) < 0 or int(index.max()) >= spec.in_features):
        raise ValueError("OCS duplicate index out of range (corrupt `weight_dup_index` tensor)")
    if _source_group_layout(spec):
        scale = column_params(tensors["weight_scale"].float(), index.long(), spec)
        zero = tensors.get("weight_zero")
        origin = column_params(zero.float(), index.long(), spec) if zero is not None else float(2 ** (spec.bits - 1))
        expanded = (codes.float() - origin) * scale
    else:
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
    group_size = spec.group_size
    if split == "qa" and _source_group_layout(spec) and scale is not None:
        scale, group_size = column_params(scale.float(), copy_sources(order, spec.in_features), spec), 1
    with torch.no_grad():
        expanded, index, _ = split_channels(weight.detach().float(), n, split, delta=scale,
                                            group_size=group_size, order=order)
        ones = torch.ones(1, weight.shape[1], device=weight.device)
        factor = split_channels(ones, n, "naive", order=order)[0]
        source = torch.cat([torch.arange(weight.shape[1], device=weight.device), index.long()])
    linear = weight.float()[:, source] * factor
    return expanded + (linear - linear.detach())


class OCSFormat(QuantFormat):
    """Outlier channel splitting: an affine grid over the expanded weight, duplicated inputs gathered."""

    name = "ocs"
    has_clipped_grids = True
    tensor_roles = QuantFormat.tensor_roles | {"weight_dup_index": "duplicate_index"}
    spec_fields = ("ocs_expand_ratio", "ocs_split", "ocs_layout")
    supports_clipped_ste = False  # a weight's copies sit on different grid positions
    dequantize_compiles_well = True  # traced: MiniLM batch 32 0.93x bf16, as an opaque operator 0.76x

    # the module's functions are the format's implementation
    tensor_shapes = staticmethod(tensor_shapes)
    quantize = staticmethod(quantize)
    dequantize = staticmethod(dequantize)
    element_grid = staticmethod(element_grid)
    pack_grid_codes = staticmethod(pack_grid_codes)
    def columns(self, spec: LayerSpec) -> int:
        return spec.in_features + num_duplicated(spec)

    def invalid_values(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> tuple[str, str] | None:
        index = tensors["weight_dup_index"]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= spec.in_features):
            return "weight_dup_index", f"points outside the layer's {spec.in_features} inputs"
        return super().invalid_values(tensors, spec)

    def element_param_index(self, state: Mapping[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
        if not _source_group_layout(spec):
            return super().element_param_index(state, spec)
        groups = num_groups(spec.in_features, spec.group_size)
        group_of = column_params(torch.arange(groups).unsqueeze(0), state["weight_dup_index"].long().cpu(), spec)
        return torch.arange(spec.out_features).unsqueeze(1) * groups + group_of

    def int4_terms(self, spec: LayerSpec) -> int:
        if _source_group_layout(spec) and num_duplicated(spec):
            return 2  # folded codes: up to (pieces x levels) per weight, two nibbles
        return super().int4_terms(spec)

    def int4_unsupported(self, spec: LayerSpec) -> str | None:
        if _source_group_layout(spec) and num_duplicated(spec) and spec.bits > 6:
            return f"{spec.bits}-bit OCS codes folded over their copies exceed two int4 terms"
        return None

    def int4_parts(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, codes: torch.Tensor,
                   group: int) -> list[Int4Term] | None:
        if not _source_group_layout(spec):
            return super().int4_parts(tensors, spec, codes, group)
        # A copy shares its source's grid, so source and copies fold into one integer code offset on
        # that grid: no input gather, and the kernel groups are the original columns' groups.
        in_f = spec.in_features
        index = tensors["weight_dup_index"].long()
        scale = expand_params(tensors["weight_scale"].float(), in_f, spec.group_size)
        zero = tensors.get("weight_zero")
        origin = column_params(zero.float(), index, spec) if zero is not None else torch.full(
            codes.shape, float(2 ** (spec.bits - 1)))
        offsets = codes.float() - origin
        folded = fold_back(offsets, index, in_f)
        if not num_duplicated(spec):
            return affine_terms(folded, scale, torch.zeros_like(scale), spec.bits, group)
        if float(folded.max() - folded.min()) > 255:  # a long chain of splits of one channel
            return None
        return affine_terms(folded, scale, torch.zeros_like(scale), 8, group)

    def input_index(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor | None:
        if _source_group_layout(spec):
            return None  # the kernel terms fold the copies into their sources
        index = tensors.get("weight_dup_index")
        return index.long() if index is not None and index.numel() else None

    def clipped_grid(self, weight: torch.Tensor, spec: LayerSpec, importance: torch.Tensor,
                     factors: tuple[float, ...]) -> ElementGrid:
        return _grid(*_split(weight, spec, (importance, factors)), spec)

    def channel_order(self, weight: torch.Tensor, spec: LayerSpec) -> list[int] | None:
        return split_channels(weight, num_duplicated(spec), "naive")[2]

    def expand_weight(self, weight: torch.Tensor, spec: LayerSpec, scale: torch.Tensor | None,
                      order: list[int] | None) -> torch.Tensor:
        return expand_differentiable(weight, spec, scale, order)

    def fold_weight(self, expanded: torch.Tensor, input_index: torch.Tensor | None, spec: LayerSpec) -> torch.Tensor:
        if input_index is None:
            return expanded[:, : spec.in_features]
        return fold_back(expanded, input_index, spec.in_features)
