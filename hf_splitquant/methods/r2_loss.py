"""R2-Loss (range restriction; Kundu et al., arXiv 2303.08253): auxiliary losses on the weights that
shrink each layer's range during full-precision training, so that a later post-training quantizer
(RTN, SplitQuant, ...) gets finer grids.

Three variants (our reading of the paper; only the L-inf form is certain, the Margin and
Soft-Min-Max forms are **our reconstruction**, every constant below is configurable):

``"linf"``
    ``R(W) = max |W|``. The subgradient reaches only the largest entry (or entries, on ties).
``"margin"``
    A learnable margin ``M`` per layer (or per row); weights beyond it are pulled back:
    ``R(W, M) = sum(relu(|w| - |M|)^2) + beta * pen(M)`` with ``pen = |M|`` (``margin_penalty="l1"``,
    default) or ``M^2`` (``"l2"``). The first term pushes ``M`` up (and the outliers in), the second
    pulls ``M`` down; ``M`` starts at ``margin_init_ratio * max|W|`` (or at ``margin_init``).
``"soft_min_max"``
    A learnable temperature ``alpha`` per layer (or per row). ``smax = sum(w * softmax(a * w))``,
    ``smin = sum(w * softmax(-a * w))``, ``R = (smax - smin) + eta * exp(-alpha)``: asymmetric, the
    soft maximum and minimum move independently. The ``exp(-alpha)`` term keeps ``alpha`` from
    collapsing to 0 (where ``smax = smin = mean`` and ``R`` would vanish trivially). With
    ``normalize=True`` (default) the temperature acts on standardised weights, ``a = alpha / std(W)``
    (``std`` detached), and the penalty is ``eta * std(W) * exp(-alpha)``: ``alpha`` and ``eta``
    are then dimensionless and one default fits layers of any weight scale. ``normalize=False`` is
    the literal form (``a = alpha``, penalty ``eta * exp(-alpha)``), which needs ``alpha`` in units
    of ``1 / |w|`` (hundreds for typical transformer weights). The default ``eta = 50`` puts the
    minimum of ``R`` over ``alpha`` at ``alpha ~ 4-9`` on Gaussian-like layers of 1k-150k weights, where
    the soft extremes are close to the hard ones; with ``eta ~ 1`` ``alpha`` collapses to its lower
    bound and ``R`` measures the spread of the bulk instead of the extremes (measured, see tests).

``granularity="layer"`` (the paper's) computes one term per weight matrix; ``"row"`` one per output
row and ``"group"`` one per ``group_size`` inputs of a row (each with its own margin or
temperature), summed over them (so every row / group extreme gets the same gradient ``lambda`` as
the single extreme of the layer form): the per-channel / per-group ranges that our grids actually
use (an extension of ours). :func:`weight_range` reports the *mean* row / group range. The total is
``sum over layers of R(W_l)``; callers multiply by ``lambda``. Everything is computed in float32,
whatever the weights' dtype. Pure torch, no transformers (except :class:`R2Regularizer`'s optional
layer selection from a :class:`~hf_splitquant.SplitQuantConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VARIANTS",
    "GRANULARITIES",
    "linf_loss",
    "margin_loss",
    "soft_extremes",
    "soft_min_max_loss",
    "weight_range",
    "R2Regularizer",
]

VARIANTS = ("linf", "margin", "soft_min_max")
GRANULARITIES = ("layer", "row", "group")
MARGIN_PENALTIES = ("l1", "l2")


def _groups(weight: torch.Tensor, granularity: str, group_size: int = 64) -> torch.Tensor:
    """``[out, in]`` -> ``[groups, n]`` float32: one group per layer, per output row, or per run of
    ``group_size`` inputs of a row (the quantizer's groups). A ragged last group is padded with copies
    of the row's last weight, which changes neither its maximum nor its minimum."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    w = weight.float()
    if granularity == "layer":
        return w.reshape(1, -1)
    w = w.reshape(w.shape[0], -1)
    if granularity == "row":
        return w
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive integer, got {group_size!r}")
    pad = -w.shape[1] % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(-1, group_size)


def linf_loss(weight: torch.Tensor, granularity: str = "layer", group_size: int = 64) -> torch.Tensor:
    """L-inf R2 term: ``max|W|`` (the sum of the row / group maxima for the finer granularities)."""
    return _groups(weight, granularity, group_size).abs().amax(dim=1).sum()


def margin_loss(weight: torch.Tensor, margin: torch.Tensor, beta: float = 1.0, penalty: str = "l1",
                granularity: str = "layer", group_size: int = 64) -> torch.Tensor:
    """Margin R2 term ``sum(relu(|w| - |M|)^2) + beta * pen(M)``, summed over groups.

    ``margin`` has one entry per group (``[1]`` for a layer, ``[out]`` for rows).
    """
    if penalty not in MARGIN_PENALTIES:
        raise ValueError(f"`margin_penalty` must be one of {MARGIN_PENALTIES}, got {penalty!r}")
    g = _groups(weight, granularity, group_size)
    m = margin.float().abs().reshape(-1, 1)
    if m.shape[0] != g.shape[0]:
        raise ValueError(f"margin has {m.shape[0]} entries but the weight has {g.shape[0]} {granularity} groups")
    excess = F.relu(g.abs() - m).pow(2).sum(dim=1)
    shrink = m.squeeze(1) if penalty == "l1" else m.squeeze(1).pow(2)
    return (excess + beta * shrink).sum()


def soft_extremes(weight: torch.Tensor, alpha: torch.Tensor, normalize: bool = True,
                  granularity: str = "layer", group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft maximum and minimum of every group: ``(smax [G], smin [G], unit [G])``.

    ``smax = sum(w * softmax(a * w))`` and ``smin = sum(w * softmax(-a * w))`` with ``a = alpha``, or
    ``a = alpha / std(group)`` when ``normalize``; ``unit`` is that (detached) std, or 1.
    """
    g = _groups(weight, granularity, group_size)
    a = alpha.float().reshape(-1, 1)
    if a.shape[0] != g.shape[0]:
        raise ValueError(f"alpha has {a.shape[0]} entries but the weight has {g.shape[0]} {granularity} groups")
    if normalize:
        unit = g.detach().std(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        unit = torch.ones_like(a)
    t = a / unit
    smax = (g * torch.softmax(t * g, dim=1)).sum(dim=1)
    smin = (g * torch.softmax(-t * g, dim=1)).sum(dim=1)
    return smax, smin, unit.squeeze(1)


def soft_min_max_loss(weight: torch.Tensor, alpha: torch.Tensor, eta: float = 50.0, normalize: bool = True,
                      granularity: str = "layer", group_size: int = 64) -> torch.Tensor:
    """Soft-Min-Max R2 term ``(smax - smin) + eta * unit * exp(-alpha)``, summed over groups."""
    smax, smin, unit = soft_extremes(weight, alpha, normalize, granularity, group_size)
    return ((smax - smin) + eta * unit * torch.exp(-alpha.float().reshape(-1))).sum()


def weight_range(weight: torch.Tensor, symmetric: bool = True, granularity: str = "layer",
                 group_size: int = 64) -> float:
    """The range a quantizer sees: ``max|W|`` (symmetric) or ``max(W) - min(W)``, mean over groups."""
    g = _groups(weight.detach(), granularity, group_size)
    r = g.abs().amax(dim=1) if symmetric else g.amax(dim=1) - g.amin(dim=1)
    return float(r.mean())


def _key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


def _matrix(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear-like module (GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{type(module).__name__} has no 2-D float `weight`; R2 applies to Linear-like layers")
    from transformers.pytorch_utils import Conv1D

    transposed = isinstance(module, Conv1D) or getattr(getattr(module, "spec", None), "source", None) == "Conv1D"
    return weight.t() if transposed else weight


class R2Regularizer(nn.Module):
    """The R2 auxiliary loss of a model's Linear-like layers, with its learnable parameters.

    The regularizer references the model's layers without registering them (so its
    ``state_dict`` holds only its own margins / temperatures, and the model's ``state_dict`` keys
    are untouched). Call it for ``lambda_ * R`` in a custom loop (``loss = task + reg()``), or hand
    it to :class:`hf_splitquant.integrations.trainer.R2LossCallback` for the stock ``Trainer``.

    Args:
        model: the model whose weights are regularized.
        variant: ``"linf"``, ``"margin"`` or ``"soft_min_max"``.
        layers: which layers: ``None`` = the layers ``SplitQuantConfig()`` would quantize (every
            Linear / Conv1D except the output head, tied weights and embeddings); a
            ``SplitQuantConfig`` = the layers that config quantizes; or an explicit list of module
            names (any module with a 2-D ``weight``, e.g. ``FakeQuantLinear`` for R2 during QAT).
        lambda_: weight of the term in the total loss ``L_task + lambda_ * sum_l R(W_l)``.
        granularity: ``"layer"`` (one term per matrix, the paper's), ``"row"`` (one per output row) or
            ``"group"`` (one per ``group_size`` inputs of a row: the groups a ``group_size`` grid uses).
        group_size: with ``granularity="group"``.
        beta / margin_penalty / margin_init / margin_init_ratio: Margin variant (see module doc);
            ``margin_init`` is an absolute starting value, else ``margin_init_ratio * max|W|``.
        eta / alpha_init / normalize / alpha_bounds: Soft-Min-Max variant; ``alpha`` is clamped to
            ``alpha_bounds`` after every update (:meth:`clamp_parameters`).
    """

    def __init__(
        self,
        model: nn.Module,
        variant: str = "linf",
        layers: Any = None,
        lambda_: float = 1e-2,
        granularity: str = "layer",
        group_size: int = 64,
        beta: float = 1.0,
        margin_penalty: str = "l1",
        margin_init: float | None = None,
        margin_init_ratio: float = 0.9,
        eta: float = 50.0,
        alpha_init: float = 8.0,
        normalize: bool = True,
        alpha_bounds: tuple[float, float] = (0.5, 50.0),
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
        if margin_penalty not in MARGIN_PENALTIES:
            raise ValueError(f"`margin_penalty` must be one of {MARGIN_PENALTIES}, got {margin_penalty!r}")
        for field, value in (("lambda_", lambda_), ("beta", beta), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{field}` must be a finite number >= 0, got {value!r}")
        if not 0 < margin_init_ratio <= 10:
            raise ValueError(f"`margin_init_ratio` must be in (0, 10], got {margin_init_ratio!r}")
        if margin_init is not None and not margin_init > 0:
            raise ValueError(f"`margin_init` must be a positive number or None, got {margin_init!r}")
        low, high = alpha_bounds
        if not 0 <= low < high:
            raise ValueError(f"`alpha_bounds` must be (low, high) with 0 <= low < high, got {alpha_bounds!r}")
        self.variant = variant
        self.lambda_ = float(lambda_)
        self.granularity = granularity
        self.group_size = group_size
        self.beta = float(beta)
        self.margin_penalty = margin_penalty
        self.eta = float(eta)
        self.normalize = bool(normalize)
        self.alpha_bounds = (float(low), float(high))
        # A plain list: the layers must not become submodules of the regularizer.
        self._layers: list[tuple[str, nn.Module]] = self._resolve_layers(model, layers)
        self.params = nn.ParameterDict()
        for name, module in self._layers:
            w = _matrix(module).detach()
            rows = _groups(w, granularity, group_size).shape[0]
            if variant == "margin":
                if margin_init is not None:
                    init = torch.full((rows,), float(margin_init))
                else:
                    init = _groups(w, granularity, group_size).abs().amax(dim=1) * margin_init_ratio
                self.params[_key(name)] = nn.Parameter(init.float().cpu())
            elif variant == "soft_min_max":
                self.params[_key(name)] = nn.Parameter(torch.full((rows,), float(alpha_init)))
        self.to(next(iter(self._layers))[1].weight.device)

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Any) -> list[tuple[str, nn.Module]]:
        from ..config import SplitQuantConfig

        if layers is None or isinstance(layers, SplitQuantConfig):
            from ..modeling import select_modules

            config = layers if layers is not None else SplitQuantConfig()
            selected = select_modules(model, config)
            if not selected:
                raise ValueError("R2Regularizer: the config selects no Linear layer of this model")
            return list(selected)
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise ValueError(
                f"`layers` must be None, a SplitQuantConfig or a list of module names, got {type(layers).__name__}"
            )
        resolved = []
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"R2Regularizer: the model has no module `{name}`") from None
            _matrix(module)
            resolved.append((name, module))
        if not resolved:
            raise ValueError("R2Regularizer: `layers` is empty")
        return resolved

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self._layers]

    def weights(self) -> list[torch.Tensor]:
        """The regularized weight Parameters, in layer order."""
        return [module.weight for _, module in self._layers]

    def layer_terms(self) -> dict[str, torch.Tensor]:
        """``R(W_l)`` of every layer (float32 scalars, differentiable), by module name."""
        terms = {}
        for name, module in self._layers:
            w = _matrix(module)
            if self.variant == "linf":
                terms[name] = linf_loss(w, self.granularity, self.group_size)
            elif self.variant == "margin":
                terms[name] = margin_loss(w, self.params[_key(name)], self.beta, self.margin_penalty, self.granularity,
                                          self.group_size)
            else:
                terms[name] = soft_min_max_loss(w, self.params[_key(name)], self.eta, self.normalize,
                                                self.granularity, self.group_size)
        return terms

    def penalty(self) -> torch.Tensor:
        """``sum_l R(W_l)`` in float32 (not multiplied by ``lambda_``)."""
        return torch.stack(list(self.layer_terms().values())).sum()

    def forward(self) -> torch.Tensor:
        """``lambda_ * sum_l R(W_l)``: add it to the task loss in a custom training loop."""
        return self.lambda_ * self.penalty()

    def ranges(self) -> dict[str, float]:
        """The range each layer's quantizer will see: ``max|W|`` (L-inf, Margin) or ``max - min``."""
        symmetric = self.variant != "soft_min_max"
        return {name: weight_range(_matrix(m), symmetric, self.granularity, self.group_size)
                for name, m in self._layers}

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Keep temperatures inside ``alpha_bounds`` (call after every update of the parameters)."""
        if self.variant == "soft_min_max":
            for p in self.params.values():
                p.clamp_(*self.alpha_bounds)

    def add_gradients(self, scale: float | None = None, weights_only: bool = False) -> float:
        """Add ``scale * dR/dW`` to every regularized weight's ``.grad`` (``scale`` defaults to
        ``lambda_``) and set the learnable parameters' ``.grad`` to ``dR/dparam``; returns ``R``.

        Exactly what ``backward()`` of ``scale * R`` would accumulate, but without touching the
        autograd graph of the task loss, so it can run after the task backward (e.g. in a Trainer
        callback). The learnable parameters get the unscaled gradient: their own optimizer decides
        the step size. Weights without ``requires_grad`` are skipped.
        """
        scale = self.lambda_ if scale is None else float(scale)
        with torch.enable_grad():
            weights = [w for w in self.weights() if w.requires_grad]
            own = [] if weights_only else [p for p in self.params.values() if p.requires_grad]
            if not weights and not own:
                return float(self.penalty().detach())
            value = self.penalty()
            grads = torch.autograd.grad(value, weights + own, allow_unused=True)
        for w, g in zip(weights, grads[: len(weights)]):
            if g is None or scale == 0.0:
                continue
            g = (g * scale).to(w.dtype)
            if w.grad is None:
                w.grad = g
            else:
                w.grad.add_(g)
        for p, g in zip(own, grads[len(weights):]):
            p.grad = g if g is not None else torch.zeros_like(p)
        return float(value.detach())

    def descend(self, step: float | None = None) -> float:
        """One plain gradient step on ``R`` for the weights, ``W <- W - step * dR/dW`` (``step``
        defaults to ``lambda_``), outside any optimizer (like AdamW's decoupled weight decay); the
        learnable parameters get ``.grad = dR/dparam``. Returns ``R`` before the step."""
        step = self.lambda_ if step is None else float(step)
        with torch.enable_grad():
            weights = [w for w in self.weights() if w.requires_grad]
            own = [p for p in self.params.values() if p.requires_grad]
            value = self.penalty()
            grads = torch.autograd.grad(value, weights + own, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, grads[: len(weights)]):
                if g is not None and step:
                    w.sub_((g * step).to(w.dtype))
        for p, g in zip(own, grads[len(weights):]):
            p.grad = g if g is not None else torch.zeros_like(p)
        return float(value.detach())

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, layers={len(self._layers)}, lambda_={self.lambda_}, "
                f"granularity={self.granularity}")
