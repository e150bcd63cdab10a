"""SplitQuant (Song & Lin, arXiv 2501.12428): split a layer into lower / middle / upper parts by a
3-cluster k-means of its weights, and give each part its own quantization grid.

Two forms live here:

* :func:`split_linear` builds the paper's float-equivalent structure, three ``nn.Linear`` whose
  sum is the original layer (weights and, optionally, bias clustered), for fidelity checks and
  for users who want the three layers themselves.
* The packed storage. The parts partition the weights, so instead of three dense copies (3x the
  bits) each weight stores its cluster id (base-3 packed, 1.6 bits) and one code on its cluster's
  grid. Dequantizing gives exactly the sum of the three dequantized parts, because each part is
  zero outside its cluster and an asymmetric grid represents 0 exactly.

Stored tensors:
  ``weight``         uint8 ``[out * row_bytes]`` codes (see :mod:`hf_splitquant.quant.packing`)
  ``weight_cluster`` uint8 ``[out * ceil(in / 5)]`` cluster ids, five base-3 digits per byte
  ``weight_scale``   ``[3, out, groups]`` one grid per cluster (lower, middle, upper)
  ``weight_zero``    uint8 ``[3, out, groups]`` (``splitquant_range="part"``, asymmetric) or
                     int8 (``"aligned"``, asymmetric)
  ``weight_min``     ``[3, out, groups]`` float grid origins (``splitquant_range="cluster"``, asymmetric)

``splitquant_range="cluster"`` (default) fits each cluster's grid to exactly its own members
(``code * scale + min``: no level is spent on the empty span between a cluster and 0).
``"aligned"`` fits each cluster's grid to its members too, but as ``(code - zero) * scale`` with an
integer zero that may lie outside the codes (a cluster of positive weights gets a negative zero): the
origin is a whole number of steps from 0, so each cluster is *one* int4-kernel term (three per layer,
against six for ``"cluster"``, whose float origins need a second, mask term each) and a zero point
costs 8 bits instead of 16. The zeros are limited to what the kernel's codes reach (2 bits: -4..8,
3 bits: 0..8), which costs accuracy on narrow clusters far from 0 (SmolLM2-135M, 2 bits, group 64:
1.13-1.33x the rounding error of ``"cluster"`` per layer).
``"part"`` reproduces the paper's numerics, where each dense part's grid also spans the zeros that
fill it outside its cluster, with an integer zero point.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..quant.grid import (
    ElementGrid,
    compute_aligned_qparams,
    compute_offset_qparams,
    compute_qparams,
    expand_params,
    num_groups,
    quantize_codes,
)
from ..quant.int4 import Int4Term
from ..quant.kmeans import assign_clusters, kmeans_1d, split_boundaries
from ..quant.packing import pack_trits, trit_row_bytes, unpack_trits
from ..spec import LayerSpec
from . import rtn
from .base import QuantFormat

__all__ = [
    "SplitQuantFormat",
    "split_tensor",
    "SplitLinear",
    "split_linear",
    "tensor_shapes",
    "quantize",
    "dequantize",
    "cluster_ids",
    "element_grid",
    "pack_grid_codes",
    "kernel_zero_range",
    "single_term_clusters",
]

NUM_CLUSTERS = 3


def cluster_ids(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Cluster id (0 lower, 1 middle, 2 upper) of every element, from one k-means over the tensor."""
    centers = kmeans_1d(weight, k=NUM_CLUSTERS, seed=seed)
    return assign_clusters(weight, split_boundaries(centers))


def split_tensor(t: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three parts of ``t`` (same shape, zeros outside each cluster); they sum to ``t`` exactly."""
    ids = cluster_ids(t, seed)
    zero = torch.zeros_like(t)
    return tuple(torch.where(ids == c, t, zero) for c in range(NUM_CLUSTERS))  # type: ignore[return-value]


class SplitLinear(nn.Module):
    """Three linear layers whose outputs add up to the original layer's: ``(lower + middle) + upper``."""

    def __init__(self, lower: nn.Linear, middle: nn.Linear, upper: nn.Linear) -> None:
        super().__init__()
        self.lower, self.middle, self.upper = lower, middle, upper
        self.in_features, self.out_features = lower.in_features, lower.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lower(x) + self.middle(x)) + self.upper(x)


