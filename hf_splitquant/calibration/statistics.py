"""Statistics of layer inputs: ``H = X^T X`` and token counts, summed exactly (order-independent,
so several processes give the one-process result bit for bit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .distributed import broadcast

__all__ = ["ExactSum", "InputStatistics", "real_token_rows"]


class ExactSum:
    """Sum of float tensors that does not depend on the order or grouping of the additions.

    Each added value is converted to float64 and split exactly into four signed 32-bit limbs at
    fixed binary positions, ``v = sum_k l_k * 2^p_k`` with ``p = 48, 16, -16, -48`` (truncation toward
    zero and exact fractional parts; only the last limb is rounded, to ``2^-48 ~ 3.6e-15`` absolute,
    value by value, so the rounding does not depend on what else is summed). The limbs are summed as
    int64, which is exact and associative (``|l_k| <= 2^32``: up to ``2^31`` additions), also across
    processes. :meth:`value` converts back to float64 in a fixed order. Values must satisfy
    ``|v| < 2^79``.
    """

    POSITIONS = (48, 16, -16, -48)
    LIMIT = 2.0**79

    def __init__(self, shape: Sequence[int]) -> None:
        self.limbs = torch.zeros((len(self.POSITIONS), *shape), dtype=torch.int64)

    def add(self, value: torch.Tensor) -> None:
        scaled = value.detach().to(device="cpu", dtype=torch.float64)
        if scaled.numel():
            peak = float(scaled.abs().max())
            if not peak < self.LIMIT:  # also catches NaN
                raise ValueError("calibration statistics contain NaN or Inf or exceed 2^79 (the model's "
                                 "activations overflow)")
        scaled = scaled.mul_(2.0 ** (-self.POSITIONS[0]))  # exact: a power-of-two scaling
        last = len(self.POSITIONS) - 1
        for k in range(last):
            part = torch.trunc(scaled)
            self.limbs[k] += part.to(torch.int64)
            scaled = scaled.sub_(part).mul_(2.0 ** (self.POSITIONS[k] - self.POSITIONS[k + 1]))  # exact
        self.limbs[last] += torch.round(scaled).to(torch.int64)

    def value(self) -> torch.Tensor:
        """The sum as float64 (deterministic: fixed conversion and summation order)."""
        total = torch.zeros(self.limbs.shape[1:], dtype=torch.float64)
        for k in reversed(range(len(self.POSITIONS))):
            total += self.limbs[k].to(torch.float64) * 2.0 ** self.POSITIONS[k]
        return total



def real_token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[..., features]`` as float32 rows ``[tokens, features]``, without the padding tokens when ``mask``
    (``[batch, tokens]``, nonzero = real) matches its leading dimensions; a mask of another shape is ignored
    (the layer does not see token positions, e.g. after a reshape)."""
    flat = x.detach()
    if mask is not None and tuple(flat.shape[:-1]) == tuple(mask.shape):
        flat = flat[mask.to(torch.bool)]
    return flat.reshape(-1, flat.shape[-1]).float()


