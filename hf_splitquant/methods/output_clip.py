"""Output-aware grids: each group's clipping range chosen by the layer-OUTPUT error, not the weight error.

The MSE clip search (``LayerSpec.clip="mse"``, :func:`hf_splitquant.quant.grid.search_clip_qparams`)
shrinks each group's range by the factor that minimises ``sum_j (w_j - q(w_j))^2``. All inputs count
the same there, although the layer's output error ``|X (W_q - W)^T|^2 = tr(D H D^T)`` (``H = X^T X``)
weighs input ``j`` by ``H_jj`` (and couples inputs through the off-diagonal of ``H``). Here each
group's factor minimises the diagonal part instead::

    sum_{j in group} H_jj * (w_ij - q(w_ij))^2

which is separable per group (the same cheap 1-D search, with ``importance = diag H``) and exact when
the inputs are uncorrelated. The correlations are left to GPTQ (:mod:`hf_splitquant.methods.gptq`),
which can run on the returned grid.

The stored format does not change: the grid's ``state`` holds the same tensors as the method's own
:func:`element_grid` (``weight_scale``, ``weight_zero``, and for OCS ``weight_dup_index``), only with
other values, so :func:`hf_splitquant.methods.pack_grid_codes` stores the codes chosen on it and the
method's ``dequantize`` reads them back. Each format builds its clipped grid
(:meth:`hf_splitquant.methods.base.QuantFormat.clipped_grid`): RTN and OCS (both layouts); SplitQuant's
per-cluster grids span exactly their members and are not clipped.

Results (``benchmarks/study_layers.py``, ``benchmarks/results/layer_study.md``; SmolLM2-135M,
``layers.5`` q/v/o/down_proj and ``layers.20`` up_proj, ``H`` from 8 x 256 calibration tokens, error
on 8 x 256 held-out tokens relative to RTN, mean over the layers at INT2 g64 / INT3 g128 / INT4 g128):

* Without GPTQ: output-aware clip 0.55 / 0.65 / 0.75, MSE clip 0.73 / 0.84 / 0.95. The MSE clip makes
  ``q_proj`` worse than RTN (1.10 / 1.12 / 1.24) because it ignores that a few of its inputs carry
  most of the activation energy; the output-aware clip gives 0.43 / 0.50 / 0.62 there and is better
  than RTN on every layer and width studied (worst: ``down_proj``, 0.62 / 0.76 / 0.88, level with
  the MSE clip). It hardly overfits (fit 0.53 / 0.63 / 0.73) and costs 0.2-0.3 s per layer.
* Followed by GPTQ (damping 1.0, :mod:`hf_splitquant.methods.gptq`): 0.46 / 0.53 / 0.60, against
  0.52 / 0.56 / 0.62 on the MSE-clipped grid and 0.75 / 0.71 / 0.68 on the min-max grid.

Recommended default: the output-aware clip for every calibrated RTN/OCS layer, followed by GPTQ.
"""

from __future__ import annotations

import torch

from ..quant.grid import ElementGrid
from ..quant.rotation import rotate_hessian, rotate_inputs
from ..spec import LayerSpec
from . import get_format

__all__ = ["OUTPUT_CLIP_FACTORS", "output_clip_grid", "diagonal_objective", "input_importance"]

#: Range shrink factors tried (1.0 first: no clipping; ties keep the earlier factor, so a group is
#: never clipped when clipping does not help). Finer and wider than the MSE search's 1.0 .. 0.5: at
#: INT2 g64 the chosen factor is below 0.5 for 3-17% of the groups of the studied layers (median
#: 0.625-0.675), at INT3 g128 for 0-5% (``clip_factors`` in ``benchmarks/results/layer_study.json``).
#: The factor grid itself was not compared against the coarser one.
OUTPUT_CLIP_FACTORS = tuple(round(1.0 - 0.025 * i, 3) for i in range(29))  # 1.0 .. 0.3


def input_importance(hessian: torch.Tensor) -> torch.Tensor:
    """``diag H`` (float32) from a full ``[in, in]`` ``H = X^T X`` or its diagonal ``[in]``."""
    if hessian.dim() == 2:
        if hessian.shape[0] != hessian.shape[1]:
            raise ValueError(f"the hessian must be square, got shape {tuple(hessian.shape)}")
        hessian = hessian.diagonal()
    if hessian.dim() != 1:
        raise ValueError(f"expected H [in, in] or diag H [in], got shape {tuple(hessian.shape)}")
    d = hessian.float()
    if not torch.isfinite(d).all() or bool((d < 0).any()):
        raise ValueError("diag H must be finite and non-negative")
    return d


def diagonal_objective(values: torch.Tensor, weight: torch.Tensor, importance: torch.Tensor) -> float:
    """``sum_ij importance_j * (values_ij - weight_ij)^2``: the output error without input correlations."""
    return float(((values.double() - weight.double()) ** 2 * importance.double()).sum())


def output_clip_grid(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor,
                     factors: tuple[float, ...] = OUTPUT_CLIP_FACTORS) -> ElementGrid:
    """The :class:`ElementGrid` of ``spec``'s format whose groups are clipped for the output error.

    Args:
        weight: float ``[out, in]`` weight.
        spec: an RTN or OCS layer spec (``spec.clip`` is ignored: this search replaces it).
        hessian: ``H = X^T X`` of the layer's (original, unexpanded) inputs ``[in, in]``, or its diagonal
            (not for a rotated layer: the importance of a rotated input needs the whole ``H``).
        factors: shrink factors tried per group; keep ``1.0`` first so that "no clip" is a candidate.

    Returns:
        The grid; ``pack_grid_codes(grid, codes, spec)`` stores codes chosen on it in ``spec``'s format.
    """
    if tuple(weight.shape) != (spec.out_features, spec.in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the spec says "
                         f"{(spec.out_features, spec.in_features)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")
    block = spec.input_rotation
    if block is not None:  # clip the rotated weight for the rotated inputs
        if hessian.dim() != 2:
            raise ValueError("a layer with input_rotation needs the whole H = X^T X [in, in], not its diagonal")
        weight, hessian = rotate_inputs(weight.float(), block), rotate_hessian(hessian, block)
    importance = input_importance(hessian)
    if importance.shape[0] != spec.in_features:
        raise ValueError(f"H has {importance.shape[0]} inputs but the layer {spec.in_features}")
    if not factors or factors[0] != 1.0:
        raise ValueError("factors must start with 1.0 (no clipping)")
    grid = get_format(spec).clipped_grid(weight, spec, importance, factors)
    grid.input_rotation = block
    return grid
