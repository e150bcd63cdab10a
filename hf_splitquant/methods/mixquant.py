"""MixQuant (Kloberdanz & Le, arXiv 2309.17341): per-layer weight bit widths from round-off error,
data-free, as a pre-processing step for any quantizer.

The error of a layer at a bit width is measured with the quantizer that will really be applied
(the same transform, grid and group size): ``err(W, dequant(quant_b(W)))``. Two ways to choose:

* :func:`allocate_by_qem`, the paper's rule (as far as it is known; the exact rule is not public):
  each layer takes the smallest candidate whose error is at most ``qem`` times its error at the
  reference width. A larger ``qem`` never gives a layer more bits.
* :func:`allocate_by_budget`, for users who think in budgets: bit widths that meet an average
  bits-per-weight target (every stored bit counted) with the least total error, by a greedy
  exchange on error saved per bit spent. The total error is each layer's error relative to its
  mean squared weight, weighted by its number of weights, so layers of different scale compare.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..spec import LayerSpec

__all__ = ["roundoff_residual", "roundoff_error", "spec_bits", "allocate_by_qem", "allocate_by_budget"]


def roundoff_residual(weight: torch.Tensor, spec: LayerSpec, seed: int = 0, cache: dict | None = None) -> torch.Tensor:
    """``dequant(quant(weight)) - weight`` in float32, with the quantizer ``spec`` describes.

    Plain grids (``transform="rtn"``) skip packing and unpacking the codes (the same values, tested; the calibrated
    sensitivity evaluates every layer at every candidate width once per calibration batch), block of rows by block
    of rows like :func:`~hf_splitquant.methods.quantize_weight`."""
    from ..quant.grid import dequantize_codes, quantize_codes
    from ..quant.rotation import rotate_inputs
    from . import (
        check_weight_shape,
        dequantize_weight,
        quantize_weight,
        rtn,
        weight_in_stored_basis,
        weight_row_blocks,
    )

    if spec.transform == "rtn":
        check_weight_shape(weight, spec)
        residual = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        for start, block in weight_row_blocks(weight, spec):
            stored = weight_in_stored_basis(block, spec)
            scale, zero = rtn.grid_params(stored, spec)
            codes = quantize_codes(stored, scale, zero, spec.bits, spec.group_size)
            values = dequantize_codes(codes, scale, zero, spec.bits, spec.group_size)
            if spec.input_rotation is not None:
                values = rotate_inputs(values, spec.input_rotation)
            residual[start:start + block.shape[0]] = values - block.float()
        return residual
    restored = dequantize_weight(quantize_weight(weight, spec, seed=seed, cache=cache), spec, torch.float32)
    return restored - weight.float()


def roundoff_error(weight: torch.Tensor, spec: LayerSpec, metric: str = "mse", seed: int = 0,
                   cache: dict | None = None) -> float:
    """Error of a quantize-dequantize round trip of ``weight`` with ``spec`` (``"mse"`` or ``"mae"``)."""
    diff = roundoff_residual(weight, spec, seed, cache)
    return float(diff.pow(2).mean() if metric == "mse" else diff.abs().mean())


def spec_bits(spec: LayerSpec) -> int:
    """Stored bits of a layer with this spec (codes, scales, zero points, cluster ids, indices)."""
    from . import stored_bytes

    return 8 * stored_bytes(spec)


def allocate_by_qem(errors: Mapping[str, Mapping[int, float]], reference: Mapping[str, float],
                    qem: float) -> dict[str, int]:
    """The smallest candidate per layer with ``error <= qem * reference_error``, else the largest."""
    chosen = {}
    for name, by_bits in errors.items():
        bits_sorted = sorted(by_bits)
        limit = qem * reference[name]
        chosen[name] = next((b for b in bits_sorted if by_bits[b] <= limit), bits_sorted[-1])
    return chosen


def allocate_by_budget(errors: Mapping[str, Mapping[int, float]], costs: Mapping[str, Mapping[int, int]],
                       num_weights: Mapping[str, int], target_bits: float) -> dict[str, int]:
    """Bit widths meeting ``sum(cost) <= target_bits * sum(num_weights)`` with the least total error.

    ``errors[name][bits]`` must already be on a common scale (see module docstring); ``costs`` are
    the stored bits of each layer at each width.

    Raises:
        ValueError: the target is below what the smallest candidates cost.
    """
    budget = target_bits * sum(num_weights.values())
    chosen = {name: min(by_bits) for name, by_bits in errors.items()}
    spent = sum(costs[name][b] for name, b in chosen.items())
    if spent > budget:
        floor = spent / sum(num_weights.values())
        raise ValueError(
            f"target_bits={target_bits} is below {floor:.3f}, the bits per weight of every layer at the smallest "
            "candidate width (overheads included); raise target_bits or add smaller candidates"
        )
    while True:
        best = None
        for name, current in chosen.items():
            for bits in errors[name]:
                extra = costs[name][bits] - costs[name][current]
                if bits <= current or extra <= 0 or spent + extra > budget:
                    continue
                gain = (errors[name][current] - errors[name][bits]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, bits, extra)
        if best is None:
            return chosen
        _, name, bits, extra = best
        chosen[name] = bits
        spent += extra
