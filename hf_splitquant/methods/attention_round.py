"""Attention Round (Diao, Li, Xu, Hao; arXiv 2207.03088): every weight may take *any* level of its
grid, through a Gaussian "attention" over the levels that is annealed until it is hard.

No reference code exists; this is our reconstruction from the paper.

Soft assignment
    Each element has a grid ``q_k = offset + k * scale`` (``k = 0 .. max_code``, from
    :func:`hf_splitquant.methods.element_grid`). We optimise a continuous code ``t`` per element
    (``v = offset + t * scale``, initialised at the float weight) and give level ``k`` the probability
    ``p_k ∝ exp(-(v - q_k)^2 / (2 (sigma * scale)^2)) = exp(-(t - k)^2 / (2 sigma^2))``, so ``sigma``
    is measured in grid steps. The layer computes with ``sum_k p_k q_k`` (``mode="expectation"``,
    the default) or with one level drawn from ``p`` (``mode="sample"``; straight-through gradient of
    the expectation). ``sigma`` is annealed geometrically from ``sigma_start`` to ``sigma_end``; at the
    end the codes are ``argmax_k p_k``, which is the level nearest to ``v`` for every ``sigma``.

Window
    Only the levels within ``half_width`` of the nearest one are evaluated (``2 * half_width + 1``
    instead of ``2**bits``). With ``window=None`` the half-width follows ``sigma``: it is the smallest
    integer ``w`` with ``exp(-((w + 1/2)^2 - 1/4) / (2 sigma^2)) <= window_tol`` (default ``1e-6``),
    i.e. every level left out has at most ``window_tol`` times the probability of the nearest level
    (at ``sigma = 1``: ``w = 5``; at ``sigma <= 0.2``: ``w = 1``). The expectation and its gradient are
    therefore exact up to that relative mass. ``window=K`` fixes ``w = K`` instead. Any level stays
    reachable: the window moves with ``t``.

Objective (layer-wise)
    The mean squared error between the float layer's output and the soft-quantized layer's output
    on the layer's calibration inputs ``X`` (``N`` rows): ``|X (W_soft - W)^T|^2 / (N * out)``. It
    depends on the data only through ``H = X^T X`` (``cols x cols``), so the statistics are summed
    once (exactly, across processes: see :mod:`hf_splitquant.calibration`) and every
    iteration is a full-batch step costing one ``[out, cols] x [cols, cols]`` product whatever ``N``.
    OCS appends ``x[..., input_index]`` to the input; its ``H`` is the original one gathered on those
    indices (:func:`expand_hessian`). The loss handed to Adam is divided by the round-to-nearest loss
    so that the learning rate (in grid steps per iteration) is scale-free.

Defaults, measured on SmolLM2-135M layers (``layers.5`` q/o/down_proj, ``layers.20`` up_proj; INT2-4,
groups of 64; inputs from 16 x 256 Wikipedia calibration tokens), as the layer MSE relative to
round-to-nearest: ``iterations=100`` gives 0.26-0.44 (25 steps: 0.35-0.53; 50: 0.30-0.48; 200:
0.26-0.42, at 2x the time); ``lr`` 0.03-0.08 and ``sigma_start`` 0.3-1.0 are all within +-0.02 of each
other at 100 steps, so ``lr=0.05``, ``sigma_start=0.5``; ``sigma_end=0.05`` (0.1 leaves the codes soft
until the end: 0.42-0.64 at 50 steps; 0.02-0.03: the same or slightly worse); the geometric schedule beats the
linear one (0.30-0.48 vs 0.32-0.53 at 50 steps) and the expectation beats sampling (sampling:
0.39-0.60 at 50 steps, and 2x slower). ``keep_best=True``: if the hardened codes are worse than
round-to-nearest on the objective, round-to-nearest is kept, so a layer never gets worse on its own
calibration objective.

Cost per step: one ``[out, cols] x [cols, cols]`` product and about ``7 * (2 w + 1) + 20`` elementwise
passes over the weight (no allocation: the buffers are reused); on SmolLM2-135M about 11 s per step
for all 210 layers on one shared CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..quant.grid import ElementGrid
from .base import options_from_dict

__all__ = [
    "AttentionRoundOptions",
    "attention_round",
    "expand_hessian",
    "hessian_from_inputs",
    "layer_objective",
    "level_probabilities",
    "sigma_schedule",
    "soft_codes",
    "window_half_width",
]

MODES = ("expectation", "sample")
SCHEDULES = ("geometric", "linear")
OBJECTIVES = ("layer",)


@dataclass(frozen=True)
class AttentionRoundOptions:
    """Hyper-parameters of Attention Round (``SplitQuantConfig.rounding_options``).

    Attributes:
        iterations: optimisation steps per layer (full-batch Adam steps); 0 gives round-to-nearest.
        lr: Adam learning rate, in grid steps of the continuous code.
        sigma_start / sigma_end: width of the Gaussian attention at the first / last step, in grid
            steps (``sigma_end < sigma_start``).
        schedule: ``"geometric"`` (default) or ``"linear"`` annealing of sigma.
        window: ``None`` (adaptive, exact to ``window_tol``) or a fixed half-width in levels (>= 1).
        window_tol: adaptive window: largest relative probability of a level left out.
        mode: ``"expectation"`` (the layer uses ``sum_k p_k q_k``) or ``"sample"`` (one level drawn
            from ``p`` per element and step, seeded; straight-through gradient).
        objective: ``"layer"``: the layer's output MSE on its calibration inputs.
        keep_best: keep round-to-nearest for a layer whose hardened codes are worse on the objective
            (in calibration: on the fitted or the held-out inputs).
        clip: ``None`` (default): the format's min-max grid; ``"output"``: the output-aware clipped grid
            (:mod:`hf_splitquant.methods.output_clip`), chosen in calibration from the layer's ``H``.
    """

    iterations: int = 100
    lr: float = 0.05
    sigma_start: float = 0.5
    sigma_end: float = 0.05
    schedule: str = "geometric"
    window: int | None = None
    window_tol: float = 1e-6
    mode: str = "expectation"
    objective: str = "layer"
    keep_best: bool = True
    clip: str | None = None

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = math.inf, low_open: bool = True) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bound = f"> {low}" if low_open else f">= {low}"
                raise ValueError(f"rounding_options[{name!r}] must be a number {bound}"
                                 f"{'' if high == math.inf else f' and <= {high}'}, got {value!r}")

        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 0:
            raise ValueError(f"rounding_options['iterations'] must be an integer >= 0, got {self.iterations!r}")
        number("lr", 0.0)
        number("sigma_start", 0.0)
        number("sigma_end", 0.0)
        number("window_tol", 0.0, 0.5)
        if self.sigma_end > self.sigma_start:
            raise ValueError(f"rounding_options: sigma_end ({self.sigma_end}) must not exceed sigma_start "
                             f"({self.sigma_start}); sigma is annealed downwards")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"rounding_options['schedule'] must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 1):
            raise ValueError(f"rounding_options['window'] must be None (adaptive) or an integer >= 1, "
                             f"got {self.window!r}")
        if self.mode not in MODES:
            raise ValueError(f"rounding_options['mode'] must be one of {MODES}, got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"rounding_options['objective'] must be one of {OBJECTIVES}, got {self.objective!r} "
                             "(block-wise reconstruction is not implemented)")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"rounding_options['keep_best'] must be True or False, got {self.keep_best!r}")
        if self.clip not in (None, "output"):
            raise ValueError(f"rounding_options['clip'] must be None or 'output', got {self.clip!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> AttentionRoundOptions:
        """Validate ``rounding_options``: unknown keys and bad values raise ``ValueError``."""
        return options_from_dict(cls, options, "attention_round")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Soft assignment
# --------------------------------------------------------------------------------------------


def sigma_schedule(options: AttentionRoundOptions) -> list[float]:
    """The sigma (in grid steps) of every iteration."""
    n = options.iterations
    if n == 0:
        return []
    if n == 1:
        return [options.sigma_end]
    a, b = options.sigma_start, options.sigma_end
    if options.schedule == "geometric":
        return [a * (b / a) ** (i / (n - 1)) for i in range(n)]
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def window_half_width(sigma: float, max_code: int, window: int | None = None, tol: float = 1e-6) -> int:
    """Levels evaluated on each side of the nearest one (see the module docstring)."""
    if window is None:
        window = max(1, math.ceil(math.sqrt(0.25 + 2.0 * sigma * sigma * math.log(1.0 / tol)) - 0.5 - 1e-9))
    return int(min(window, max_code))


def level_probabilities(codes: torch.Tensor, max_code: int, sigma: float, window: int | None = None) -> torch.Tensor:
    """Probabilities ``[..., max_code + 1]`` of every level for continuous codes ``t`` (reference form).

    ``window=None`` uses all levels; otherwise levels further than ``window`` from the nearest one get
    probability 0 (as in the fast path :func:`soft_codes`).
    """
    t = codes.float().unsqueeze(-1)
    levels = torch.arange(max_code + 1, dtype=torch.float32, device=codes.device)
    logits = -((t - levels) ** 2) / (2.0 * sigma * sigma)
    if window is not None:
        nearest = codes.float().round().clamp(0, max_code).unsqueeze(-1)
        logits = logits.masked_fill((levels - nearest).abs() > window, -math.inf)
    return torch.softmax(logits, dim=-1)


def soft_codes(t: torch.Tensor, max_code: int, sigma: float, half_width: int,
               generator: torch.Generator | None = None,
               workspace: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected code ``sum_k p_k k`` and its derivative ``d/dt = Var_p(k) / sigma^2``, over the window.

    With a ``generator``, the first output is a level drawn from ``p`` instead (Gumbel-max), with
    the same (straight-through) derivative.

    Only ``2 * half_width + 1`` levels around the nearest valid level ``n`` are summed; offsets are
    taken relative to ``n`` (logit of level ``n + j`` relative to ``n``: ``j (2 f - j) / (2 sigma^2)``
    with ``f = t - n``), so every exponent is ``<= 0`` and nothing overflows.

    ``workspace`` (a dict the caller keeps between calls) holds the work buffers, so that an
    optimisation loop allocates nothing; the returned tensors are buffers of it, overwritten by the
    next call.
    """
    ws = {} if workspace is None else workspace

    def buf(name: str, dtype: torch.dtype = t.dtype) -> torch.Tensor:
        b = ws.get(name)
        if b is None or b.shape != t.shape or b.dtype != dtype:
            b = ws[name] = torch.empty_like(t, dtype=dtype)
        return b

    n = torch.round(t, out=buf("n")).clamp_(0, max_code)
    f = torch.sub(t, n, out=buf("f"))
    inv = 1.0 / (2.0 * sigma * sigma)
    s0, s1, s2 = buf("s0").fill_(1.0), buf("s1").zero_(), buf("s2").zero_()
    logit, e, mask = buf("logit"), buf("e"), buf("mask", torch.bool)
    best = best_j = None
    if generator is not None:  # Gumbel-max sample: level n (offset 0) first
        best = -torch.log(-torch.log(torch.rand(t.shape, generator=generator).clamp_(1e-20, 1.0 - 1e-7)))
        best_j = torch.zeros_like(t)
    n_lo, n_hi = int(n.min()), int(n.max())
    for j in range(-half_width, half_width + 1):
        if j == 0 or not (n_lo + j <= max_code and n_hi + j >= 0):
            continue  # j == 0 is the initial value; skip offsets that are outside the grid everywhere
        torch.mul(f, 2.0 * j * inv, out=logit).sub_(j * j * inv)
        if j < 0 and n_lo + j < 0:
            logit.masked_fill_(torch.lt(n, -j, out=mask), -math.inf)  # level n + j below the grid
        elif j > 0 and n_hi + j > max_code:
            logit.masked_fill_(torch.gt(n, max_code - j, out=mask), -math.inf)  # above the grid
        torch.exp(logit, out=e)
        s0.add_(e)
        s1.add_(e, alpha=float(j))
        s2.add_(e, alpha=float(j * j))
        if generator is not None:
            g = -torch.log(-torch.log(torch.rand(t.shape, generator=generator).clamp_(1e-20, 1.0 - 1e-7)))
            score = logit.add_(g)
            take = score > best
            best = torch.where(take, score, best)
            best_j = torch.where(take, torch.full_like(t, float(j)), best_j)
    mean = s1.div_(s0)
    var = s2.div_(s0).addcmul_(mean, mean, value=-1.0).clamp_(min=0.0).mul_(1.0 / (sigma * sigma))
    value = n.add_(best_j if generator is not None else mean)
    return value, var


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (float32) of a layer's inputs ``[..., in]`` (every leading dimension is a row)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return x.t() @ x


