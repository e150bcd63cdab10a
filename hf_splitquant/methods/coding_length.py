"""Per-layer bit widths from the lossy coding length (Attention Round's mixed precision).

Coding length (Ma, Derksen, Hong, Wright 2007, as used by Attention Round)
    ``L(W) = (m + n) / 2 * log2 det(I_m + m / (n eps^2) W W^T)`` for ``W`` of shape ``m x n``: the
    bits needed to code the ``n`` column vectors (each of dimension ``m``) of ``W`` up to a distortion
    ``eps``. Here ``W`` is the layer's ``[out, in]`` weight, so ``m = out``
    (rows = output channels) and ``n = in``. With the singular values ``s_i`` of ``W``,
    ``det(I + c W W^T) = prod_i (1 + c s_i^2)``, so ``L = (m + n) / 2 * sum_i log2(1 + c s_i^2)``, computed
    in float64 with ``log1p`` (no determinant of a large matrix, no overflow).

Allocation rule (ours; the paper's mapping from ``L`` to bits is not public)
    Each layer's coding length per parameter ``rho = L / (m n)`` (bits per weight needed at
    distortion ``eps``) sets its desired width ``lambda + rho``, for one common level ``lambda``.
    Raising ``lambda`` from ``-inf`` upgrades a layer to its next candidate width ``c`` when
    ``lambda + rho`` reaches ``c``, i.e. upgrades happen in ascending order of ``c - rho`` (ties: larger
    ``rho`` first, then name). We start every layer at the smallest candidate and apply the upgrades in
    that order, skipping any that no longer fits the budget ``target_bits * sum(num_weights)`` (every
    stored bit counted, as in :func:`hf_splitquant.methods.mixquant.allocate_by_budget`), until none fits.
    Properties: the budget is never exceeded and no single further upgrade fits; a layer with a larger
    ``rho`` never gets fewer bits than a layer of the same shape with a smaller ``rho`` (an upgrade of
    the smaller-``rho`` layer always comes after the same upgrade of the larger one, and costs the same).
    A difference of one bit per weight in coding length maps to one bit of code width.

Input-weighted form (``bit_allocation="coding_length_inputs"``, ours)
    On SmolLM2-135M the faithful form follows the layers' shapes (``m / n`` in ``c``), not their importance:
    gate/up projections get 4 bits and every down/k/v/o projection 2. What a layer's output error depends
    on is ``W`` seen through its inputs, ``W diag(sqrt(diag H))`` with ``H = E[x x^T]`` (each input channel
    scaled by its RMS over calibration tokens), so this form codes that matrix, rescaled to unit RMS so that
    layers of any weight or activation scale compare (``eps`` is then a distortion relative to the layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["coding_length", "coding_length_per_parameter", "input_weighted", "allocate_by_coding_length"]


def coding_length(weight: torch.Tensor, eps: float) -> float:
    """``L(W) = (m+n)/2 * sum_i log2(1 + m/(n eps^2) * s_i^2)`` for ``weight`` ``[m = out, n = in]``."""
    if weight.dim() != 2:
        raise ValueError(f"coding length needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot compute its coding length")
    m, n = w.shape
    s = torch.linalg.svdvals(w)
    c = m / (n * eps * eps)
    return float((m + n) / 2.0 * torch.log1p(c * s * s).sum() / math.log(2.0))


def coding_length_per_parameter(weight: torch.Tensor, eps: float) -> float:
    """``L(W) / numel(W)``: coding length in bits per weight."""
    return coding_length(weight, eps) / weight.numel()


def input_weighted(weight: torch.Tensor, input_rms: torch.Tensor) -> torch.Tensor:
    """``W diag(input_rms)`` rescaled to unit RMS (``weight`` ``[out, in]``, ``input_rms`` ``[in]``)."""
    if input_rms.shape != (weight.shape[-1],):
        raise ValueError(f"input_rms has shape {tuple(input_rms.shape)}, expected ({weight.shape[-1]},)")
    scaled = weight.detach().to(torch.float64) * input_rms.to(torch.float64)
    rms = scaled.pow(2).mean().sqrt()
    if not torch.isfinite(rms):
        raise ValueError("the input-weighted weight has NaN or Inf values (weights or input statistics)")
    # a layer whose inputs are all zero needs no bits: its coding length is zero
    return scaled / rms if rms > 0 else scaled


def allocate_by_coding_length(weights: Mapping[str, torch.Tensor], costs: Mapping[str, Mapping[int, int]],
                              sizes: Mapping[str, int], target_bits: float, eps: float,
                              input_rms: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Bit width per layer (keys of ``costs[name]`` are the candidates) meeting ``target_bits``.

    Args:
        weights: float ``[out, in]`` weight of every layer.
        costs: stored bits of each layer at each candidate width (overheads included).
        sizes: number of weights of each layer (the budget is ``target_bits * sum(sizes)``).
        target_bits: average bits per weight over the layers, overheads included.
        eps: distortion of the coding length.
        input_rms: ``[in]`` RMS of each layer's input channels (the input-weighted form, module docstring);
            ``None``: the faithful form on the weights themselves.

    Raises:
        ValueError: the layers disagree, or ``target_bits`` is below the cost of the smallest widths.
    """
    if set(weights) != set(costs) or set(weights) != set(sizes):
        raise ValueError("weights, costs and sizes must describe the same layers")
    if not weights:
        return {}
    if input_rms is not None:
        if set(input_rms) != set(weights):
            raise ValueError("input_rms must describe the same layers as weights")
        weights = {name: input_weighted(w, input_rms[name]) for name, w in weights.items()}
    rho = {name: coding_length_per_parameter(weights[name], eps) for name in weights}
    candidates = {name: sorted(costs[name]) for name in weights}
    if any(not c for c in candidates.values()):
        raise ValueError("every layer needs at least one candidate bit width")
    total = sum(sizes.values())
    budget = target_bits * total
    chosen = {name: c[0] for name, c in candidates.items()}
    spent = sum(costs[name][b] for name, b in chosen.items())
    if spent > budget:
        raise ValueError(
            f"target_bits={target_bits} is below {spent / total:.3f}, the bits per weight of every layer at its "
            "smallest candidate width (overheads included); raise target_bits or add smaller candidates"
        )

    def next_upgrade(name: str) -> tuple[float, float, str, int] | None:
        ladder = candidates[name]
        i = ladder.index(chosen[name])
        if i + 1 == len(ladder):
            return None
        bits = ladder[i + 1]
        return (bits - rho[name], -rho[name], name, bits)

    skipped: set[str] = set()  # layers whose next upgrade did not fit (the budget only shrinks)
    while True:
        queue = [u for name in chosen if name not in skipped and (u := next_upgrade(name)) is not None]
        if not queue:
            return chosen
        _, _, name, bits = min(queue)
        extra = costs[name][bits] - costs[name][chosen[name]]
        if spent + extra <= budget:
            chosen[name] = bits
            spent += extra
        else:
            skipped.add(name)
