"""Block-wise tuning of one decoder block after its layers were rounded (``SplitQuantConfig.block_tuning``;
the objective and options: :mod:`hf_splitquant.methods.block_tuning`).

The block's packed RTN layers are swapped for :class:`~hf_splitquant.nn.fake_quant.FakeQuantLinear` layers
with learned scales that start exactly at the packed codes and scales, trained with Adam (learning rates in
grid steps, cosine decay) against the targets, and packed again; with ``keep_best`` a block whose held-out
loss rose gets its rounded layers back, and with ``best_epoch`` the block ends at the epoch whose held-out loss
was lowest.

Several processes: the optimizer steps go over the *global* calibration batches in order; the process holding
a batch computes its gradients and sends them to the others, so every process applies the same updates and
the result is the one-process result bit for bit (the steps are not parallel; the rounding before them is).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..methods import get_format
from ..methods.block_tuning import BlockTuningOptions, cosine_factor, masked_token_error
from ..modeling import set_module
from ..nn.fake_quant import FakeQuantLinear
from ..nn.packed_linear import PackedLinear
from ..qat import qat_parameter_groups
from ..speed import native_bf16
from .blocks import first_output
from .distributed import broadcast, gather

__all__ = ["tune_block"]


def _fake_quant_copy(packed: PackedLinear, seed: int) -> FakeQuantLinear:
    """A learned-scale fake-quant layer computing exactly what ``packed`` computes (latent weights = the
    dequantized codes, scales = the stored ones)."""
    spec = packed.spec
    weight = packed.dequantize_weight(torch.float32)
    if spec.source == "Conv1D":
        weight = weight.t().contiguous()
    bias = packed.bias.detach().float() if packed.bias is not None else None
    return FakeQuantLinear(spec, weight, bias, seed=seed, learn_scales=True,
                           init_state=packed.packed_tensors()).to(weight.device)


def _sum_in_global_order(values: dict[int, float], accelerator: Any) -> float:
    """The sum of ``{global batch: value}`` over every process, added in global order (the same float on
    every process, whatever the number of processes)."""
    merged = {g: v for part in gather(values, accelerator) for g, v in part.items()}
    return float(sum(merged[g] for g in sorted(merged)))


def tune_block(block: nn.Module, local_names: Sequence[str], inputs: Sequence[tuple[tuple, dict]],
               targets: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], global_index: Sequence[int],
               fitted: Sequence[bool], options: BlockTuningOptions, accelerator: Any = None, seed: int = 0,
               ) -> dict[str, Any]:
    """Tune the packed RTN layers ``local_names`` of ``block`` in place (module docstring).

    Args:
        block: one decoder block whose layers ``local_names`` (paths inside the block) are packed.
        inputs: this process's batches of block inputs ``(args, kwargs)`` (from the quantized model).
        targets: the hidden states the block should produce for each of those batches.
        masks: each batch's ``[batch, tokens]`` mask of real tokens (``None``: all real).
        global_index: each local batch's index among the global batches (its place in the step order).
        fitted: each local batch: fitted on (``True``) or held out.
        options: the tuning hyper-parameters.
        accelerator: several processes (``None``: one).
        seed: the fake-quant layers' seed.

    Returns:
        the block's report: the mean error per token (``options.loss``) before and after,
        fitted and held out, steps, seconds, and ``kept_rounding`` (the tuned codes were dropped).
    """
    started = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    originals: dict[str, PackedLinear] = {}
    layers: list[FakeQuantLinear] = []
    for name in local_names:
        module = block.get_submodule(name)
        if not isinstance(module, PackedLinear) or get_format(module.spec).name != "rtn":
            continue
        originals[name] = module
        layer = _fake_quant_copy(module, seed)
        set_module(block, name, layer)
        layers.append(layer)
    if not layers:
        return {"layers": 0}
    untouched = [(p, p.requires_grad) for p in block.parameters()]  # the block's own flags, restored afterwards
    # learning rates in units of each layer's grid step; the block's other parameters (norms) train at norm_lr
    groups = qat_parameter_groups(block, options.scale_lr, options.weight_lr or None, other_lr=options.norm_lr or None,
                                  per_grid_step=True)
    # the float parameters outside the quantized layers, as they were (a block that keeps its rounding gets them back)
    quantized = {id(p) for layer in layers for p in layer.parameters()}
    others_before = [(p, p.detach().clone()) for p in block.parameters() if id(p) not in quantized and p.requires_grad]
    for group in groups:
        group["base_lr"] = group["lr"]
    params = [p for g in groups for p in g["params"]]
    was_training = block.training
    block.eval()  # no dropout: the targets were computed without it, and every process must compute the same
    optimizer = torch.optim.Adam(groups)
    device = params[0].device.type
    # the training products only; every measurement is fp32
    low_precision = options.compute_dtype == "bfloat16" or (options.compute_dtype == "auto" and native_bf16(device))
    local = {g: j for j, g in enumerate(global_index)}
    total_batches = sum(gather(len(global_index), accelerator))
    fitted_global = sorted(g for part in gather([g for g, f in zip(global_index, fitted) if f], accelerator)
                           for g in part)

    def losses(which: bool) -> float | None:
        """Mean error per token over the fitted (``which``) or held-out batches of every process."""
        sums, counts = {}, {}
        with torch.no_grad():
            for j, g in enumerate(global_index):
                if fitted[j] != which:
                    continue
                args, kwargs = inputs[j]
                sse, n = masked_token_error(first_output(block(*args, **kwargs)), targets[j], masks[j],
                                            options.loss)
                sums[g], counts[g] = float(sse), float(n)
        total = _sum_in_global_order(counts, accelerator)
        return _sum_in_global_order(sums, accelerator) / total if total else None

    report: dict[str, Any] = {"layers": len(layers), "loss": options.loss,
                              "compute_dtype": "bfloat16" if low_precision else "float32", "fitted_before": losses(True),
                              "heldout_before": losses(False)}
    steps = options.epochs * len(fitted_global)
    step = 0
    # best_epoch: the held-out loss after each epoch; the parameters of the best one (epoch 0: the rounding's)
    track = options.best_epoch and report["heldout_before"] is not None
    best = (report["heldout_before"], 0, None) if track else None
    curve: list[float] = []
    with torch.enable_grad():
        for epoch in range(1, options.epochs + 1):
            for g in fitted_global:
                owner = g % world if world > 1 else 0
                grads = None
                if owner == rank:
                    j = local[g]
                    args, kwargs = inputs[j]
                    with torch.autocast(device, dtype=torch.bfloat16, enabled=low_precision):
                        output = first_output(block(*args, **kwargs))
                    sse, n = masked_token_error(output, targets[j], masks[j], options.loss)
                    (sse / max(n, 1)).backward()
                    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
                grads = broadcast(grads, owner, accelerator)
                for p, grad in zip(params, grads):
                    p.grad = grad.to(p.device)
                factor = cosine_factor(step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            if track:
                curve.append(losses(False))
                if curve[-1] < best[0]:
                    best = (curve[-1], epoch, [p.detach().clone() for p in params])
    if track:
        report.update(heldout_curve=curve, best_epoch=best[1])
        if best[2] is not None and best[1] < options.epochs:
            with torch.no_grad():
                for p, value in zip(params, best[2]):
                    p.copy_(value)
    for p, flag in untouched:
        p.requires_grad_(flag)
    report["fitted_after"] = losses(True)
    report["heldout_after"] = losses(False)
    decide = "heldout" if report["heldout_before"] is not None else "fitted"
    worse = report[f"{decide}_after"] > report[f"{decide}_before"]
    report["kept_rounding"] = bool((options.keep_best and worse) or (track and best[1] == 0))
    if report["kept_rounding"]:
        with torch.no_grad():
            for p, value in others_before:
                p.copy_(value)
    for (name, original), layer in zip(originals.items(), layers):
        if report["kept_rounding"]:
            set_module(block, name, original)
            continue
        bias = layer.bias.detach().to(original.bias.dtype) if original.bias is not None else None
        packed = PackedLinear.from_packed(layer.spec, layer.packed_tensors(), bias, device=layer.weight.device)
        packed.set_weight_cache(True)  # while calibrating: dequantize once, not once per batch
        set_module(block, name, packed)
    block.train(was_training)
    report.update(steps=steps, batches=total_batches, seconds=time.perf_counter() - started)
    return report