def expand_hessian(hessian: torch.Tensor, input_index: torch.Tensor | None) -> torch.Tensor:
    """The ``H`` of the input ``[x, x[..., input_index]]`` (OCS) from the ``H`` of ``x``."""
    if input_index is None or input_index.numel() == 0:
        return hessian
    idx = torch.cat([torch.arange(hessian.shape[0], device=hessian.device), input_index.long().to(hessian.device)])
    return hessian.index_select(0, idx).index_select(1, idx)


def layer_objective(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor, count: int) -> float:
    """Output MSE ``|X (weight - reference)^T|^2 / (N * out)`` from ``H = X^T X`` and ``N = count``."""
    d = weight.float() - reference.float()
    return float(((d @ hessian) * d).sum(dtype=torch.float64)) / (max(count, 1) * d.shape[0])


# --------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------


def attention_round(grid: ElementGrid, hessian: torch.Tensor, count: int,
                    options: AttentionRoundOptions | Mapping[str, Any] | None = None,
                    seed: int = 0, init_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Choose the integer codes of ``grid`` by Attention Round.

    Args:
        grid: the layer's :class:`ElementGrid` (``grid.weight`` is the float weight the codes
            approximate; for OCS the expanded one).
        hessian: ``X^T X`` of the inputs the codes multiply, ``[cols, cols]`` (for OCS already
            expanded with :func:`expand_hessian`).
        count: number of input rows ``N`` that ``hessian`` sums (for the reported MSE).
        options: :class:`AttentionRoundOptions` or a dict of them.
        seed: seeds the level sampling of ``mode="sample"``.
        init_codes: optional integer codes ``[out, cols]`` (e.g. GPTQ's, :func:`hf_splitquant.methods.gptq.gptq_round`)
            to start from instead of the float weight. With ``keep_best`` they are also a candidate
            for the result, so the codes returned are never worse than them on the objective.

    Returns:
        ``(codes uint8 [out, cols], info)`` with ``info``: ``mse_rtn`` and ``mse`` (the objective of
        round-to-nearest and of the returned codes), ``kept_rtn`` and ``iterations``; with
        ``init_codes`` also ``mse_init`` and ``kept_init``.
    """
    if not isinstance(options, AttentionRoundOptions):
        options = AttentionRoundOptions.from_dict(options)
    w = grid.weight.float()
    cols = w.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"the hessian is {tuple(hessian.shape)} but the grid has {cols} input columns")
    h = hessian.float()
    scale, offset, max_code = grid.scale.float(), grid.offset.float(), grid.max_code
    rtn = grid.nearest_codes()
    mse_rtn = layer_objective(grid.values(rtn), w, h, count)
    info: dict[str, Any] = {"mse_rtn": mse_rtn, "mse": mse_rtn, "kept_rtn": False, "iterations": options.iterations}
    init = None
    if init_codes is not None:
        if init_codes.shape != w.shape or init_codes.is_floating_point():
            raise ValueError(f"init_codes must be integer codes of shape {tuple(w.shape)}")
        init = init_codes.clamp(0, max_code).to(torch.uint8)
        info["mse_init"] = layer_objective(grid.values(init), w, h, count)
        info["kept_init"] = False
    if options.iterations == 0 or mse_rtn == 0.0:
        if init is not None and (not options.keep_best or info["mse_init"] <= mse_rtn):
            info.update(mse=info["mse_init"], kept_init=True)
            return init, info
        return rtn, info

    t = ((w - offset) / scale if init is None else init.float()).clamp_(-0.5, max_code + 0.5)
    # Loss handed to Adam: |X D^T|^2 / |X D_rtn^T|^2 * numel, so that gradients are O(1) per element.
    norm = w.numel() / (mse_rtn * count * w.shape[0])
    m = torch.zeros_like(t)
    v = torch.zeros_like(t)
    grad = torch.empty_like(t)
    denom = torch.empty_like(t)
    workspace: dict[str, torch.Tensor] = {}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    generator = torch.Generator().manual_seed(seed) if options.mode == "sample" else None
    for step, sigma in enumerate(sigma_schedule(options), start=1):  # no allocation inside the loop
        half = window_half_width(sigma, max_code, options.window, options.window_tol)
        code, dcode = soft_codes(t, max_code, sigma, half, generator, workspace)
        diff = code.mul_(scale).add_(offset).sub_(w)  # W_soft - W
        torch.matmul(diff, h, out=grad).mul_(2.0 * norm).mul_(scale).mul_(dcode)  # d loss / d t
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = options.lr / (1.0 - beta1**step)
        torch.div(v, 1.0 - beta2**step, out=denom).sqrt_().add_(eps)
        t.addcdiv_(m, denom, value=-step_size).clamp_(-0.5, max_code + 0.5)
    codes = t.round().clamp_(0, max_code).to(torch.uint8)  # argmax_k p_k: the nearest level
    mse = layer_objective(grid.values(codes), w, h, count)
    if options.keep_best and init is not None and info["mse_init"] < mse and info["mse_init"] <= mse_rtn:
        info.update(mse=info["mse_init"], kept_init=True)
        return init, info
    if options.keep_best and mse > mse_rtn:
        info["kept_rtn"] = True
        return rtn, info
    info["mse"] = mse
    return codes, info
