"""``FakeQuantLinear``: a Linear layer trained with fake quantization (quantization-aware training).

The layer keeps its float ``weight`` Parameter under the float key and in the float layout
(``[out, in]``, or ``[in, out]`` for a layer that was a GPT-2 ``Conv1D``), so ``Trainer``
checkpoints stay float and resumable. In the forward pass the weight is rounded onto **the same
grid as the packed format** (:func:`hf_splitquant.methods.element_grid`: RTN groups, SplitQuant's
per-cluster grids, OCS's expanded weight folded back), and :meth:`FakeQuantLinear.to_packed` stores
exactly those codes, so a packed layer computes what the fake-quant layer computed (up to float
rounding of ``offset + code * scale`` against ``(code - zero) * scale``).

Two ways to get the grid:

* **Following the weights** (default). The grid is recomputed from the current weights in every
  forward pass. SplitQuant's k-means clusters are cached and re-fitted every
  ``kmeans_refresh_every`` training forward passes (``None``: never after the first fit). Gradients use the straight-through
  estimator: ``w_q = w + (Q(w) - w).detach()``, so ``dL/dw = dL/dw_q`` (``ste="identity"``), or
  zero for weights outside the grid's range (``ste="clipped"``, RTN and SplitQuant; only matters
  once the grid is frozen with :meth:`FakeQuantLinear.freeze_grid`).
* **Learned scales** (``learn_scales=True``, LSQ: Esser et al. 2020). The stored scale tensor
  (``weight_qat_scale``, same shape as the packed ``weight_scale``) and, for SplitQuant's
  ``"cluster"`` grids, the grid origins (``weight_qat_min``) become Parameters initialised from the
  min-max grid. ``w_q = (clamp(round_ste(w / s + z), 0, max) - z) * s`` (or ``q * s + min``):
  autograd then gives LSQ's scale gradient, scaled by ``1 / sqrt(n * max_code)``
  (``lsq_grad_scale``). Integer zero points, SplitQuant clusters and OCS channel choices are fixed
  when the scales are initialised. Scales and origins are rounded to the storage dtype in the
  forward pass (straight-through), so the packed layer matches exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import element_grid, get_format, pack_grid_codes
from ..quant.grid import ElementGrid
from ..quant.rotation import rotate_inputs
from ..spec import LayerSpec

__all__ = ["FakeQuantLinear", "STE_MODES"]

STE_MODES = ("identity", "clipped")
_MIN_SCALE = 1e-6


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back in the forward pass, identity in the backward pass."""
    return x + (x.detach().to(dtype).float() - x.detach())


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    return (x - x * factor).detach() + x * factor


