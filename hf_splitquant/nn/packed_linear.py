"""``PackedLinear``: a Linear layer whose weight lives as packed low-bit codes.

The packed tensors are persistent buffers named after the float weight (``weight``,
``weight_scale``, ...), so ``save_pretrained`` writes them under the float layer's keys and
``from_pretrained`` routes them back. The forward pass dequantizes to the input's dtype and calls
``F.linear``; the dequantized weight can be cached (``cache_dequantized``) to trade memory for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import dequantize_weight, quantize_weight, tensor_shapes
from ..spec import LayerSpec

__all__ = ["PackedLinear"]


class PackedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` with ``W`` stored packed as described by ``spec``.

    Args:
        spec: the layer's :class:`~hf_splitquant.spec.LayerSpec`.
        device: where to allocate the (empty) packed buffers; ``"meta"`` for a loading skeleton.
        dtype: dtype of the float bias.
    """

    def __init__(self, spec: LayerSpec, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for name, (shape, buf_dtype) in tensor_shapes(spec).items():
            self.register_buffer(name, torch.empty(shape, dtype=buf_dtype, device=device), persistent=True)
        if spec.has_bias:
            self.bias = nn.Parameter(torch.empty(spec.out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache_dequantized = False
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec,
                   seed: int = 0) -> PackedLinear:
        """Quantize a float ``[out, in]`` weight (and keep ``bias`` in float) into a new module."""
        packed = quantize_weight(weight.detach(), spec, seed=seed)
        module = cls(spec, device=weight.device, dtype=bias.dtype if bias is not None else weight.dtype)
        module.load_packed(packed)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias.detach())
        return module

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, keyed by state-dict suffix."""
        return {name: getattr(self, name) for name in tensor_shapes(self.spec)}

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the packed buffers (shapes and dtypes must match the spec)."""
        for name, (shape, buf_dtype) in tensor_shapes(self.spec).items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != buf_dtype:
                raise ValueError(
                    f"packed tensor `{name}` has shape {tuple(t.shape)} / {t.dtype}, expected {shape} / {buf_dtype}"
                )
            self._buffers[name] = t
        self._cached = None

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer computes with."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_weight(self.packed_tensors(), self.spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            if self._cached is None or self._cached.dtype != x.dtype or self._cached.device != x.device:
                self._cached = self.dequantize_weight(x.dtype).to(x.device)
            weight = self._cached
        else:
            weight = self.dequantize_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"group_size={s.group_size}"
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, {group}, "
                f"transform={s.transform}, symmetric={s.symmetric}, bias={s.has_bias}")
