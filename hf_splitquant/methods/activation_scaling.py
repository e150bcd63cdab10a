"""Activation-aware input scaling before the rounding (``SplitQuantConfig(activation_scaling=True)``).

The idea is AWQ's (Lin et al. 2024): input channels that carry large activations matter more to a layer's
output, and multiplying a weight column by ``s_j > 1`` (and the input channel by ``1 / s_j``) gives that column
a finer share of its group's grid. The product is the same in float when the ``1 / s`` is folded into what
produces the input: here a normalisation layer's weight (and bias), which every decoder block puts before its
q/k/v and gate/up projections. The format is unchanged (the scale lives in the float norm weights).

The search (pure functions here; the calibration loop applies the result): with ``r_j`` the RMS of input
channel ``j`` over the calibration tokens, the candidates are ``s = r^alpha`` (normalised so that
``sqrt(max(s) min(s)) = 1``) for ``alpha`` on a grid in ``[0, 1]``; each is scored by the output error of
round-to-nearest on the scaled weights, through the layers' input statistics ``H = X^T X``:

    error(alpha) = sum over the stage's layers of  tr(dW H dW^T),   dW = Q(W diag(s)) diag(s)^-1 - W

``alpha = 0`` is no scaling (the plain rounding error), so the chosen scale never scores worse than none. The
calibrated rounding (GPTQ, Attention Round) then runs on the scaled weights and statistics. Measured on
SmolLM2-135M in ``benchmarks/results/calibration_activation_scaling.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spec import LayerSpec
from .mixquant import roundoff_residual

__all__ = ["DEFAULT_ALPHAS", "candidate_scales", "scaled_rounding_error", "search_input_scale"]

#: the exponents tried (AWQ's grid of 20 steps)
DEFAULT_ALPHAS = tuple(i / 20 for i in range(21))


def candidate_scales(input_rms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = r^alpha`` for the channel RMS ``r`` ``[in]``, normalised to ``sqrt(max(s) min(s)) = 1``; channels that
    never carry a signal (``r = 0``) get the smallest positive RMS, so every ``s`` is finite and positive."""
    r = input_rms.detach().double()
    positive = r[r > 0]
    if positive.numel() == 0:
        return torch.ones_like(r, dtype=torch.float32)
    s = r.clamp_min(float(positive.min())).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).float()


def scaled_rounding_error(weights: Sequence[torch.Tensor], specs: Sequence[LayerSpec], hessian: torch.Tensor,
                          scales: torch.Tensor, seed: int = 0) -> float:
    """``sum_l tr(dW_l H dW_l^T)`` with ``dW = Q(W diag(s)) diag(s)^-1 - W`` for weights ``[out, in]`` sharing the
    input statistics ``hessian`` ``[in, in]`` (module docstring)."""
    total = 0.0
    h = hessian.float()
    for weight, spec in zip(weights, specs):
        w = weight.detach().float()
        delta = roundoff_residual(w * scales, spec, seed) / scales
        total += float(((delta @ h) * delta).sum())
    return total


def search_input_scale(weights: Sequence[torch.Tensor], specs: Sequence[LayerSpec], hessian: torch.Tensor,
                       count: int, alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0,
                       ) -> tuple[float, torch.Tensor, dict[float, float]]:
    """The exponent with the least :func:`scaled_rounding_error` (ties: the smaller ``alpha``), its scales ``[in]``
    and every candidate's error. ``hessian`` is the summed ``X^T X`` of ``count`` tokens."""
    if count <= 0:
        raise ValueError("no calibration token reached these layers; cannot choose their input scales")
    rms = (torch.diagonal(hessian).double().clamp_min(0) / count).sqrt()
    errors = {float(a): scaled_rounding_error(weights, specs, hessian, candidate_scales(rms, a), seed) for a in alphas}
    best = min(errors, key=lambda a: (errors[a], a))
    return best, candidate_scales(rms, best), errors
