"""``PackedLinear``: a Linear layer whose weight lives as packed low-bit codes.

The packed tensors are persistent buffers named after the float weight (``weight``,
``weight_scale``, ...), so ``save_pretrained`` writes them under the float layer's keys and
``from_pretrained`` routes them back. The forward pass goes through :mod:`hf_splitquant.kernels`: the int4
CPU kernel (as one or more terms) for RTN/OCS and 2-4 bit SplitQuant layers at up to 128 tokens per
call, else dequantize (to bf16 on the fast path, to the input's dtype on the reference path) and
``F.linear``. The dequantized weight can also be
cached (``cache_dequantized``) to trade memory for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
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
        #: ``None`` follows :func:`hf_splitquant.kernels.set_kernel_mode`; or "auto"/"fast"/"reference".
        self.kernel_mode: str | None = None
        self._cached: torch.Tensor | None = None
        self._int4: kernels.Int4Layout | None = None
        self._int4_ok: tuple[torch.device, bool, int] | None = None

    @classmethod
    def from_packed(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedLinear:
        """A layer holding already packed ``tensors`` (moved to ``device``) and a copy of the float ``bias``.

        ``dtype`` is the bias dtype (default: ``bias``'s own, else float32).
        """
        if bool(spec.has_bias) != (bias is not None):
            raise ValueError(f"the spec says has_bias={spec.has_bias} but bias is {'missing' if bias is None else 'given'}")
        dtype = dtype or (bias.dtype if bias is not None else None)
        module = cls(spec, device=device, dtype=dtype)
        module.load_packed({k: v.to(device) if device is not None else v for k, v in tensors.items()})
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec,
                   seed: int = 0) -> PackedLinear:
        """Quantize a float ``[out, in]`` weight (and keep ``bias`` in float) into a new module."""
        packed = quantize_weight(weight.detach(), spec, seed=seed)
        return cls.from_packed(spec, packed, bias, device=weight.device,
                               dtype=bias.dtype if bias is not None else weight.dtype)

    def set_weight_cache(self, enabled: bool) -> None:
        """Keep the dequantized weight between calls (many forward passes over a fixed layer, e.g. while
        calibrating the next layers); turning it off frees the cached copy."""
        self.cache_dequantized = bool(enabled)
        if not enabled:
            self._cached = None

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
        self._int4 = None

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer computes with."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_weight(self.packed_tensors(), self.spec, dtype)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self._cached = None
        self._int4 = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # moving or casting the module invalidates derived layouts
        self._cached = None
        self._int4 = None
        self._int4_ok = None
        stored = self.packed_tensors()
        result = super()._apply(fn, recurse)
        # `model.to(torch.bfloat16)` / `.half()` cast the bias, but the packed grid parameters keep
        # the dtype the format stores (a lossy cast would change the weights); devices do follow
        for name, old in stored.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return result

    def kernel_for(self, x: torch.Tensor) -> str:
        """The path this input takes: ``"int4"``, ``"dequant-bf16"`` or ``"reference"``."""
        mode = self.kernel_mode or kernels.get_kernel_mode()
        if mode == "reference" or (x.requires_grad and torch.is_grad_enabled()):
            return "reference"
        if self._int4_ok is None or self._int4_ok[0] != x.device:  # the spec's answer, once per device
            self._int4_ok = (x.device, kernels.int4_reason(self.spec, x.device) is None,
                             kernels.int4_max_tokens(self.spec))
        _, ok, max_tokens = self._int4_ok
        if ok and kernels.tokens_of(x) <= max_tokens:
            return "int4"
        return "dequant-bf16" if kernels.wants_fast_path(mode, x) else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.kernel_for(x)
        if path == "int4":
            layout = self._int4
            if layout is None:
                layout = self._int4 = kernels.build_int4_layout(self.spec, self.packed_tensors())
            if layout is not None:
                return kernels.int4_linear(x, layout, self.bias)
            self._int4_ok = (x.device, False, 0)  # these tensors have no int4 form: dequantize from now on
            path = "dequant-bf16" if kernels.wants_fast_path(self.kernel_mode or kernels.get_kernel_mode(), x) \
                else "reference"
        if path == "dequant-bf16":
            weight = self._dequantized(torch.bfloat16, x.device)
            bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
            return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)
        weight = self._dequantized(x.dtype, x.device)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def _dequantized(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.cache_dequantized:
            if self._cached is None or self._cached.dtype != dtype or self._cached.device != device:
                self._cached = self.dequantize_weight(dtype).to(device)
            return self._cached
        return self.dequantize_weight(dtype)

    def __str__(self) -> str:
        # What a message that formats one layer shows (print(model) uses repr, unchanged). peft names the
        # layer it cannot wrap this way ("Target module {layer} is not supported") and has no public way to
        # learn about PackedLinear, so the layer itself says where the LoRA entry points are.
        return (f"{self!r} [hf_splitquant packed layer; for LoRA use hf_splitquant.get_packed_peft_model(model, "
                "lora_config), and hf_splitquant.load_packed_adapter(model, adapter_dir) to load an adapter]")

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"group_size={s.group_size}"
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, {group}, "
                f"transform={s.transform}, symmetric={s.symmetric}, bias={s.has_bias}")
