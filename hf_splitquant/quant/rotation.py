"""Input rotation by block-diagonal Walsh-Hadamard matrices (incoherence processing).

A layer ``y = x W^T`` computes the same with ``W' = W R`` and ``x' = x R`` for any orthogonal ``R``
(``x' W'^T = x R R^T W^T``). With ``R = diag(H_b, ..., H_b)``, ``H_b`` the normalised Sylvester Hadamard
matrix of order ``b`` (a power of two), each block of ``b`` input columns of ``W`` is mixed: a few large
weights spread over their block, the groups' ranges shrink relative to their spread, and error-feedback
rounding (GPTQ) on the rotated problem loses less. ``H_b`` is symmetric and orthogonal, so ``R`` is its
own inverse: the same :func:`rotate_inputs` turns weights and inputs into the rotated basis and back.

Measured on SmolLM2-135M (``benchmarks/results/rotation.md``): output-aware clip + GPTQ, one shot,
``b = 64``: INT4 g128 26.39 -> 24.77 perplexity, INT3 g128 45.48 -> 38.06 (float 22.17); INT2 g64 no
better (315 -> 326); plain round-to-nearest is *worse* rotated (INT3 g128 115 -> 484). The rotation is
stored as one integer (``LayerSpec.input_rotation``): it costs no bits per weight.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard", "rotate_inputs", "rotate_layer_input", "rotate_hessian", "check_block", "is_block"]


def is_block(block: object) -> bool:
    """Whether ``block`` is a valid rotation block: an integer power of two >= 2."""
    return isinstance(block, int) and not isinstance(block, bool) and block >= 2 and not block & (block - 1)


def check_block(block: int) -> None:
    """Raise ``ValueError`` unless ``block`` is a power of two >= 2."""
    if not is_block(block):
        raise ValueError(f"a Hadamard rotation block must be a power of two >= 2 (e.g. 64), got {block!r}")


@functools.cache
def _hadamard_cpu(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


def hadamard(block: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised ``[block, block]`` Sylvester Hadamard matrix (symmetric, orthogonal)."""
    check_block(block)
    return _hadamard_cpu(block).to(dtype=dtype, device=device)


def rotate_inputs(t: torch.Tensor, block: int, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``t R`` along the last dimension (its size a multiple of ``block``): each run of ``block`` values is
    multiplied by ``H_block``. Its own inverse. ``matrix``: ``hadamard(block)`` in ``t``'s dtype/device,
    when the caller keeps one (the forward pass of a layer)."""
    n = t.shape[-1]
    if n % block:
        raise ValueError(f"cannot rotate {n} features in blocks of {block}: {n} is not a multiple of {block}")
    h = matrix if matrix is not None else hadamard(block, t.dtype, t.device)
    return (t.reshape(-1, block) @ h).reshape(t.shape)  # one 2-D GEMM over every run of `block` values


class _LastRotation:
    """The last input a layer rotated and its result: q/k/v (and gate/up) read the very same tensor, so the layers
    after the first reuse its rotation instead of computing it again (eager decoding spends ~10 us per rotation)."""

    source: torch.Tensor | None = None
    key: tuple = ()
    result: torch.Tensor | None = None


def rotate_layer_input(x: torch.Tensor, block: int, matrix: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_inputs` for a layer's forward pass: the product in float32 (``matrix`` float32; one small GEMM,
    cheaper than a bf16 one on CPU and exact to float32 rounding), the result in ``x``'s dtype, reused when the
    previous call rotated the same, unmodified tensor in the same grad mode (outside ``torch.compile``, whose graph
    shares the product anyway)."""
    if torch.compiler.is_compiling():
        return _rotate_float32(x, block, matrix)
    # (inference tensors keep no version counter; model code does not modify its hidden states in place)
    version = -1 if x.is_inference() else x._version
    key = (version, block, x.dtype, x.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    last = _LastRotation
    if last.source is x and last.key == key:
        return last.result
    result = _rotate_float32(x, block, matrix)
    last.source, last.key, last.result = x, key, result
    return result


def _rotate_float32(x: torch.Tensor, block: int, matrix: torch.Tensor) -> torch.Tensor:
    return rotate_inputs(x.float(), block, matrix).to(x.dtype)  # (no-op casts for float32 inputs)


def rotate_hessian(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """``R^T H R``: the ``X^T X`` of the rotated inputs ``X R`` from the ``X^T X`` of ``X``."""
    return rotate_inputs(rotate_inputs(hessian, block).transpose(0, 1), block).transpose(0, 1).contiguous()