def split_linear(linear: nn.Linear, seed: int = 0, split_bias: bool = True) -> SplitLinear:
    """The paper's float-equivalent split of one ``nn.Linear``.

    The bias is clustered on its own (as in the authors' code) when ``split_bias`` and it has at
    least 3 entries; otherwise it stays whole on the middle layer. Unlike the authors' code, an
    all-zero bias does not stop the weights from being split.
    """
    weight = linear.weight.detach()
    parts = split_tensor(weight, seed)
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and split_bias and bias.numel() >= NUM_CLUSTERS and bool(bias.any()):
        bias_parts: tuple[torch.Tensor | None, ...] = split_tensor(bias, seed)
    elif bias is not None:
        bias_parts = (torch.zeros_like(bias), bias, torch.zeros_like(bias))
    else:
        bias_parts = (None, None, None)
    layers = []
    for w, b in zip(parts, bias_parts):
        layer = nn.Linear(linear.in_features, linear.out_features, bias=b is not None, device=weight.device,
                          dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        layers.append(layer)
    return SplitLinear(*layers)


def tensor_shapes(spec: LayerSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    groups = num_groups(spec.in_features, spec.group_size)
    base = rtn.tensor_shapes(spec)
    shapes = {
        "weight": base["weight"],
        "weight_cluster": ((spec.out_features * trit_row_bytes(spec.in_features),), torch.uint8),
        "weight_scale": ((NUM_CLUSTERS, spec.out_features, groups), spec.torch_scale_dtype),
    }
    if not spec.symmetric:
        if spec.splitquant_range in ("part", "aligned"):
            dtype = torch.uint8 if spec.splitquant_range == "part" else torch.int8
            shapes["weight_zero"] = ((NUM_CLUSTERS, spec.out_features, groups), dtype)
        else:
            shapes["weight_min"] = ((NUM_CLUSTERS, spec.out_features, groups), spec.torch_scale_dtype)
    return shapes


def _cluster_grids(weight: torch.Tensor, spec: LayerSpec, seed: int, cache: dict | None):
    """Cluster ids and, per cluster, (scale, zero or None, minimum or None)."""
    w = weight.float()
    key = ("splitquant_ids", seed)
    ids = cache.get(key) if cache is not None else None
    if ids is None:
        ids = cluster_ids(w, seed)
        if cache is not None:
            cache[key] = ids
    grids = []
    for c in range(NUM_CLUSTERS):
        member = ids == c
        zero = minimum = None
        if _offset_name(spec) == "weight_min":
            scale, minimum = compute_offset_qparams(w, spec.bits, spec.group_size, spec.torch_scale_dtype, mask=member)
        elif spec.splitquant_range == "aligned":
            scale, zero = compute_aligned_qparams(w, spec.bits, spec.group_size, kernel_zero_range(spec.bits),
                                                  spec.torch_scale_dtype, mask=member)
        elif spec.splitquant_range == "part":
            part = torch.where(member, w, 0.0)
            scale, zero = compute_qparams(part, spec.bits, spec.group_size, spec.symmetric, spec.torch_scale_dtype)
        else:
            scale, zero = compute_qparams(w, spec.bits, spec.group_size, spec.symmetric, spec.torch_scale_dtype,
                                          mask=member)
        grids.append((scale, zero, minimum))
    return ids, grids


def _state(ids: torch.Tensor, grids: list, spec: LayerSpec) -> dict[str, torch.Tensor]:
    state = {"weight_cluster": pack_trits(ids).reshape(-1), "weight_scale": torch.stack([g[0] for g in grids])}
    offset_name = _offset_name(spec)
    if offset_name is not None:
        position = 2 if offset_name == "weight_min" else 1
        state[offset_name] = torch.stack([g[position] for g in grids])
    return state


def element_grid(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> ElementGrid:
    """Each element's grid is its cluster's grid (for rounding optimisers)."""
    ids, grids = _cluster_grids(weight, spec, seed, cache)
    cols = weight.shape[1]
    step = torch.zeros(weight.shape, dtype=torch.float32)
    origin = torch.zeros(weight.shape, dtype=torch.float32)
    for c, (scale, zero, minimum) in enumerate(grids):
        member = ids == c
        s = expand_params(scale.float(), cols, spec.group_size)
        if minimum is not None:
            o = expand_params(minimum.float(), cols, spec.group_size)
        else:
            z = expand_params(zero.float(), cols, spec.group_size) if zero is not None else 2 ** (spec.bits - 1)
            o = -z * s
        step = torch.where(member, s, step)
        origin = torch.where(member, o, origin)
    return ElementGrid(weight.float(), step, origin, 2**spec.bits - 1, None, _state(ids, grids, spec))


def pack_grid_codes(grid: ElementGrid, codes: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    return {"weight": rtn.pack(codes, spec), **grid.state}


def quantize(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Cluster the float ``[out, in]`` weight, fit one grid per cluster, and pack.

    The clustering does not depend on the bit width; ``cache`` keeps it across calls on one weight.
    """
    w = weight.float()
    ids, grids = _cluster_grids(w, spec, seed, cache)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for c, (scale, zero, minimum) in enumerate(grids):
        part_codes = quantize_codes(w, scale, zero, spec.bits, spec.group_size, minimum=minimum)
        codes = torch.where(ids == c, part_codes, codes)
    return {"weight": rtn.pack(codes, spec), **_state(ids, grids, spec)}


def _offset_name(spec: LayerSpec) -> str | None:
    if spec.symmetric:
        return None
    return "weight_zero" if spec.splitquant_range in ("part", "aligned") else "weight_min"


def kernel_zero_range(bits: int) -> tuple[int, int]:
    """The integer zeros ``z`` whose codes ``q - z + 8`` (``q`` in ``0 .. 2**bits - 1``) fit the int4 kernel's
    0..15: a cluster with such a zero is one kernel term (``(q - z) * s``, the kernel's zero at code 8)."""
    return 2**bits - 8, 8


def single_term_clusters(spec: LayerSpec) -> bool:
    """Whether each cluster's grid is ``(q - z) * s`` with every possible zero in :func:`kernel_zero_range`
    (symmetric grids, ``"aligned"``, and ``"part"`` up to 3 bits, whose zeros lie in ``0 .. 2**bits - 1``)."""
    if spec.symmetric or spec.splitquant_range == "aligned":
        return True
    return spec.splitquant_range == "part" and spec.bits <= 3


def unpack_clusters(packed: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return unpack_trits(packed.reshape(spec.out_features, trit_row_bytes(spec.in_features)), spec.in_features)


def dequantize(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    codes = rtn.unpack(tensors["weight"], spec)
    # every base-3 digit of a byte is 0..2, so the ids are in range whatever the bytes (a byte above 242 is
    # refused at load, `invalid_values`): no per-call check, which would also break a compiled graph
    ids = unpack_clusters(tensors["weight_cluster"], spec)
    out_f, in_f = codes.shape
    g = in_f if spec.group_size is None or spec.group_size >= in_f else spec.group_size
    if NUM_CLUSTERS * 2**spec.bits <= g:
        return _dequantize_by_level_table(tensors, spec, codes, ids, g, dtype)
    # Wide codes (the table would outgrow the weights): one flat gather per grid parameter, element (r, c)
    # reads entry (cluster, group) of row r.
    groups = tensors["weight_scale"].shape[-1]
    index = ids.long() * groups + (torch.arange(in_f, device=codes.device) // g)

    def per_element(params: torch.Tensor) -> torch.Tensor:  # [3, out, groups] -> [out, in]
        return torch.gather(params.float().permute(1, 0, 2).reshape(out_f, -1), 1, index)

    q = codes.float()
    if "weight_min" in tensors:
        w = q.mul_(per_element(tensors["weight_scale"])).add_(per_element(tensors["weight_min"]))
    elif "weight_zero" in tensors:
        w = q.sub_(per_element(tensors["weight_zero"])).mul_(per_element(tensors["weight_scale"]))
    else:
        w = q.sub_(2 ** (spec.bits - 1)).mul_(per_element(tensors["weight_scale"]))
    return w.to(dtype)


def level_table(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
    """Every value a weight of each row and group can take: ``[out, groups, 3 * 2**bits]``, entry
    ``cluster * 2**bits + code``, computed with the same float32 operations as a per-weight dequantize (so
    the result is bit-identical) and then cast to ``dtype``."""
    levels = torch.arange(2**spec.bits, dtype=torch.float32, device=tensors["weight_scale"].device)

    def per_cluster(params: torch.Tensor) -> torch.Tensor:  # [3, out, groups] -> [out, groups, 3, 1]
        return params.float().permute(1, 2, 0).contiguous().unsqueeze(-1)

    scale = per_cluster(tensors["weight_scale"])
    if "weight_min" in tensors:
        table = levels * scale + per_cluster(tensors["weight_min"])
    elif "weight_zero" in tensors:
        table = (levels - per_cluster(tensors["weight_zero"])) * scale
    else:
        table = (levels - 2 ** (spec.bits - 1)) * scale
    out_f, groups = table.shape[0], table.shape[1]
    return table.to(dtype).reshape(out_f, groups, NUM_CLUSTERS * 2**spec.bits)


def _dequantize_by_level_table(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, codes: torch.Tensor,
                               ids: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    # A group's 3 grids hold at most 3 * 2**bits values: look each weight up in its group's small table
    # (one gather on 1-byte indices) instead of gathering a scale and an offset per weight and computing.
    out_f, in_f = codes.shape
    table = level_table(tensors, spec, dtype)
    groups = table.shape[1]
    index = ids.mul_(2**spec.bits).add_(codes)  # uint8: < 3 * 2**bits <= 48
    if groups * g != in_f:  # a partial last group: pad it with index 0 (a valid entry), cut after
        index = torch.nn.functional.pad(index, (0, groups * g - in_f))
    w = torch.gather(table, 2, index.view(out_f, groups, g).long())
    return w.reshape(out_f, groups * g)[:, :in_f]


def int4_parts(tensors: Mapping[str, torch.Tensor], spec: LayerSpec, codes: torch.Tensor) -> list[Int4Term]:
    """The int4-kernel terms: one per cluster where its grid is ``(q - z) * s`` with a zero the kernel's codes
    reach (:func:`single_term_clusters`), else two per cluster: its codes (others at the kernel's zero) and
    its grid offset (a 0/1 mask).

    One term: code ``q - z + 8`` for members, 8 (the kernel's zero) for the rest. Two terms: a member of
    cluster ``c`` is ``q * s_c + o_c``; written ``(q - h) * s_c + (o_c + h * s_c)`` with ``h = 2^(bits-1)``
    the code term stays centred and the mask term carries the cluster's centre.
    """
    cols = spec.in_features
    ids = unpack_clusters(tensors["weight_cluster"], spec)
    h = 2 ** (spec.bits - 1)
    single = single_term_clusters(spec)
    terms = []
    for c in range(NUM_CLUSTERS):
        member = ids == c
        scale = expand_params(tensors["weight_scale"][c].float(), cols, spec.group_size)
        zeros = torch.zeros_like(scale)
        if single:
            zero = (expand_params(tensors["weight_zero"][c].float(), cols, spec.group_size).round().to(torch.int32)
                    if "weight_zero" in tensors else h)
            code = torch.where(member, codes.to(torch.int32) - zero + 8, 8)
            if bool(((code < 0) | (code > 15)).any()):
                raise ValueError(f"SplitQuant zero points outside {kernel_zero_range(spec.bits)} for a "
                                 f"{spec.bits}-bit {spec.splitquant_range!r} layer: the checkpoint is corrupt")
            terms.append((code, scale, zeros))
            continue
        if "weight_min" in tensors:
            offset = expand_params(tensors["weight_min"][c].float(), cols, spec.group_size)
        elif "weight_zero" in tensors:
            offset = -expand_params(tensors["weight_zero"][c].float(), cols, spec.group_size) * scale
        else:
            offset = -h * scale
        code = torch.where(member, codes.to(torch.int32) - h + 8, 8)
        terms.append((code, scale, zeros))
        terms.append((torch.where(member, 9, 8), offset + h * scale, zeros))
    return terms


class SplitQuantFormat(QuantFormat):
    """SplitQuant: per-weight cluster ids and one grid per cluster (lower / middle / upper)."""

    name = "splitquant"
    spec_fields = ("splitquant_range",)
    refits_clusters = True
    tensor_roles = QuantFormat.tensor_roles | {"weight_min": "minimums", "weight_cluster": "cluster_ids"}

    # the module's functions are the format's implementation
    tensor_shapes = staticmethod(tensor_shapes)
    quantize = staticmethod(quantize)
    dequantize = staticmethod(dequantize)
    element_grid = staticmethod(element_grid)
    pack_grid_codes = staticmethod(pack_grid_codes)
    def element_param_index(self, state: Mapping[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
        # one plane of [out, groups] parameters per cluster
        ids = unpack_trits(state["weight_cluster"].reshape(spec.out_features, -1), spec.in_features).long()
        plane = spec.out_features * num_groups(spec.in_features, spec.group_size)
        return ids * plane + super().element_param_index(state, spec).to(ids.device)

    def invalid_values(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec) -> tuple[str, str] | None:
        clusters = tensors["weight_cluster"]
        if clusters.numel() and int(clusters.max()) > 3**5 - 1:
            return "weight_cluster", "holds bytes that are not five base-3 cluster ids"
        zero = tensors.get("weight_zero")
        if spec.splitquant_range == "aligned" and zero is not None and zero.numel():
            low, high = kernel_zero_range(spec.bits)
            if int(zero.min()) < low or int(zero.max()) > high:
                return "weight_zero", f"holds zero points outside {low}..{high} for {spec.bits}-bit aligned grids"
            return super().invalid_values({k: v for k, v in tensors.items() if k != "weight_zero"}, spec)
        return super().invalid_values(tensors, spec)

    def int4_terms(self, spec: LayerSpec) -> int:
        return NUM_CLUSTERS if single_term_clusters(spec) else 2 * NUM_CLUSTERS

    def int4_unsupported(self, spec: LayerSpec) -> str | None:
        if spec.bits > 4:
            return f"{spec.bits}-bit SplitQuant would take 12 kernel calls; the dequantize path is faster"
        return None

    def int4_parts(self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, codes: torch.Tensor,
                   group: int) -> list[Int4Term]:
        return int4_parts(tensors, spec, codes)

    def int4_codes(self, terms: list[Int4Term], tensors: Mapping[str, torch.Tensor], spec: LayerSpec,
                   group: int) -> torch.Tensor | None:
        return None  # the terms hold each cluster's codes apart: the stored codes stay next to them
