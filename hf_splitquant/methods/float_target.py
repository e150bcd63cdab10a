"""Matching the FLOAT model's outputs, not the layer's own float output on quantized inputs.

Calibration is sequential: a layer's inputs ``X~`` come from the already quantized layers before it, so
they differ from the inputs ``X`` the float model gives the same layer. Classic GPTQ minimises
``|X~ (W_q - W)^T|^2``: it reproduces what the float weight would output *on the quantized inputs*, and
the error the earlier layers made is passed on untouched. Here the objective is the float model's output
at this layer::

    J(W_q) = |X~ W_q^T - X W^T|^2 = tr(W_q H~ W_q^T) - 2 tr(W C W_q^T) + tr(W H W^T)

with ``H~ = X~^T X~``, ``C = X^T X~`` and ``H = X^T X`` summed over the same calibration tokens. Its
least-squares minimiser over real weights is ``W* = W C H~^-1``, and ``J(W_q) = |X~ (W_q - W*)^T|^2 +
const``: so the rounding methods run unchanged on the *target* ``W*`` (its grid, clip search and
error feedback), and the earlier layers' error is corrected where this layer can correct it.

``W*`` is fitted on a few thousand tokens; like GPTQ's ``H`` it is regularised, here towards ``W``
(not towards zero)::

    W* = W (C + lambda D)(H~ + lambda D)^-1 = W + W (C - H~)(H~ + lambda D)^-1

with ``D = mean(diag H~) I`` and ``lambda`` the relative ``damping``: ``lambda -> inf`` gives ``W* = W``
(classic GPTQ), and ``W* = W`` whenever the inputs are the float ones (``C = H~``).

The idea of correcting for the quantized inputs is the one of asymmetric calibration (GPTAQ, Li et al.
2025); this closed form (a least-squares target, then unchanged rounding) is ours.
"""

from __future__ import annotations

import torch

from .attention_round import expand_hessian
from .gptq import damp_hessian

__all__ = ["float_model_target", "float_model_objective", "DEFAULT_TARGET_DAMPING"]

#: Relative regularisation of the target towards the float weight (measured default: see README).
DEFAULT_TARGET_DAMPING = 0.1


def float_model_target(weight: torch.Tensor, h_quant: torch.Tensor, cross: torch.Tensor,
                       damping: float = DEFAULT_TARGET_DAMPING) -> torch.Tensor:
    """``W* = W + W (C - H~)(H~ + damping * mean(diag H~) I)^-1`` (float32, the shape of ``weight``).

    Args:
        weight: the float weight ``W`` ``[out, in]``.
        h_quant: ``H~ = X~^T X~`` of the layer's inputs in the partly quantized model ``[in, in]``.
        cross: ``C = X^T X~``, float inputs (rows) against quantized inputs (columns) ``[in, in]``.
        damping: relative regularisation towards ``W`` (``>= 0``; dead inputs are handled as in
            :func:`~hf_splitquant.methods.gptq.damp_hessian`).
    """
    n = weight.shape[1]
    if tuple(h_quant.shape) != (n, n) or tuple(cross.shape) != (n, n):
        raise ValueError(f"H~ {tuple(h_quant.shape)} and C {tuple(cross.shape)} must both be [{n}, {n}]")
    damped = damp_hessian(h_quant, damping)
    delta = cross.double() - h_quant.double()
    # (C - H~) D^-1 with D symmetric: solve D^T Z^T = (C - H~)^T, i.e. Z = solve(D, delta^T)^T
    lower, bad = torch.linalg.cholesky_ex(damped)
    if int(bad) != 0:
        raise ValueError("H~ is not positive definite after damping (NaN in the statistics?)")
    correction = torch.cholesky_solve(delta.t().contiguous(), lower).t()
    w = weight.double()
    return (w + w @ correction).float()


def float_model_objective(values: torch.Tensor, weight: torch.Tensor, h_quant: torch.Tensor, cross: torch.Tensor,
                          h_float: torch.Tensor, count: int, input_index: torch.Tensor | None = None) -> float:
    """``|X~ V^T - X W^T|^2 / (N * out)``: the output MSE against the float model (``N = count`` tokens).

    ``values`` ``V`` may have OCS-expanded columns (``input_index``: the source input of each appended
    column); ``weight`` ``W`` and the statistics are in the original input space.
    """
    hq = expand_hessian(h_quant.double(), input_index)
    c = cross.double()
    if input_index is not None and input_index.numel():
        idx = torch.cat([torch.arange(c.shape[1]), input_index.long()])
        c = c.index_select(1, idx)
    v, w = values.double(), weight.double()
    total = ((v @ hq) * v).sum() - 2.0 * ((w @ c) * v).sum() + ((w @ h_float.double()) * w).sum()
    return float(total.clamp_min(0.0)) / (max(count, 1) * v.shape[0])
