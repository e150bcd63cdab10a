"""GPTQ error feedback (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") on a FIXED element grid.

The layer objective is the one of :mod:`hf_splitquant.methods.attention_round`:
``|X (W_q - W)^T|^2 = tr(D H D^T)`` with ``D = W_q - W`` and ``H = X^T X`` summed over the calibration
tokens. GPTQ quantizes the input columns one after the other; after column ``j`` is rounded, the
remaining (not yet quantized) columns are updated so that they compensate, in the least-squares sense
of ``H``, for the error just made (the Optimal Brain Surgeon update restricted to one column). With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), the update for column ``j`` is
``W[:, k] -= (w_j - q_j) / U[j, j] * U[j, k]`` for ``k > j``; the rows are independent, so all rows
are done at once. Lazy blocks: the updates inside a block of ``block_size`` columns are applied at
once, and the accumulated errors of the block are pushed to the rest of the matrix with one matrix
product (same result, far less memory traffic).

Unlike the original, the grid here does not change while the columns are processed: every element
``(r, c)`` keeps the levels ``offset[r, c] + k * scale[r, c]`` of its :class:`~hf_splitquant.quant.grid.ElementGrid`
(:func:`hf_splitquant.methods.element_grid`), and the code of an error-corrected weight is its nearest
level, clamped to ``0 .. max_code``. The grid may therefore come from any format: RTN groups, OCS's
expanded columns (``H`` expanded with :func:`~hf_splitquant.methods.attention_round.expand_hessian`; the
duplicated columns see exactly the same inputs, so GPTQ can move error between the two halves),
SplitQuant's per-cluster grids, or the output-aware clipped grids of
:mod:`hf_splitquant.methods.output_clip`. Because the grid is fixed, ``act_order`` (columns in order of
decreasing ``H_jj``) needs no "static groups" trick.

Dampening. ``H`` estimated from a few thousand tokens is ill-conditioned (``down_proj``: 1536 inputs),
and the error feedback then fits noise of the calibration set. :func:`damp_hessian` adds
``damping * mean(diag H)`` to the diagonal; ``damping -> inf`` gives round-to-nearest.

Defaults, from ``benchmarks/study_layers.py`` (``benchmarks/results/layer_study.md``; SmolLM2-135M,
``layers.5`` q/v/o/down_proj and ``layers.20`` up_proj; ``H`` from 8 x 256 calibration tokens; the
error measured with the ``H`` of 8 x 256 held-out tokens from other articles, relative to RTN, mean
over the 5 layers, at INT2 g64 / INT3 g128 / INT4 g128):

* Damping. On the min-max grid, damping 0.01 (GPTQ's usual value) is no better than RTN held-out
  (1.07 / 1.03 / 1.01; ``down_proj``, 1536 inputs for 2048 tokens: 2.2-2.3x RTN) although it fits the
  calibration data best (0.25 / 0.21 / 0.20). Held-out: 0.1 gives 0.82 / 0.77 / 0.75, 0.3 gives
  0.76 / 0.72 / 0.69, 1.0 gives 0.75 / 0.71 / 0.68, 3.0 gives 0.77 / 0.73 / 0.70. The best damping
  depends on the layer: 0.1-0.3 for q/v/o/up_proj, 1-3 for ``down_proj`` (whose ``H`` is the worst
  estimated). Hence :data:`DEFAULT_DAMPING` ``= 1.0`` for a fixed value (against each layer's best
  damping it loses up to 0.05, on ``o_proj``; on ``down_proj`` it gains 0.08-0.14 over 0.3 and
  0.3-0.4 over 0.1), and :func:`select_damping` (2-fold
  cross-validation over :data:`DAMPING_CANDIDATES`) when the statistics can be kept as two halves:
  on the output-clipped grid it gives 0.46 / 0.53 / 0.58 against 0.46 / 0.53 / 0.60 for 1.0 and
  0.47 / 0.54 / 0.61 for 0.3, at 8 GPTQ runs per layer.
* Grid. GPTQ on the output-aware clipped grid (:mod:`hf_splitquant.methods.output_clip`) beats GPTQ
  on the min-max grid at every damping (damping 1.0: 0.46 / 0.53 / 0.60 against 0.75 / 0.71 / 0.68)
  and on the MSE-clipped grid (0.52 / 0.56 / 0.62).
* Attention Round. AR alone (100 steps) reaches 0.84 / 0.79 / 0.77 held-out; started from GPTQ's codes
  (``attention_round(..., init_codes=codes)``) on the undamped ``H`` it lowers the fit error further
  but the held-out error rises (0.88 / 0.82 / 0.78 from GPTQ@0.1's 0.82 / 0.77 / 0.75): it overfits.
  On the damped ``H`` (the same damping as GPTQ) from the output-clipped GPTQ codes it is no better
  than those codes (0.464 / 0.534 / 0.583 against 0.460 / 0.526 / 0.583) at about 10x the time (GPTQ: about 1 s per layer, AR about 9 s). So:
  output-aware clip + GPTQ, damping by cross-validation (or 1.0); AR only as an optional refinement
  on the damped ``H``, started from GPTQ's codes, with ``keep_best``.
* ``act_order=True``: on the output-clipped grid at damping 1.0 it gives 0.46 / 0.53 / 0.60 against
  0.48 / 0.57 / 0.64 in the natural column order (``block_size`` changes the speed only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..quant.grid import ElementGrid
from .attention_round import expand_hessian
from .base import options_from_dict

__all__ = ["DAMPING_CANDIDATES", "DEFAULT_DAMPING", "GPTQOptions", "damp_hessian", "gptq_round", "hessian_objective",
           "select_damping"]

#: Relative dampening of ``H`` (fraction of the mean diagonal); chosen by the held-out layer study
#: (module docstring): robust with a few thousand calibration tokens.
DEFAULT_DAMPING = 1.0

#: Dampings tried by :func:`select_damping`.
DAMPING_CANDIDATES = (0.1, 0.3, 1.0, 3.0)


def damp_hessian(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``H + damping * mean(diag H) * I`` (a new float64 tensor).

    Dead inputs (``H_jj == 0``: the input was always zero on the calibration data, so its row and
    column of ``H`` are zero) get ``H_jj = 1`` first, as in GPTQ, so that ``H`` stays invertible; their
    weights do not enter the objective and no error is fed back through them. The mean is taken over
    the live inputs only (over all, if every input is dead), so that dead inputs do not dilute it.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the hessian must be square, got shape {tuple(hessian.shape)}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag == 0
    live_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = 1.0
    diag += damping * live_mean
    return h


def hessian_objective(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)`` with ``D = weight - reference``: the summed squared output error ``|X D^T|^2``."""
    d = (weight.double() - reference.double())
    return float(((d @ hessian.double()) * d).sum())