class InputStatistics:
    """Forward hooks summing ``X^T X`` (and the row count) of each watched layer's inputs, exactly.

    Layers called on the very same input tensor (q/k/v, gate/up) share one sum: the later ones are
    recorded as aliases of the first. ``X^T X`` is symmetric, so only its upper triangle is summed.

    With a ``reference`` (the statistics of the same layers in a float copy of the block, run on the float
    model's inputs just before each of this object's passes, with the same padding mask), the cross
    products ``C = X_ref^T X`` are summed too (:meth:`cross`): the float inputs against these ones, token
    by token (:mod:`hf_splitquant.methods.float_target`).
    """

    def __init__(self, layers: Mapping[str, nn.Module], sizes: Mapping[str, int],
                 reference: InputStatistics | None = None) -> None:
        self.names = list(layers)
        self.sizes = dict(sizes)
        self.sums: dict[str, ExactSum] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.batches = 0
        self.active = True
        self.mask: torch.Tensor | None = None  # [batch, tokens] bool of the current batch
        self._last: tuple[torch.Tensor, str] | None = None
        self._triu: dict[int, torch.Tensor] = {}
        self.reference = reference
        self.cross_sums: dict[str, ExactSum] = {}
        self.current: dict[str, torch.Tensor] = {}  # this batch's flattened inputs (read by a referencing object)
        self.keep_current = False
        if reference is not None:
            reference.keep_current = True
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in layers.items()]

    def _upper(self, n: int) -> torch.Tensor:
        if n not in self._triu:
            rows, cols = torch.triu_indices(n, n)
            self._triu[n] = rows * n + cols
        return self._triu[n]

    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.active:
                return
            x = args[0]
            if self._last is not None and self._last[0] is x:  # same input as the previous layer
                self.alias[name] = self._last[1]
                return
            flat = real_token_rows(x, self.mask)
            h = flat.t() @ flat
            n = h.shape[0]
            if name not in self.sums:
                self.sums[name] = ExactSum((n * (n + 1) // 2,))
                self.counts[name] = 0
            self.sums[name].add(h.reshape(-1).index_select(0, self._upper(n).to(h.device)))
            self.counts[name] += flat.shape[0]
            if self.keep_current:
                self.current[name] = flat
            if self.reference is not None:
                self._add_cross(name, flat)
            self._last = (x, name)

        return hook

    def _add_cross(self, name: str, flat: torch.Tensor) -> None:
        ref = self.reference.current.get(self.reference.leader(name)) if self.reference is not None else None
        if ref is None or ref.shape != flat.shape:
            raise RuntimeError(f"no float reference input of the same shape for layer `{name}` in this batch (the "
                               "float copy of the block must run on the same batch first)")
        if name not in self.cross_sums:
            self.cross_sums[name] = ExactSum((flat.shape[1], flat.shape[1]))
        self.cross_sums[name].add(ref.t() @ flat)

    def new_batch(self, mask: torch.Tensor | None) -> None:
        """Record the next forward pass (``mask``: its ``[batch, tokens]`` padding mask)."""
        self.current = {}
        self.mask = mask
        self._last = None
        self.active = True
        self.batches += 1

    def pause(self) -> None:
        """Ignore forward passes until the next :meth:`new_batch` (another statistics object records them)."""
        self.active = False
        self._last = None
        self.current = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def reduce(self, accelerator: Any, alias: Mapping[str, str] | None = None) -> None:
        """Sum the statistics over all processes: one collective per shared input, after the local pass.

        Process 0 always holds batch 0, so its aliases are the reference (every process that saw a batch
        must agree), unless ``alias`` gives them (held-out statistics take those of the fitted ones: process
        0 may hold no held-out batch); layers that saw no token get zero sums so that every process reduces
        the same tensors.
        """
        if accelerator is not None and accelerator.num_processes > 1:
            alias = dict(alias) if alias is not None else broadcast(dict(self.alias), 0, accelerator)
            if self.batches and alias != self.alias:
                raise RuntimeError("the layers sharing an input differ between processes")
            self.alias = alias
        for name in self.names:
            if name not in self.alias and name not in self.sums:
                n = self.sizes[name]
                self.sums[name] = ExactSum((n * (n + 1) // 2,))
                self.counts[name] = 0
            if self.reference is not None and name not in self.alias and name not in self.cross_sums:
                self.cross_sums[name] = ExactSum((self.sizes[name], self.sizes[name]))
        self.current = {}
        if accelerator is None or accelerator.num_processes == 1:
            return
        leaders = [n for n in self.names if n not in self.alias]
        for name in leaders:
            self.sums[name].limbs = accelerator.reduce(self.sums[name].limbs, reduction="sum")
            if self.reference is not None:
                self.cross_sums[name].limbs = accelerator.reduce(self.cross_sums[name].limbs, reduction="sum")
        counts = accelerator.reduce(torch.tensor([self.counts[n] for n in leaders], dtype=torch.int64), reduction="sum")
        self.counts = {n: int(c) for n, c in zip(leaders, counts.tolist())}

    def leader(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def count(self, name: str) -> int:
        return self.counts[self.leader(name)]

    def hessian(self, name: str) -> torch.Tensor:
        """The summed ``X^T X`` of ``name``'s inputs, ``[in, in]`` float32 (symmetric)."""
        n = self.sizes[name]
        upper = self.sums[self.leader(name)].value()
        full = torch.zeros(n * n, dtype=torch.float64)
        full[self._upper(n)] = upper
        full = full.reshape(n, n)
        return (full + full.triu(1).t()).float()

    def cross(self, name: str) -> torch.Tensor | None:
        """The summed ``C = X_ref^T X`` of ``name`` ``[in, in]`` float32 (``None`` without a reference)."""
        if self.reference is None:
            return None
        return self.cross_sums[self.leader(name)].value().float()
