"""Packed input embeddings and output heads (``SplitQuantConfig(embedding_bits=...)``).

:class:`PackedEmbedding` stores an ``[vocab, hidden]`` embedding table exactly like a
:class:`~hf_splitquant.nn.packed_linear.PackedLinear` with ``in_features = hidden`` and
``out_features = vocab`` (spec ``source="Embedding"``, round to nearest): the same tensors, checks
and int4 kernel layout. A lookup dequantizes only the gathered rows; used as an output head
(:meth:`PackedEmbedding.linear`, or through :class:`TiedPackedHead` when the model ties its head to
its input embedding) it takes the same int4 kernel path as any packed linear layer, so one packed
tensor serves both.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import kernels
from ..methods import dequantize_weight
from ..quant.packing import packed_row_bytes
from ..spec import LayerSpec
from .packed_linear import PackedLinear

__all__ = ["PackedEmbedding", "TiedPackedHead"]


class PackedEmbedding(PackedLinear):
    """An embedding table ``[num_embeddings, embedding_dim]`` stored packed (RTN) as described by ``spec``.

    ``forward(input_ids)`` looks rows up (dequantizing only those rows); :meth:`linear` computes
    ``x @ table^T`` (an output head) on the int4 kernel path of :class:`PackedLinear`.

    Args:
        spec: a spec with ``source="Embedding"``, ``in_features = embedding_dim``,
            ``out_features = num_embeddings``, ``has_bias=False`` and ``transform="rtn"``.
        device: where to allocate the (empty) packed buffers.
        dtype: dtype of the looked-up rows (the model's dtype).
    """

    def __init__(self, spec: LayerSpec, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if spec.source != "Embedding" or spec.has_bias or spec.transform != "rtn":
            raise ValueError("a PackedEmbedding needs a spec with source='Embedding', has_bias=False and "
                             f"transform='rtn', got source={spec.source!r}, has_bias={spec.has_bias}, "
                             f"transform={spec.transform!r}")
        super().__init__(spec, device=device, dtype=dtype)
        self.num_embeddings = spec.out_features
        self.embedding_dim = spec.in_features
        self._row_dtype = dtype or torch.float32

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the looked-up rows (the model's; follows ``.to(dtype)`` / ``.half()``)."""
        return self._row_dtype

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # a float cast of the model applies to the rows it looks up, not to the packed tensors
        self._row_dtype = fn(torch.empty(0, dtype=self._row_dtype)).dtype
        return super()._apply(fn, recurse)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return super().dequantize_weight(dtype or self.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized table rows ``ids`` (any shape) -> ``[*ids.shape, embedding_dim]``."""
        flat = ids.reshape(-1).long()
        # the range check reads the ids back (a graph break under torch.compile); compiled code checks its
        # gathers' bounds itself
        if flat.numel() and not torch.compiler.is_compiling() and (
                int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        spec = self.spec
        tensors = {name: buf for name, buf in self._buffers.items() if name.startswith("weight")}
        picked = {name: t.index_select(0, flat) for name, t in tensors.items() if name != "weight" and t is not None}
        if len(picked) < len(tensors) - 1:  # the grid lives in the int4 layout too: just these rows
            picked.update(kernels.int4_grid_tensors(spec, self._int4, self._int4.residual, flat))
        if tensors["weight"] is not None:
            codes = tensors["weight"].reshape(spec.out_features, packed_row_bytes(spec.in_features, spec.bits))
            picked["weight"] = codes.index_select(0, flat).reshape(-1)
        else:  # the codes live in the int4 layout only: read back just these rows
            picked["weight"] = kernels.int4_stored_rows(spec, self._int4, picked, flat)
        sub = replace(spec, out_features=max(1, flat.numel()))
        if not flat.numel():
            return torch.empty(*ids.shape, spec.in_features, dtype=dtype or self.dtype, device=ids.device)
        out = dequantize_weight(picked, sub, dtype or self.dtype)
        return out.reshape(*ids.shape, spec.in_features)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.rows(input_ids)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ table^T``: the output head, on :class:`PackedLinear`'s kernel paths."""
        return PackedLinear.forward(self, x)

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"group_size={s.group_size}"
        return f"{s.out_features}, {s.in_features}, bits={s.bits}, {group}, symmetric={s.symmetric}"


class TiedPackedHead(nn.Module):
    """An output head tied to a :class:`PackedEmbedding`: no tensors of its own, ``x @ table^T`` on the
    embedding's packed tensors and int4 layout (so the model holds the table once).

    The embedding is referenced, not registered as a submodule, so the state dict holds the table
    once (under the embedding's keys).
    """

    def __init__(self, embedding: PackedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def embedding(self) -> PackedEmbedding:
        """The packed table this head computes with."""
        return self._embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding.linear(x)

    def extra_repr(self) -> str:
        return f"tied to a PackedEmbedding {self.out_features}x{self.in_features}, bits={self._embedding.spec.bits}"
