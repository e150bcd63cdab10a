"""Calibrated sensitivity for per-layer bit widths (``bit_allocation="sensitivity"``).

MixQuant's data-free error (the weights' round-off error) cannot tell layers apart on real models: with
min-max grids its ratio between two widths is the same for every layer. What matters is how much the
*model's loss* grows when a layer's weights are rounded. To second order, with the empirical Fisher
diagonal ``F`` (squared per-sample gradients of the loss) standing in for the Hessian::

    loss increase of layer l at width b  ~  1/2 * sum_ij F_ij * (Q_b(W)_ij - W_ij)^2

``F`` comes from one backward pass per calibration sample (the model's own loss: next-token cross-entropy
for a causal LM, so the model must accept ``labels``); ``Q_b`` is the layer's quantizer at width ``b``
(the same format, groups and clipping as the packed layer, round to nearest: the calibrated rounding
lowers every width's error by a similar factor). The per-layer errors are in one unit (loss), so
MixQuant's budget search (:func:`hf_splitquant.methods.mixquant.allocate_by_budget`) compares them directly.

Exactness across processes: each global batch's Fisher is summed over its samples in a fixed order, and its
scalar errors are added with :class:`~hf_splitquant.calibration.statistics.ExactSum`, so the widths chosen by
several processes are the one-process widths, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..methods.mixquant import roundoff_residual
from ..modeling import float_weight, module_shape
from ..spec import LayerSpec
from .blocks import to_device
from .data import batch_size_of
from .statistics import ExactSum, real_token_rows

logger = logging.get_logger(__name__)

__all__ = ["fisher_errors", "input_channel_rms"]


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """Next-token labels of a causal-LM batch: the input ids, padding ignored (-100)."""
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        labels[mask == 0] = -100
    return labels


def _row(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def fisher_errors(model: nn.Module, modules: Mapping[str, nn.Module], specs: Callable[[str, int], LayerSpec],
                  widths: Sequence[int], batches: Sequence[Mapping[str, Any]], device: torch.device,
                  accelerator: Any = None, seed: int = 0, show: bool = False) -> dict[str, dict[int, float]]:
    """``errors[name][bits]``: the Fisher-weighted round-off error of each layer at each width (summed over
    every process's ``batches``; see the module docstring).

    Args:
        model: the float model; it must return a loss when called with ``labels`` (a causal LM).
        modules: the float layers to rate, by name.
        specs: ``specs(name, bits)``, the layer's spec at a width.
        widths: the candidate widths.
        batches: this process's calibration batches (dicts of model inputs with ``input_ids``).
        device: where the batches go.
        accelerator: sums the errors over processes (``None``: one process).
        seed: the quantizers' seed (k-means based formats).
        show: progress bar.

    Raises:
        ValueError: the model computes no loss from ``labels`` (not a causal LM).
    """
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "bit_allocation='sensitivity' weights each layer's error by the gradient of the next-token loss, so it "
            f"needs a causal LM (AutoModelForCausalLM); {type(model).__name__} is not one. Use "
            "bit_allocation='mixquant' (data-free) for this model")
    names = list(modules)
    weights = {n: modules[n].weight for n in names}
    transposed = {n: module_shape(modules[n])[2] == "Conv1D" for n in names}  # Conv1D stores [in, out]
    sums = {n: {b: ExactSum(()) for b in widths} for n in names}
    fisher = {n: torch.zeros(float_weight(modules[n]).shape, dtype=torch.float32, device=weights[n].device)
              for n in names}
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    samples = sum(batch_size_of(b) for b in batches)
    bar = tqdm(total=samples, desc="Sensitivity (Fisher)", unit="sample", disable=not show)
    try:
        for p, _ in trainable:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()  # no dropout: the gradients of the model as it will run
        for batch in batches:
            batch = to_device(batch, device)
            for f in fisher.values():
                f.zero_()
            for i in range(batch_size_of(batch)):
                row = _row(batch, i)
                for w in weights.values():
                    w.grad = None
                with torch.enable_grad():
                    try:
                        output = model(**row, labels=_labels(row))
                    except TypeError as error:
                        raise ValueError(
                            "bit_allocation='sensitivity' needs a model that computes its loss from `labels` (a causal "
                            f"LM such as AutoModelForCausalLM); {type(model).__name__} does not ({error}). Use "
                            "bit_allocation='mixquant' (data-free) for this model") from error
                    loss = getattr(output, "loss", None)
                    if loss is None:
                        raise ValueError(f"bit_allocation='sensitivity': {type(model).__name__} returned no loss for "
                                         "`labels`; use a causal-LM head or bit_allocation='mixquant'")
                    tokens = int((_labels(row)[:, 1:] != -100).sum())
                    if tokens == 0:
                        bar.update(1)
                        continue
                    (loss * tokens).backward()  # the gradient of the summed (not mean) token loss
                for n in names:
                    grad = weights[n].grad
                    if grad is not None:
                        g = grad.t() if transposed[n] else grad
                        fisher[n].add_(g.float().pow(2))
                bar.update(1)
            for n in names:  # this batch's errors, per width
                w = float_weight(modules[n]).float()
                for b in widths:
                    sums[n][b].add((fisher[n] * roundoff_residual(w, specs(n, b), seed).pow(2)).sum() / 2)
    finally:
        bar.close()
        for p, flag in trainable:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        for n in names:
            for b in widths:
                sums[n][b].limbs = accelerator.reduce(sums[n][b].limbs, reduction="sum")
    return {n: {b: float(sums[n][b].value()) for b in widths} for n in names}


def input_channel_rms(model: nn.Module, modules: Mapping[str, nn.Module], batches: Sequence[Mapping[str, Any]],
                      device: torch.device, accelerator: Any = None, show: bool = False) -> dict[str, torch.Tensor]:
    """``rms[name]`` ``[in_features]``: the root mean square of each input channel of each layer over the real
    tokens of every process's ``batches`` (one forward pass of the float model; the square root of the
    diagonal of the layer's ``H = E[x x^T]``). Summed exactly, so every process gets the same values."""
    sums: dict[str, ExactSum] = {}
    counts: dict[str, ExactSum] = {}
    mask_now: list[torch.Tensor | None] = [None]

    def hook(name: str):  # noqa: ANN202
        def record(_module: nn.Module, args: tuple) -> None:
            x = real_token_rows(args[0], mask_now[0])  # padding tokens do not count
            sums.setdefault(name, ExactSum((x.shape[-1],))).add(x.pow(2).sum(dim=0))
            counts.setdefault(name, ExactSum(())).add(torch.tensor(float(x.shape[0])))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="Input statistics", unit="batch", disable=not show):
                batch = to_device(batch, device)
                mask = batch.get("attention_mask")
                mask_now[0] = mask if isinstance(mask, torch.Tensor) else None
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = sorted(set(modules) - set(sums))
    if missing:
        raise ValueError(f"the calibration batches never reached layers {missing[:5]}; cannot measure their inputs")
    if accelerator is not None and accelerator.num_processes > 1:
        for name in modules:
            sums[name].limbs = accelerator.reduce(sums[name].limbs, reduction="sum")
            counts[name].limbs = accelerator.reduce(counts[name].limbs, reduction="sum")
    return {name: (sums[name].value() / counts[name].value().clamp_min(1.0)).sqrt().float() for name in modules}