def _inverse_cholesky(h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``h^-1``; if ``h`` is numerically not positive definite, more of the
    mean diagonal is added (x10 each try). Returns ``(U, extra relative damping added)``."""
    mean = float(h.diagonal().mean())
    extra = 0.0
    for _ in range(8):
        lower, bad = torch.linalg.cholesky_ex(h)
        if int(bad) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, bad = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(bad) == 0:
                return upper, extra
        step = 1e-6 if extra == 0.0 else extra * 9.0  # extra -> 1e-6, 1e-5, 1e-4, ...
        h = h + step * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        extra += step
    raise ValueError("the hessian is not positive definite even after extra damping (NaN in the statistics?)")


def gptq_round(grid: ElementGrid, hessian: torch.Tensor, damping: float = DEFAULT_DAMPING, block_size: int = 128,
               act_order: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Choose the integer codes of ``grid`` by GPTQ error feedback.

    Args:
        grid: the layer's :class:`ElementGrid` (``grid.weight``: the float weight; OCS: expanded).
        hessian: ``X^T X`` of the layer's inputs, ``[cols, cols]``; for an OCS grid either already
            expanded or the original ``[in, in]`` one (then expanded here with ``grid.input_index``).
        damping: relative dampening, see :func:`damp_hessian`.
        block_size: columns per lazy block (affects speed only, up to float rounding).
        act_order: process columns in order of decreasing ``H_jj`` (the most important first, so
            that their errors can still be compensated by many columns).

    Returns:
        ``(codes uint8 [out, cols], info)`` with ``info``: ``objective_rtn`` and ``objective`` (the
        undamped ``tr(D H D^T)`` of round-to-nearest and of the returned codes), ``damping`` (including
        any extra damping needed for a numerically singular ``H``), ``act_order`` and ``seconds``.
    """
    start = time.perf_counter()
    w = grid.weight.float()
    out_f, cols = w.shape
    h = hessian
    if grid.input_index is not None and h.shape[0] == cols - grid.input_index.numel():
        h = expand_hessian(h, grid.input_index)
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"the hessian is {tuple(h.shape)} but the grid has {cols} input columns")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    scale, offset, max_code = grid.scale.float(), grid.offset.float(), grid.max_code
    damped = damp_hessian(h, damping)
    order = torch.argsort(damped.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        damped = damped[order][:, order]
        w, scale, offset = w[:, order], scale[:, order], offset[:, order]
    upper, extra = _inverse_cholesky(damped)
    u = upper.float()

    work = w.clone()  # the error-corrected weights
    codes = torch.empty(out_f, cols, dtype=torch.float32)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = work[:, b0:b1]  # a view: updates land in `work`
        errors = torch.empty(out_f, b1 - b0)
        for i in range(b1 - b0):
            j = b0 + i
            c = torch.round((block[:, i] - offset[:, j]) / scale[:, j]).clamp_(0, max_code)
            codes[:, j] = c
            err = (block[:, i] - (offset[:, j] + c * scale[:, j])) / u[j, j]
            # feed the error of column j to the block's later columns (rank-1 update)
            block[:, i + 1:].addr_(err, u[j, j + 1:b1], alpha=-1.0)
            errors[:, i] = err
        if b1 < cols:  # lazy update of everything after the block
            work[:, b1:].addmm_(errors, u[b0:b1, b1:], alpha=-1.0)
    if order is not None:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
    codes = codes.to(torch.uint8)
    rtn = grid.nearest_codes()
    info = {
        "objective_rtn": hessian_objective(grid.values(rtn), grid.weight, h),
        "objective": hessian_objective(grid.values(codes), grid.weight, h),
        "damping": damping + extra,
        "act_order": act_order,
        "seconds": time.perf_counter() - start,
    }
    return codes, info


def select_damping(grid: ElementGrid, fold_hessians: list[torch.Tensor],
                   candidates: tuple[float, ...] = DAMPING_CANDIDATES, block_size: int = 128,
                   act_order: bool = True) -> tuple[float, dict[float, float]]:
    """The damping that generalises best, by cross-validation over calibration folds.

    ``fold_hessians`` are the ``X^T X`` of disjoint parts of the calibration tokens (e.g. two halves,
    kept as two sums); for each fold, GPTQ is fitted on the sum of the other folds and its error
    measured on that fold, relative to round-to-nearest on the same fold. The score of a damping is
    the mean of these ratios (lower is better; ties keep the earlier candidate).

    Returns:
        ``(best damping, {damping: score})``. Fit the final codes on the sum of all folds with it.
    """
    if len(fold_hessians) < 2:
        raise ValueError("cross-validation needs at least two folds")
    if not candidates:
        raise ValueError("no damping candidates")
    total = sum(h.double() for h in fold_hessians)
    rtn_values = grid.values(grid.nearest_codes())
    scores: dict[float, float] = {}
    for damping in candidates:
        ratios = []
        for held in fold_hessians:
            codes, _ = gptq_round(grid, total - held.double(), damping, block_size, act_order)
            h = held
            if grid.input_index is not None and held.shape[0] != grid.weight.shape[1]:
                h = expand_hessian(held, grid.input_index)
            base = hessian_objective(rtn_values, grid.weight, h)
            ratios.append(hessian_objective(grid.values(codes), grid.weight, h) / base if base > 0 else 1.0)
        scores[damping] = sum(ratios) / len(ratios)
    best = min(candidates, key=lambda d: scores[d])
    return best, scores


#: grids GPTQ (and Attention Round) may round on: the format's min-max grid or the output-aware clip
CLIPS = (None, "output")

#: what the rounding reproduces: the layer's float output on its actual inputs, or the float model's
TARGETS = ("layer", "float")


@dataclass(frozen=True)
class GPTQOptions:
    """Options of ``rounding="gptq"`` (``SplitQuantConfig.rounding_options``).

    Attributes:
        damping: relative dampening of ``H`` (:func:`damp_hessian`); default from the held-out layer study.
        block_size: columns per lazy block (speed only).
        act_order: columns in order of decreasing ``H_jj``.
        clip: ``"output"`` (default): round on the output-aware clipped grid
            (:mod:`hf_splitquant.methods.output_clip`; formats without clipped grids, SplitQuant, keep
            their own grid); ``None``: the format's min-max grid.
        keep_best: keep round-to-nearest (on the same grid) for a layer whose GPTQ codes are worse on
            the fitted or the held-out inputs.
        target: ``"layer"`` (classic GPTQ): reproduce the float layer's output on the inputs the partly
            quantized model gives it; ``"float"``: reproduce the float *model's* output at this layer, so
            that the error of the layers before it is corrected too
            (:mod:`hf_splitquant.methods.float_target`; costs a float copy of one block and its inputs).
        target_damping: with ``target="float"``, the relative regularisation of the target towards the
            float weight (:func:`~hf_splitquant.methods.float_target.float_model_target`).
    """

    damping: float = DEFAULT_DAMPING
    block_size: int = 128
    act_order: bool = True
    clip: str | None = "output"
    keep_best: bool = True
    target: str = "layer"
    target_damping: float = 0.1

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"rounding_options['target'] must be one of {TARGETS}, got {self.target!r}")
        t = self.target_damping
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"rounding_options['target_damping'] must be a number >= 0, got {t!r}")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            raise ValueError(f"rounding_options['damping'] must be a number >= 0, got {d!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"rounding_options['block_size'] must be an integer >= 1, got {self.block_size!r}")
        for name in ("act_order", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rounding_options[{name!r}] must be True or False, got {getattr(self, name)!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"rounding_options['clip'] must be one of {CLIPS}, got {self.clip!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> GPTQOptions:
        """Validate ``rounding_options``: unknown keys and bad values raise ``ValueError``."""
        return options_from_dict(cls, options, "gptq")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