class FakeQuantLinear(nn.Module):
    """A Linear-like layer whose weight is fake-quantized onto the packed format's grid.

    Args:
        spec: the layer's :class:`~hf_splitquant.spec.LayerSpec` (bits, groups, transform, source).
        weight: the float weight in the source layout (``[out, in]``; ``[in, out]`` for ``Conv1D``).
        bias: the float bias or ``None``.
        seed: SplitQuant's k-means seed.
        learn_scales: learn the grid scales (LSQ) instead of following the weights' ranges.
        kmeans_refresh_every: SplitQuant: re-fit the clusters after this many training forward
            passes (``None``: keep the first fit). Ignored with ``learn_scales``.
        ste: ``"identity"`` or ``"clipped"`` straight-through estimator (grid-following mode).
        lsq_grad_scale: scale LSQ's scale gradients by ``1 / sqrt(group elements * max_code)``.
        init_state: learned scales only, RTN format: start from these stored grid tensors
            (``weight_scale``, ``weight_zero``: a packed layer's, e.g. a calibrated post-training
            result) instead of the min-max grid of ``weight``.
    """

    def __init__(self, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None = None, seed: int = 0,
                 learn_scales: bool = False, kmeans_refresh_every: int | None = 100, ste: str = "identity",
                 lsq_grad_scale: bool = True, init_state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        expected = (spec.in_features, spec.out_features) if spec.source == "Conv1D" else (
            spec.out_features, spec.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, the spec ({spec.source}) needs {expected}")
        if ste not in STE_MODES:
            raise ValueError(f"`ste` must be one of {STE_MODES}, got {ste!r}")
        self.format = get_format(spec)
        if ste == "clipped" and not self.format.supports_clipped_ste:
            raise ValueError(f"ste='clipped' is not available for {spec.transform} (a weight's copies sit on "
                             "different grid positions); use ste='identity'")
        if ste == "clipped" and spec.input_rotation is not None:
            raise ValueError("ste='clipped' is not available for a layer with input_rotation (its grid bounds hold "
                             "for the rotated weight W R, not for each weight); use ste='identity'")
        if kmeans_refresh_every is not None and (not isinstance(kmeans_refresh_every, int) or kmeans_refresh_every < 1):
            raise ValueError(f"`kmeans_refresh_every` must be a positive integer or None, got {kmeans_refresh_every!r}")
        if bool(spec.has_bias) != (bias is not None):
            raise ValueError(f"the spec says has_bias={spec.has_bias} but bias is {'missing' if bias is None else 'given'}")
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=True)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=True)
        else:
            self.register_parameter("bias", None)
        self.seed = int(seed)
        self.learn_scales = bool(learn_scales)
        self.kmeans_refresh_every = kmeans_refresh_every
        self.ste = ste
        self.lsq_grad_scale = bool(lsq_grad_scale)
        self.fake_quant_enabled = True
        self._scales_started = False  # learned scales follow the weights until fake quantization first starts
        self.grid_frozen = False
        self._cache: dict[Any, torch.Tensor] = {}
        self._grid: ElementGrid | None = None
        self._updates = 0  # training forward passes (the k-means refresh clock)
        self._kmeans_update = 0
        self._ocs_order: list[int] | None = None
        self._lsq: dict[str, Any] | None = None
        if init_state is not None and not (self.learn_scales and self.format.name == "rtn"):
            raise ValueError("`init_state` (a packed layer's scales to start from) needs learn_scales=True and the "
                             f"RTN format; this layer is {spec.transform or 'rtn'} with learn_scales={learn_scales}")
        if self.learn_scales:
            self.reset_scales(register=True, init_state=init_state)

    # ----------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec, **kwargs: Any) -> FakeQuantLinear:
        """Wrap an ``nn.Linear`` or ``Conv1D`` (its weight and bias are copied)."""
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return cls(spec, module.weight.detach(), bias, **kwargs).to(module.weight.device)

    def float_weight(self) -> torch.Tensor:
        """The ``[out, in]`` float weight (a view; differentiable)."""
        return self.weight.t() if self.spec.source == "Conv1D" else self.weight

    # ----------------------------------------------------------------------------------------
    # grids (weight-following mode)
    # ----------------------------------------------------------------------------------------

    def current_grid(self) -> ElementGrid:
        """The grid of the current weights (recomputed at every call unless frozen).

        Recomputing is O(weights), like reading the weight for the matmul. Caching on the Parameter's
        version counter is not safe: fused optimizers (``adamw_torch_fused``, the Trainer's default)
        update weights in place without bumping it.
        """
        if self._grid is not None and self.grid_frozen:
            return self._grid
        if (self.format.refits_clusters and self.kmeans_refresh_every is not None
                and self._updates - self._kmeans_update >= self.kmeans_refresh_every):
            self._cache.clear()
            self._kmeans_update = self._updates
        self._grid = element_grid(self.float_weight().detach().float(), self.spec, seed=self.seed, cache=self._cache)
        return self._grid

    def freeze_grid(self) -> None:
        """Stop following the weights: keep the current grid (scales, zero points, clusters, OCS
        channel choices) for the rest of training and for :meth:`to_packed`."""
        if self.learn_scales:
            return  # learned scales are already independent of the weights
        self.current_grid()
        self._ocs_order = self.format.channel_order(self.float_weight().detach().float(), self.spec)
        self.grid_frozen = True

    def unfreeze_grid(self) -> None:
        self.grid_frozen = False

    def set_fake_quant(self, enabled: bool) -> None:
        """Turn fake quantization on or off (off: the layer computes in float). Turning it on for the
        first time re-initialises learned scales from the current weights."""
        if enabled and not self.fake_quant_enabled and self.learn_scales and not self._scales_started:
            self.reset_scales()
        if enabled:
            self._scales_started = True
        self.fake_quant_enabled = bool(enabled)

    def _expanded(self, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The weight the codes describe with the fixed channel choices (differentiable in ``w``; ``W R`` for
        a rotated layer)."""
        if self.spec.input_rotation is not None:
            w = rotate_inputs(w.float(), self.spec.input_rotation)
        return self.format.expand_weight(w, self.spec, scale, self._ocs_order)

    def _folded(self, w_q: torch.Tensor, input_index: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`_expanded`: the ``[out, in]`` weight computing what the codes' weight computes."""
        w_q = self.format.fold_weight(w_q, input_index, self.spec)
        if self.spec.input_rotation is not None:
            w_q = rotate_inputs(w_q, self.spec.input_rotation)
        return w_q

    # ----------------------------------------------------------------------------------------
    # learned scales (LSQ)
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_scales(self, register: bool = False, init_state: dict[str, torch.Tensor] | None = None) -> None:
        """(Re)initialise the learned scales from the grid of the current weights (min-max, or the
        MSE-clipped grid with ``spec.clip="mse"``), or from ``init_state`` (a packed RTN layer's
        ``weight_scale`` / ``weight_zero``), and fix the zero points, SplitQuant clusters and OCS
        channel choices they belong to."""
        w = self.float_weight().detach().float()
        spec = self.spec
        self._cache.clear()
        self._ocs_order = self.format.channel_order(w, spec)
        grid = element_grid(w, spec, seed=self.seed, cache=self._cache)
        state = dict(grid.state)
        if init_state is not None:
            for key in state:
                if key not in init_state or init_state[key].shape != state[key].shape:
                    raise ValueError(f"`init_state` lacks `{key}` of shape {tuple(state[key].shape)} for this layer")
                state[key] = init_state[key].to(device=w.device, dtype=state[key].dtype)
        scale = state["weight_scale"].float()
        cols = grid.weight.shape[1]
        gsize = cols if spec.group_size is None or spec.group_size >= cols else spec.group_size
        zero = state.get("weight_zero")
        grouped = (self.format.name == "rtn" and cols % gsize == 0 and grid.input_index is None
                   and tuple(scale.shape) == (w.shape[0], cols // gsize))
        if grouped:
            # plain groups of equal size: broadcast [out, groups, 1] parameters over the weight viewed as
            # [out, groups, size] (no per-element index: far less memory and time on large layers)
            index = None
            offset_codes = zero.float().unsqueeze(-1) if zero is not None else (
                torch.full((1, 1, 1), float(2 ** (spec.bits - 1)), device=w.device) if spec.symmetric else None)
        else:
            # each element's entry in the flattened grid parameters ([out, groups], or per plane)
            index = self.format.element_param_index(state, spec).to(w.device)
            offset_codes = None
            if zero is not None:
                offset_codes = zero.float().reshape(-1)[index]
            elif spec.symmetric:
                offset_codes = torch.full(index.shape, float(2 ** (spec.bits - 1)), device=w.device)
        self._lsq = {
            "grouped": grouped,
            "index": index,
            "offset_codes": offset_codes,
            "fixed": {k: v for k, v in state.items() if k not in ("weight_scale", "weight_min")},
            "input_index": grid.input_index,
            "elements": gsize,
        }
        minimum = state.get("weight_min")
        if register:
            self.weight_qat_scale = nn.Parameter(scale.clone())
            if minimum is not None:
                self.weight_qat_min = nn.Parameter(minimum.float().clone())
            else:
                self.register_parameter("weight_qat_min", None)
        else:
            self.weight_qat_scale.copy_(scale)
            if minimum is not None:
                self.weight_qat_min.copy_(minimum.float())

    def _lsq_quantize(self, w: torch.Tensor, hard: bool = False):  # noqa: ANN202
        """Learned-scale fake quantization of the ``[out, in]`` weight.

        Returns ``(w_q [out, in] float32, codes [out, cols] uint8, stored state)``; ``hard`` skips
        the straight-through bookkeeping (used for packing).
        """
        spec, lsq = self.spec, self._lsq
        dtype = spec.torch_scale_dtype
        max_code = 2**spec.bits - 1
        s = self.weight_qat_scale.float().clamp_min(_MIN_SCALE)
        if self.lsq_grad_scale and not hard:
            s = _grad_scale(s, 1.0 / math.sqrt(lsq["elements"] * max_code))
        s = _cast_ste(s, dtype)
        if lsq.get("grouped"):
            return self._lsq_quantize_grouped(w, s, hard)
        index = lsq["index"].to(s.device)
        offset_codes = lsq["offset_codes"].to(s.device) if lsq["offset_codes"] is not None else None
        s_e = s.reshape(-1)[index]
        m_e = None
        if self.weight_qat_min is not None:
            m = _cast_ste(self.weight_qat_min.float(), dtype)
            m_e = m.reshape(-1)[index]
        w = self._expanded(w.float(), s.detach())
        if m_e is not None:
            v = (w - m_e) / s_e
        else:
            v = w / s_e + offset_codes
        codes = torch.clamp(torch.round(v.detach()), 0, max_code)
        q = codes if hard else torch.clamp(_round_ste(v), 0, max_code)
        w_q = q * s_e + m_e if m_e is not None else (q - offset_codes) * s_e
        index = lsq["input_index"]
        w_q = self._folded(w_q, index.to(w_q.device) if index is not None else None)
        state = dict(lsq["fixed"])
        state["weight_scale"] = s.detach().to(dtype)
        if m_e is not None:
            state["weight_min"] = self.weight_qat_min.detach().float().to(dtype)
        return w_q, codes.to(torch.uint8), state

    def _lsq_quantize_grouped(self, w: torch.Tensor, s: torch.Tensor, hard: bool):  # noqa: ANN202
        """:meth:`_lsq_quantize` for plain RTN groups (the same arithmetic, broadcast per group)."""
        spec, lsq = self.spec, self._lsq
        max_code = 2**spec.bits - 1
        out, groups = s.shape
        s_g = s.unsqueeze(-1)
        offset = lsq["offset_codes"].to(s.device)
        v = self._expanded(w.float(), None).reshape(out, groups, -1) / s_g + offset
        codes = torch.clamp(torch.round(v.detach()), 0, max_code)
        q = codes if hard else torch.clamp(_round_ste(v), 0, max_code)
        w_q = self._folded(((q - offset) * s_g).reshape(out, -1), None)
        state = dict(lsq["fixed"])
        state["weight_scale"] = s.detach().to(spec.torch_scale_dtype)
        return w_q, codes.reshape(out, -1).to(torch.uint8), state

    # ----------------------------------------------------------------------------------------
    # forward and packing
    # ----------------------------------------------------------------------------------------

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized ``[out, in]`` float32 weight (differentiable by the STE / LSQ)."""
        w = self.float_weight()
        if self.learn_scales:
            return self._lsq_quantize(w)[0]
        grid = self.current_grid()
        wf = w.float()
        expanded = self._expanded(wf, grid.state["weight_scale"]) if self.grid_frozen else grid.weight
        deq = self._folded(grid.values(grid.nearest_codes(expanded.detach())), grid.input_index)
        if self.ste == "clipped":
            low = grid.offset - grid.scale / 2
            high = grid.offset + grid.scale * (grid.max_code + 0.5)
            inside = (wf.detach() >= low) & (wf.detach() <= high)
            wf = torch.where(inside, wf, wf.detach())
        return wf + (deq - wf).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._updates += 1
        weight = self.quantized_weight() if self.fake_quant_enabled else self.float_weight()
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight.to(x.dtype), bias)

    @torch.no_grad()
    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the packed layer holding this layer's fake-quantized weight."""
        w = self.float_weight().detach().float()
        if self.learn_scales:
            _, codes, state = self._lsq_quantize(w, hard=True)
            grid = ElementGrid(torch.zeros(codes.shape, device=codes.device), torch.ones(codes.shape),
                               torch.zeros(codes.shape), 2**self.spec.bits - 1, self._lsq["input_index"], state)
            return pack_grid_codes(grid, codes, self.spec)
        grid = self.current_grid()
        values = self._expanded(w, grid.state["weight_scale"]) if self.grid_frozen else grid.weight
        return pack_grid_codes(grid, grid.nearest_codes(values), self.spec)

    def to_packed(self) -> nn.Module:
        """A :class:`~hf_splitquant.PackedLinear` computing this layer's fake-quantized output."""
        from .packed_linear import PackedLinear

        tensors = self.packed_tensors()
        dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
        packed = PackedLinear(self.spec, device=self.weight.device, dtype=dtype)
        packed.load_packed({k: v.to(self.weight.device) for k, v in tensors.items()})
        if self.bias is not None:
            packed.bias.copy_(self.bias.detach())
        return packed

    def to_float(self) -> nn.Module:
        """The float module this layer came from (``nn.Linear`` or ``Conv1D``), with the current
        float weights (not quantized)."""
        if self.spec.source == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            module: nn.Module = Conv1D(self.out_features, self.in_features)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        module = module.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    # ----------------------------------------------------------------------------------------
    # state outside the state_dict (saved by QATCallback next to Trainer checkpoints)
    # ----------------------------------------------------------------------------------------

    def qat_state(self) -> dict[str, Any]:
        """Grid state that is not in ``state_dict`` (cached clusters, a frozen grid, LSQ's fixed
        structure, flags), so a resumed run continues with the same grids."""
        state: dict[str, Any] = {
            "fake_quant_enabled": self.fake_quant_enabled,
            "grid_frozen": self.grid_frozen,
            "updates": self._updates,
            "kmeans_update": self._kmeans_update,
            "ocs_order": list(self._ocs_order) if self._ocs_order is not None else None,
            "cache": {"::".join(map(str, k)): v for k, v in self._cache.items()},
        }
        if self.grid_frozen and self._grid is not None:
            g = self._grid
            state["grid"] = {"weight": g.weight, "scale": g.scale, "offset": g.offset, "max_code": g.max_code,
                             "input_index": g.input_index, "state": dict(g.state), "input_rotation": g.input_rotation}
        if self._lsq is not None:
            state["lsq"] = dict(self._lsq)
        return state

    def load_qat_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`qat_state` returned."""
        self.fake_quant_enabled = bool(state["fake_quant_enabled"])
        self._scales_started = self.fake_quant_enabled  # a resumed run keeps its learned scales
        self._updates = int(state["updates"])
        self._kmeans_update = int(state["kmeans_update"])
        self._ocs_order = state.get("ocs_order")
        self._cache = {}
        for key, value in state.get("cache", {}).items():
            name, _, seed = key.partition("::")
            self._cache[(name, int(seed))] = value
        self._grid = None
        self.grid_frozen = bool(state["grid_frozen"])
        if self.grid_frozen and "grid" in state:
            self._grid = ElementGrid(**state["grid"])
        if state.get("lsq") is not None:
            self._lsq = dict(state["lsq"])

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"group_size={s.group_size}"
        mode = "learned scales" if self.learn_scales else ("frozen grid" if self.grid_frozen else "min-max grid")
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, {group}, "
                f"transform={s.transform}, {mode}, fake_quant={'on' if self.fake_quant_enabled else 'off'}")
