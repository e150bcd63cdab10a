"""``PackedLinear``: a Linear layer whose weight lives as packed low-bit codes.

The packed tensors are persistent buffers named after the float weight (``weight``,
``weight_scale``, ...), so ``save_pretrained`` writes them under the float layer's keys and
``from_pretrained`` routes them back. The forward pass goes through :mod:`hf_splitquant.kernels`: the int4
CPU kernel (as one or more terms) for RTN/OCS and 2-4 bit SplitQuant layers at up to 128 tokens per
call, else dequantize (to bf16 on the fast path, to the input's dtype on the reference path) and
``F.linear``. The dequantized weight can also be
cached (``cache_dequantized``) to trade memory for speed.

Once the int4 layout exists the stored codes are not kept twice: where the codes read back from the
layout equal the stored ones (checked when the layout is built), the ``weight`` buffer is dropped and
rebuilt from the layout whenever it is needed (``state_dict`` / ``save_pretrained``, the dequantize
paths, ``.to()``), so a layer holds its kernel layout plus the small grid tensors. Set
``PackedLinear.keep_stored_codes = True`` (class-wide or per layer) to keep both.

A layer whose spec has ``input_rotation`` stores the codes of ``W R`` (:mod:`hf_splitquant.quant.rotation`):
its forward multiplies the input by ``R`` (one small batched matmul) and then runs the same paths;
:meth:`PackedLinear.dequantize_weight` gives the weight in the layer's own input basis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..methods import dequantize_weight, quantize_weight, tensor_shapes
from ..quant.rotation import hadamard, rotate_layer_input
from ..spec import LayerSpec

__all__ = ["PackedLinear", "SiblingGroup", "stack_siblings"]


class PackedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` with ``W`` stored packed as described by ``spec``.

    Attributes:
        keep_stored_codes: keep the stored codes next to the int4 layout (default ``False``: they are
            dropped once the layout is built and verified to give them back exactly).

    Args:
        spec: the layer's :class:`~hf_splitquant.spec.LayerSpec`.
        device: where to allocate the (empty) packed buffers; ``"meta"`` for a loading skeleton.
        dtype: dtype of the float bias.
    """

    keep_stored_codes: bool = False

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
        self._rotation: torch.Tensor | None = None  # H_b in the dtype/device of the last input
        self._siblings: SiblingGroup | None = None  # layers sharing this one's input and stacked int4 call
        self._sibling_index = 0
        #: lets a compiled forward run the eager dequantize as one operator (None: the compiled code is good)
        self._dequantize_key = kernels.dequantize_key(spec)

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
        """The stored tensors, keyed by state-dict suffix (read back from the int4 layout where they were
        dropped)."""
        tensors = {name: self._buffers[name] for name in tensor_shapes(self.spec)}
        if any(t is None for t in tensors.values()):
            tensors = self._from_layout(tensors)
        return tensors

    @property
    def codes_dropped(self) -> bool:
        """Whether the stored tensors (the codes, and where the format can, the grid) live only in the int4
        layout (read back from it when needed)."""
        return self._buffers.get("weight", 0) is None

    def _from_layout(self, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        layout = self._int4
        tensors = dict(tensors)
        if layout is not None and layout.residual is not None and any(
                tensors.get(name) is None for name in tensor_shapes(self.spec) if name != "weight"):
            tensors.update(kernels.int4_grid_tensors(self.spec, layout, layout.residual))
        codes = kernels.int4_stored_codes(self.spec, layout, tensors) if layout is not None else None
        if codes is None or any(t is None for name, t in tensors.items() if name != "weight"):
            # cannot happen: tensors are dropped only after this very read-back matched them
            raise RuntimeError("hf_splitquant: the stored tensors of this layer were dropped but cannot be read back "
                               "from its int4 layout; please report this bug")
        tensors["weight"] = codes
        return tensors

    def restore_stored_codes(self) -> None:
        """Put the stored tensors back into their buffers (no-op when they are there)."""
        if self.codes_dropped:
            self._buffers.update(self._from_layout({n: self._buffers[n] for n in tensor_shapes(self.spec)}))
            self._int4.residual = None

    def _drop_stored_codes(self) -> None:
        """Drop the stored codes (and the grid tensors, kept compact) if the int4 layout gives them back exactly."""
        layout = self._int4
        if self.keep_stored_codes or layout is None or self.codes_dropped:
            return
        tensors = self.packed_tensors()
        if tensors["weight"].device.type != "cpu":
            return
        back = kernels.int4_stored_codes(self.spec, layout, tensors)
        if back is None or not torch.equal(back, tensors["weight"]):
            return
        residual = kernels.int4_grid_residual(self.spec, layout, tensors)
        grid_names = [name for name in tensors if name != "weight"]
        if residual is not None:
            grid = kernels.int4_grid_tensors(self.spec, layout, residual)
            if set(grid) == set(grid_names) and all(torch.equal(grid[n], tensors[n]) for n in grid_names):
                layout.residual = residual
                for name in grid_names:
                    self._buffers[name] = None
        self._buffers["weight"] = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
        if not self.codes_dropped:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # the state dict holds the stored tensors, read back from the layout, in their usual places
        names = [n for n in tensor_shapes(self.spec) if self._buffers[n] is None]
        self._buffers.update(self._from_layout({n: self._buffers[n] for n in tensor_shapes(self.spec)}))
        try:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            for name in names:
                self._buffers[name] = None

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
        self._int4 = None  # the codes are in the buffers again

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer computes with (on its own, unrotated inputs)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_weight(self.packed_tensors(), self.spec, dtype)

    def prepare_rotation(self, device: torch.device | str | None = None) -> None:
        """Build the (float32) rotation matrix on ``device`` now (no-op without ``input_rotation``), so a compiled
        step finds it instead of creating it while tracing."""
        if self.spec.input_rotation is not None:
            self._rotation = hadamard(self.spec.input_rotation, torch.float32, self.device if device is None else device)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` for a rotated layer (module docstring), else ``x``."""
        block = self.spec.input_rotation
        if block is None:
            return x
        h = self._rotation
        if h is None or h.device != x.device:
            h = self._rotation = hadamard(block, torch.float32, x.device)
        return rotate_layer_input(x, block, h)

    def _dissolve_siblings(self) -> None:
        if self._siblings is not None:
            self._siblings.dissolve()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self._dissolve_siblings()
        self.restore_stored_codes()  # a buffer to load into (and the right codes if the key is missing)
        self._cached = None
        self._int4 = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # moving or casting the module invalidates derived layouts (the codes move with the module)
        self._dissolve_siblings()
        self.restore_stored_codes()
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

    @property
    def device(self) -> torch.device:
        """Where this layer's tensors live (the int4 layout's device once the stored codes were dropped)."""
        if self._int4 is not None:
            return self._int4.weight.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def prepare_int4(self, device: torch.device | str | None = None) -> bool:
        """Build the int4 kernel layout now (it is otherwise built on the first call with few tokens) and
        return whether this layer runs on it on ``device`` (default: where its tensors are).

        :func:`hf_splitquant.compile_for_decoding` calls it so a compiled decoding step never traces the
        one-time conversion.
        """
        device = self.device if device is None else torch.device(device)
        if kernels.int4_reason(self.spec, device) is not None:
            self._int4_ok = (device, False, 0)
            return False
        if self._built_layout() is None:
            self._int4_ok = (device, False, 0)
            return False
        self._int4_ok = (device, True, kernels.int4_max_tokens(self.spec))
        return True

    def _built_layout(self) -> kernels.Int4Layout | None:
        """The int4 layout, built on first use (then the stored codes it gives back exactly are dropped);
        ``None`` when these tensors have no int4 form."""
        if self._int4 is None:
            self._int4 = kernels.build_int4_layout(self.spec, self.packed_tensors())
            self._drop_stored_codes()
        return self._int4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The decoding fast path: the layout exists and was accepted for this device; only what can change
        # per call is checked (mode, gradients, tokens), the rest of `kernel_for` was answered once.
        layout, ok = self._int4, self._int4_ok
        fast = (layout is not None and ok is not None and ok[1] and (self.kernel_mode or kernels._mode) != "reference"
                and not (x.requires_grad and torch.is_grad_enabled()) and kernels.tokens_of(x) <= ok[2]
                and ok[0] == x.device)
        if fast and self._siblings is not None:
            return self._siblings.output(self, x)
        x = self._rotate(x)  # the codes describe W R (no-op without input_rotation)
        if fast:
            return kernels.int4_linear(x, layout, self.bias)
        path = self.kernel_for(x)
        if path == "int4":
            if self._int4 is None and torch.compiler.is_compiling():
                raise RuntimeError("hf_splitquant: a compiled model reached a packed layer without its int4 layout "
                                   "(the model was moved or reloaded after compiling); call "
                                   "hf_splitquant.compile_for_decoding(model) again")
            layout = self._built_layout()
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
        """The weight of the forward pass: in the stored basis (``W R``: the input was rotated already)."""
        if self.cache_dequantized:
            if self._cached is None or self._cached.dtype != dtype or self._cached.device != device:
                self._cached = dequantize_weight(self.packed_tensors(), self.spec, dtype, stored_basis=True).to(device)
            return self._cached
        return kernels.dequantize_for_forward(self.packed_tensors(), self.spec, dtype, self._dequantize_key)

    def __str__(self) -> str:
        # What a message that formats one layer shows (print(model) uses repr, unchanged). peft names the
        # layer it cannot wrap this way ("Target module {layer} is not supported") and has no public way to
        # learn about PackedLinear, so the layer itself says where the LoRA entry points are.
        return (f"{self!r} [hf_splitquant packed layer; for LoRA use hf_splitquant.get_packed_peft_model(model, "
                "lora_config), and hf_splitquant.load_packed_adapter(model, adapter_dir) to load an adapter]")

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"group_size={s.group_size}"
        rotation = "" if s.input_rotation is None else f", input_rotation={s.input_rotation}"
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, {group}, "
                f"transform={s.transform}, symmetric={s.symmetric}, bias={s.has_bias}{rotation}")


class SiblingGroup:
    """Packed layers that multiply the same input (a block's q/k/v, its gate/up), run as one int4 kernel call.

    The stacked layout comes from :func:`hf_splitquant.kernels.stack_int4_layouts` (each member's own layout
    becomes views into it). The first member called with an input computes every member's output; a member
    called next with the *same tensor* takes its output from there, any other input computes anew, so the
    result never depends on the call order (an input edited in place between the members' calls would not be
    noticed: transformers' attention and MLP blocks never do that). Built by :func:`stack_siblings`
    (``compile_for_decoding`` does it); moving or reloading any member dissolves the group.
    """

    def __init__(self, members: list[PackedLinear], layout: kernels.Int4Layout, bias: torch.Tensor | None) -> None:
        self.members = members
        self.layout = layout
        self.bias = bias
        self.sizes = [m.out_features for m in members]
        self.source: torch.Tensor | None = None  # the input whose outputs wait in `pending`
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, member: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        """``member(x)``, from the stacked call."""
        index = member._sibling_index
        if self.source is x and index in self.pending:
            y = self.pending.pop(index)
            if not self.pending:
                self.source = None  # nothing is held past the last member's call
            return y
        y = kernels.int4_linear(member._rotate(x), self.layout, self.bias)
        parts = [part.contiguous() for part in y.split(self.sizes, dim=-1)]
        self.source = x
        self.pending = {i: part for i, part in enumerate(parts) if i != index}
        return parts[index]

    def dissolve(self) -> None:
        """Every member back to its own calls (its layout stays a view of the stacked one until rebuilt)."""
        for member in self.members:
            member._siblings = None
        self.source, self.pending = None, {}


def stack_siblings(members: list[PackedLinear]) -> bool:
    """Run ``members`` (layers that take the same input) as one stacked int4 call; returns whether it did.

    They must all be on the int4 path already (:meth:`PackedLinear.prepare_int4`) with plain layouts of the same
    kernel group, input width and input rotation, not in a group yet. Biases are stacked as a copy (a bias
    changed later is not seen: call :func:`stack_siblings` again after ``.to()``, which dissolves the group).
    """
    if len(members) < 2 or any(m._siblings is not None or m._int4 is None or not (m._int4_ok and m._int4_ok[1])
                               for m in members):
        return False
    first = members[0]
    if any(m.spec.input_rotation != first.spec.input_rotation or m.in_features != first.in_features
           or m._int4_ok[2] != first._int4_ok[2] for m in members):
        return False
    stacked = kernels.stack_int4_layouts([m._int4 for m in members])
    if stacked is None:
        return False
    layout, views = stacked
    biases = [m.bias for m in members]
    bias = None
    if any(b is not None for b in biases):
        dtype = next(b for b in biases if b is not None).dtype
        bias = torch.cat([b.detach().to(dtype) if b is not None
                          else torch.zeros(m.out_features, dtype=dtype, device=layout.weight.device)
                          for b, m in zip(biases, members)])
    group = SiblingGroup(members, layout, bias)
    for index, (member, view) in enumerate(zip(members, views)):
        member._int4, member._siblings, member._sibling_index = view, group, index
    return True
