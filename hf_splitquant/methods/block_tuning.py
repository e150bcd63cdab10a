"""Block-wise tuning after calibrated rounding (``SplitQuantConfig(block_tuning={...})``): the options and
the pure pieces of the objective.

Layer-wise rounding (GPTQ, Attention Round) makes each layer's output error small on its own inputs, but at
two or three bits the errors of the layers of a decoder block add up and interact (the attention's softmax,
the MLP's gate). Block-wise tuning (in the spirit of BRECQ, Li et al. 2021, and EfficientQAT's block-wise
stage, Chen et al. 2024) then trains, for each decoder block in turn, the learned grid scales **and** the
latent weights of all the block's quantized layers together, with the straight-through estimator on the
packed format's own grid (:class:`~hf_splitquant.nn.fake_quant.FakeQuantLinear` with learned scales),
against the float model's output of that block:

    minimise  mean over tokens |block_q(x_q) - target|^2 / |target|^2   (``loss="relative"``, the default;
                                                                         ``"mse"``: without the division)
    target = float block(x_f)  (``target="float"``)  or  float block(x_q)  (``target="block"``)

where ``x_q`` are the block's inputs from the already quantized (and tuned) blocks before it and ``x_f`` the
float model's. ``"float"`` lets a block also undo the error that reached it. Tuning starts from the rounding's
result exactly (the latent weights are the dequantized codes, the scales the packed ones), and a block whose
held-out loss ends higher than it started keeps the rounding's codes (``keep_best``).

Defaults (``benchmarks/results/block_tuning_sweep.md``, first 3 blocks of SmolLM2-135M at INT2 g64, held-out
error of the third block: GPTQ alone 1649): 20 epochs, scale rate 0.001 and weight rate 0.02 grid steps give 372;
10 epochs 441; scales alone make it worse (kept GPTQ); a weight rate of 0.04 overfits (640). The loss:
on SmolLM2-135M INT3 g128 the squared error let one held-out token (a spurious massive activation) decide
``keep_best`` for six blocks and the float model's own massive activations dominate the fitted error from block
11 on; the relative error gave 40.09 against 41.81 perplexity (``benchmarks/results/calibration_block_tuning.md``).

Learning rates are in units of each layer's grid step (its mean scale), as in
:func:`hf_splitquant.qat.qat_parameter_groups` with ``per_grid_step=True``: one absolute rate cannot fit
layers whose steps differ by an order of magnitude. The schedule is a cosine decay to zero over all steps of
a block. Memory: one block's parameters, gradients and Adam state, plus one batch's activations for the
backward pass; the calibration loop keeps the float model's block inputs and the targets (two more copies of
one block's activations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .base import options_from_dict

__all__ = ["BlockTuningOptions", "TARGETS", "LOSSES", "COMPUTE_DTYPES", "masked_mse", "masked_token_error", "cosine_factor"]

#: what a tuned block is fitted to (module docstring)
TARGETS = ("float", "block")
#: how the error of one token is measured (:func:`masked_token_error`)
LOSSES = ("mse", "relative")
#: the dtypes the training steps' products may run in (``BlockTuningOptions.compute_dtype``)
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class BlockTuningOptions:
    """Hyper-parameters of block-wise tuning (``SplitQuantConfig.block_tuning``).

    Attributes:
        epochs: passes over the fitted calibration batches per block (one optimizer step per batch).
        scale_lr: Adam learning rate of the grid scales, in units of the layer's mean grid step.
        weight_lr: Adam learning rate of the latent weights (and biases), in units of the layer's mean grid
            step; ``0`` trains the scales only.
        target: ``"float"`` (the float model's block output on the float model's inputs) or ``"block"`` (the
            float block on the quantized model's inputs).
        keep_best: keep the rounding's codes for a block whose held-out loss (or, with nothing held out, fitted
            loss) rises.
        loss: ``"mse"``: each token's squared error; ``"relative"``: each token's squared error divided by its
            target's squared norm (what the next block sees: every reader of the residual stream normalises
            each token first, so a token's error matters relative to its size; a few "massive activation"
            tokens, thousands of times larger than the rest, then no longer decide the loss alone).
        best_epoch: measure the held-out loss after every epoch and end the block at the epoch with the lowest
            (the rounding's codes count as epoch 0, so this includes ``keep_best``); a guard against the
            overfitting of a few calibration tokens, at the cost of one held-out pass per epoch. Without
            held-out batches it does nothing.
        compute_dtype: ``"float32"``, ``"bfloat16"`` or ``"auto"``: the dtype of the training steps' matrix
            products (``torch.autocast``; the straight-through rounding, the loss and every held-out or keep-best
            measurement stay float32). ``"bfloat16"`` made a SmolLM2-135M block's training step 1.5x
            faster on a CPU with AVX-512 BF16 (2 threads, idle) (``benchmarks/bench_block_tuning_step.py``) and
            whole tuned calibrations 1.5x faster at the same quality (INT2 g64: 90.66 against 91.03 perplexity,
            ``benchmarks/results/calibration_block_tuning.md``); on a CPU without native bf16 it can be slower.
            ``"auto"`` (what the tuned recipes use) takes bf16 where the hardware computes it natively (a CPU
            with AVX-512 BF16 or AMX, a GPU that supports bf16) and float32 elsewhere.
        norm_lr: Adam learning rate (absolute, not in grid steps) of the block's float parameters that are not
            part of a quantized layer: its norms' weights (and biases), and any layer left unquantized; ``0``
            keeps them frozen. A norm's weight scales the inputs of every layer it feeds (q, k, v after the
            attention norm; gate and up after the MLP norm), a per-channel correction the rounding cannot
            make; the tuned values are saved as the float parameters they are. Measured on SmolLM2-135M INT3 g128
            (rotated, 128 x 512 tokens): it lowers the early blocks' held-out error but the whole model's perplexity
            rose 5.6% (30.08 -> 31.77; ``benchmarks/results/rotation.md`` "Session 31"), so no recipe uses it.
    """

    epochs: int = 20
    scale_lr: float = 0.001
    weight_lr: float = 0.02
    target: str = "float"
    keep_best: bool = True
    loss: str = "relative"
    best_epoch: bool = False
    compute_dtype: str = "float32"
    norm_lr: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ValueError(f"block_tuning['epochs'] must be an integer >= 1, got {self.epochs!r}")
        for name, positive in (("scale_lr", True), ("weight_lr", False), ("norm_lr", False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0"
                unit = "" if name == "norm_lr" else " (in grid steps)"
                raise ValueError(f"block_tuning[{name!r}] must be a number {bound}{unit}, got {value!r}")
        if self.target not in TARGETS:
            raise ValueError(f"block_tuning['target'] must be one of {TARGETS}, got {self.target!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"block_tuning['loss'] must be one of {LOSSES}, got {self.loss!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"block_tuning['compute_dtype'] must be one of {COMPUTE_DTYPES}, got "
                             f"{self.compute_dtype!r}")
        for name in ("keep_best", "best_epoch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"block_tuning[{name!r}] must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> BlockTuningOptions:
        """The options from ``SplitQuantConfig.block_tuning`` (``None`` or ``{}``: the defaults); unknown keys
        and bad values raise ``ValueError`` naming them."""
        return options_from_dict(cls, options, "block-wise tuning", field="block_tuning")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``(sum of squared errors over the real tokens, number of real tokens)``; ``mask`` ``[batch, tokens]``
    (``True``: a real token) or ``None`` (every token counts). Hidden states are ``[batch, tokens, hidden]``."""
    return masked_token_error(output, target, mask, "mse")


def masked_token_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                       loss: str = "mse") -> tuple[torch.Tensor, int]:
    """``(sum over the real tokens of each token's error, number of real tokens)`` with ``loss`` ``"mse"``
    (each token's squared error) or ``"relative"`` (that over its target's squared norm); ``mask`` as in
    :func:`masked_mse`."""
    if loss not in LOSSES:
        raise ValueError(f"unknown block-tuning loss {loss!r}; expected one of {LOSSES}")
    target = target.float()
    error = (output.float() - target).pow(2).sum(dim=-1)
    if loss == "relative":
        error = error / target.pow(2).sum(dim=-1).clamp_min(1e-12)
    if mask is None:
        return error.sum(), error.numel()
    mask = mask.to(error.device)
    return (error * mask).sum(), int(mask.sum())


def cosine_factor(step: int, total: int) -> float:
    """The learning-rate factor of ``step`` (0-based) of ``total``: from 1 down to 0 along half a cosine
    (the last step still moves, by a small amount)."""
    if total <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))
