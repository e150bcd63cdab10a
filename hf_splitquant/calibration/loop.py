"""The block loop: calibrate a model block by block with the inputs produced by the already
quantized blocks before it, keeping one block's activations in memory (see
:mod:`hf_splitquant.calibration` for the whole procedure and its exactness across processes)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..config import ROUNDING_OPTIONS, SplitQuantConfig, written_format_version
from ..integrations.transformers import attach_quantizer, quantize_model
from ..memory import release_freed_memory
from ..methods import element_grid, get_format, pack_grid_codes, stored_hessian, to_input_basis
from ..methods.attention_round import AttentionRoundOptions, attention_round, layer_objective
from ..methods.block_tuning import BlockTuningOptions
from ..methods.float_target import float_model_objective, float_model_target
from ..methods.gptq import GPTQOptions, gptq_round
from ..methods.output_clip import output_clip_grid
from ..modeling import (
    float_weight,
    iter_packed_modules,
    module_shape,
    normalise_name,
    search_bit_widths,
    select_modules,
    set_module,
    spec_for_module,
)
from ..nn.packed_linear import PackedLinear
from ..quant.grid import ElementGrid
from ..spec import LayerSpec
from .block_tuning import tune_block
from .blocks import (
    MemoryMeter,
    StopForward,
    find_blocks,
    first_output,
    hidden_of,
    model_device,
    no_cache,
    tensor_bytes,
    to_device,
    with_hidden,
)
from .data import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, global_batches, load_calibration_file, shard_batches
from .distributed import assign_owners, broadcast, make_accelerator
from .sensitivity import fisher_errors, input_channel_rms
from .statistics import InputStatistics

#: share of the calibration batches held out to decide whether a layer keeps its optimised codes
DEFAULT_HELDOUT_FRACTION = 0.25

logger = logging.get_logger(__name__)

__all__ = ["calibrate_and_quantize", "quantize_from_file", "heldout_batches", "DEFAULT_HELDOUT_FRACTION"]


def heldout_batches(num_batches: int, fraction: float) -> int:
    """How many of ``num_batches`` global batches are held out: ``round(fraction * num_batches)``, at least
    one when ``fraction > 0`` and there are two batches or more, and never all of them."""
    if fraction <= 0 or num_batches < 2:
        return 0
    return min(num_batches - 1, max(1, round(fraction * num_batches)))


def calibrate_and_quantize(
    model: nn.Module,
    config: SplitQuantConfig,
    calibration_data: Any,
    tokenizer: Any = None,
    num_samples: int = 1024,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    progress: bool = True,
    accelerator: Any = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> nn.Module:
    """Quantize ``model`` in place with calibration data (``config.rounding``: GPTQ or Attention Round)
    and return it, packed.

    Args:
        model: a float transformers model (or any ``nn.Module`` whose Linear layers ``config`` selects).
        config: the :class:`~hf_splitquant.SplitQuantConfig`; ``rounding="gptq"`` or ``"attention_round"``
            with its ``rounding_options`` (:class:`~hf_splitquant.methods.gptq.GPTQOptions`,
            :class:`~hf_splitquant.methods.attention_round.AttentionRoundOptions`).
            Not modified; the model gets a copy with ``layers`` filled in.
        calibration_data: a ``datasets.Dataset`` (a ``text`` column, or one string column, or tokenized
            ``input_ids``), a list of strings (or of token-id lists), a 2-D tensor of token ids, or a
            ``torch.utils.data.DataLoader`` yielding dicts of model inputs (used in its own order).
        tokenizer: tokenizes text samples (truncation to ``max_length``); its pad token pads batches.
        num_samples: number of calibration samples; from a larger dataset they are drawn with ``seed``
            (the same subset on every process), a DataLoader is cut after that many samples.
        batch_size: samples per forward pass (not for DataLoaders). The result depends on it only
            through float rounding; it is identical across process counts for one ``batch_size``.
        max_length: tokens per sample at most.
        seed: seed of the sample subset.
        progress: show a progress bar (main process only).
        accelerator: an ``accelerate.Accelerator`` for several processes (``torchrun``); by default one is
            created, which is a single process unless launched by ``torchrun``.
        heldout_fraction: the share of the calibration batches (the last ones, at least one when there
            are two or more) whose statistics are not fitted on but decide ``keep_best``: a layer keeps
            the optimised codes only if they beat round-to-nearest on the fitted *and* on the held-out
            inputs (0 disables the held-out slice).

    Returns:
        ``model``, with the selected layers packed, ``quantization_config`` attached (``save_pretrained``
        writes the packed format) and ``model.calibration_report`` (a dict: samples, tokens, processes,
        seconds, peak anonymous memory (``peak_memory_mb``, ``memory_increase_mb``; sampled after every
        pass) and one block's activations (``activations_mb``), and per layer its bits and objective
        before/after).
    """
    started = time.perf_counter()
    config = SplitQuantConfig.from_dict(config.to_dict())  # the caller's object stays untouched
    if config.rounding is None:
        logger.warning("calibration_data is ignored: config.rounding is None (round to nearest needs no data); "
                       "set rounding='attention_round' to use it")
        return quantize_model(model, config, progress=progress)
    _check_arguments(model, config, calibration_data, num_samples=num_samples, batch_size=batch_size,
                     max_length=max_length)
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"`heldout_fraction` must be a number in [0, 1), got {heldout_fraction!r}")
    device = model_device(model)
    accelerator = accelerator if accelerator is not None else make_accelerator(device)
    _warn_if_not_distributed(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    show = progress and accelerator.is_main_process and logging.is_progress_bar_enabled()
    memory = MemoryMeter()

    batches, num_batches, total_samples = shard_batches(
        global_batches(calibration_data, tokenizer, num_samples, batch_size, max_length, seed), rank, world)
    masks = [b["attention_mask"].bool() if isinstance(b.get("attention_mask"), torch.Tensor) else None for b in batches]
    heldout = heldout_batches(num_batches, heldout_fraction)
    global_index = [j * world + rank for j in range(len(batches))]  # local batch j's place among the global ones
    fitted = [g < num_batches - heldout for g in global_index]  # the last `heldout` global batches are held out
    specs, modules = _plan_layers(model, config, accelerator, show,
                                  batches=[b for b, f in zip(batches, fitted) if f], device=device)
    rounder = _LayerRounder(model, config, specs, modules, accelerator, fitted, heldout, global_index)
    with torch.no_grad(), no_cache(model):
        if world > 1 and not batches and rank == 0:
            raise ValueError("process 0 got no calibration batch: use at least as many batches as processes")
        activations = _calibrate_blocks(model, rounder, batches, masks, device, memory, show)
    for _, packed_module in iter_packed_modules(model):
        packed_module.set_weight_cache(False)
    config.layers = {normalise_name(model, name): spec.to_dict() for name, spec in specs.items()}
    config.format_version = max(config.format_version, written_format_version(config.layers))
    attach_quantizer(model, config)
    memory.sample()
    layers = rounder.report.values()
    rated = [i for i in layers if i["mse_rtn"] > 0]
    model.calibration_report = {
        "num_samples": total_samples, "num_batches": num_batches, "heldout_batches": heldout, "processes": world,
        "options": rounder.options.to_dict(), "layers": rounder.report,
        "block_tuning": rounder.block_tuning.to_dict() if rounder.block_tuning is not None else None,
        "blocks": rounder.block_report,
        "activation_scaling": rounder.scaling_report,
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": memory.peak / 2**20,
        "memory_increase_mb": (memory.peak - memory.start) / 2**20,
        "activations_mb": activations / 2**20,
        "mean_mse_ratio": float(sum(i["mse"] / i["mse_rtn"] for i in rated) / max(1, len(rated))),
    }
    accelerator.wait_for_everyone()
    return model


def _check_arguments(model: nn.Module, config: SplitQuantConfig, calibration_data: Any, **sizes: int) -> None:
    if calibration_data is None:
        raise ValueError(f"rounding={config.rounding!r} needs calibration_data (a datasets.Dataset, a list of "
                         "strings or a DataLoader)")
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if any(True for _ in iter_packed_modules(model)):
        raise ValueError("this model is already quantized; load or build the float model to quantize it again")
    if isinstance(calibration_data, torch.utils.data.DataLoader) and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 \
            and isinstance(getattr(calibration_data, "sampler", None), torch.utils.data.RandomSampler):
        raise ValueError("with several processes the calibration DataLoader must not shuffle (each process must see "
                         "the same global order); use shuffle=False")


def _warn_if_not_distributed(accelerator: Any) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        logger.warning(f"launched with WORLD_SIZE={launched} but the Accelerator sees one process, so every process "
                       "calibrates on all the data by itself; on CPU create it with Accelerator(cpu=True)")


def _plan_layers(model: nn.Module, config: SplitQuantConfig, accelerator: Any, show: bool,
                 batches: Sequence[Mapping[str, Any]] = (), device: torch.device | None = None,
                 ) -> tuple[dict[str, LayerSpec], dict[str, nn.Module]]:
    """The spec of every selected layer (data-free bit widths decided on the main process and broadcast;
    ``"sensitivity"`` widths from the Fisher-weighted errors summed over every process's ``batches``)."""
    selected = select_modules(model, config)
    if not selected:
        raise ValueError("no Linear layer to quantize: every Linear/Conv1D is listed in `modules_to_not_convert` or tied")
    widths: dict[str, int] = {}
    if config.bit_allocation == "sensitivity":
        widths = sensitivity_bit_widths(model, dict(selected), config, batches, device, accelerator, show)
    elif config.bit_allocation == "coding_length_inputs":
        widths = input_weighted_coding_length_widths(model, dict(selected), config, batches, device, accelerator, show)
    elif config.bit_allocation:
        widths = search_bit_widths(selected, config, progress=show) if accelerator.is_main_process else None
        widths = broadcast(widths, 0, accelerator)
    specs = {name: spec_for_module(config, module, bits=widths.get(name)) for name, module in selected}
    return specs, dict(selected)


def _budget_terms(config: SplitQuantConfig, modules: Mapping[str, nn.Module]
                  ) -> tuple[list[int], dict[str, dict[int, float]], dict[str, int]]:
    """The candidate widths, each layer's bits per weight at each of them (overheads counted) and its weight
    count: what a budget search over ``modules`` needs besides its per-layer errors."""
    from ..methods.mixquant import spec_bits

    widths = list(config.mixquant_candidates)
    costs = {n: {b: spec_bits(spec_for_module(config, m, bits=b)) for b in widths} for n, m in modules.items()}
    sizes = {n: module_shape(m)[0] * module_shape(m)[1] for n, m in modules.items()}
    return widths, costs, sizes


def _log_allocation(kind: str, config: SplitQuantConfig, chosen: Mapping[str, int], widths: Sequence[int]) -> None:
    histogram = {b: sum(1 for v in chosen.values() if v == b) for b in widths}
    logger.info(f"{kind} allocation at {config.target_bits} bits per weight: layers per width {histogram}")


def sensitivity_bit_widths(model: nn.Module, modules: Mapping[str, nn.Module], config: SplitQuantConfig,
                           batches: Sequence[Mapping[str, Any]], device: torch.device | None, accelerator: Any,
                           show: bool) -> dict[str, int]:
    """Per-layer widths within ``config.target_bits`` (overheads counted) with the least total Fisher-weighted
    error (:func:`~hf_splitquant.calibration.sensitivity.fisher_errors`), by MixQuant's budget search.
    Every process computes the same widths from the same reduced sums."""
    from ..methods.mixquant import allocate_by_budget

    widths, costs, sizes = _budget_terms(config, modules)

    def spec(name: str, bits: int) -> LayerSpec:
        return spec_for_module(config, modules[name], bits=bits)

    errors = fisher_errors(model, modules, spec, widths, batches, device or model_device(model), accelerator,
                           seed=config.seed, show=show)
    chosen = allocate_by_budget(errors, costs, sizes, config.target_bits)
    _log_allocation("sensitivity", config, chosen, widths)
    return chosen


def input_weighted_coding_length_widths(model: nn.Module, modules: Mapping[str, nn.Module], config: SplitQuantConfig,
                                        batches: Sequence[Mapping[str, Any]], device: torch.device | None,
                                        accelerator: Any, show: bool) -> dict[str, int]:
    """Per-layer widths within ``config.target_bits`` from the coding length of each weight scaled by its input
    channels' RMS over every process's ``batches`` (:func:`~hf_splitquant.methods.coding_length.input_weighted`).
    Every process computes the same widths from the same exactly reduced statistics."""
    from ..methods.coding_length import allocate_by_coding_length

    rms = input_channel_rms(model, modules, batches, device or model_device(model), accelerator, show)
    widths, costs, sizes = _budget_terms(config, modules)
    weights = {n: float_weight(m) for n, m in modules.items()}
    chosen = allocate_by_coding_length(weights, costs, sizes, config.target_bits, config.coding_length_eps, rms)
    _log_allocation("input-weighted coding-length", config, chosen, widths)
    return chosen


@dataclass
class _LayerRounder:
    """Chooses the codes of a group of layers from their statistics and installs the packed layers.

    Each layer is optimised by one process (all of a process's layers first, then the broadcasts, so the
    processes work in parallel); every process then installs the same packed tensors."""

    model: nn.Module
    config: SplitQuantConfig
    specs: dict[str, LayerSpec]
    modules: dict[str, nn.Module]  # float layers still to quantize (freed as they are replaced)
    accelerator: Any
    fitted: list[bool]  # per local batch: fitted on (True) or held out (False)
    heldout_count: int  # global batches held out
    global_index: list[int]  # per local batch: its index among the global batches
    report: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = ROUNDING_OPTIONS[self.config.rounding].from_dict(self.config.rounding_options)
        self.block_tuning = (BlockTuningOptions.from_dict(self.config.block_tuning)
                             if self.config.block_tuning is not None else None)
        self.block_report: list[dict[str, Any]] = []
        self.scaling_report: list[dict[str, Any]] = []
        self.order = {name: i for i, name in enumerate(self.specs)}  # seeds of the layers (model order)

    @property
    def float_target(self) -> bool:
        """Whether the layers are fitted to the float model's outputs (needs a float copy of each block)."""
        return getattr(self.options, "target", "layer") == "float"

    def statistics(self, names: Sequence[str], reference: Mapping[str, nn.Module] | None = None) -> InputStatistics:
        """Statistics of ``names``; with ``reference`` (the same layers in a float copy of the block) also the
        float inputs' statistics and the cross products (:attr:`InputStatistics.reference`)."""
        sizes = {n: module_shape(self.modules[n])[0] for n in names}
        ref = InputStatistics({n: reference[n] for n in names}, sizes) if reference is not None else None
        return InputStatistics({n: self.modules[n] for n in names}, sizes, reference=ref)

    def quantize(self, names: list[str], fit: InputStatistics, heldout: InputStatistics | None) -> None:
        for stats, alias in ((fit, None), (heldout, fit.alias)):
            if stats is None:
                continue
            if stats.reference is not None:
                stats.reference.reduce(self.accelerator, alias=alias)
            stats.reduce(self.accelerator, alias=alias)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        owners = assign_owners(names, self.specs, world)
        mine = {name: round_layer(name, self.modules[name], self.specs[name], fit, heldout, self.options,
                                  self.config.seed + self.order[name])
                for name in names if owners[name] == rank}
        for name in names:
            packed, info = broadcast(mine.get(name), owners[name], self.accelerator)
            module = self.modules.pop(name)  # the float layer is freed once replaced
            new = PackedLinear.from_packed(self.specs[name], packed, module.bias, device=module.weight.device,
                                           dtype=module.bias.dtype if module.bias is not None else module.weight.dtype)
            new.set_weight_cache(True)  # while calibrating: dequantize once, not once per batch
            set_module(self.model, name, new)
            self.report[normalise_name(self.model, name)] = {"bits": self.specs[name].bits, **info}


def _stop_forward(module: nn.Module, args: tuple, output: Any) -> None:
    raise StopForward


def _collect(rounder: _LayerRounder, names: list[str], passes: Sequence[tuple[Callable[[], Any], Any]],
             device: torch.device, reference: tuple[Mapping[str, nn.Module], Sequence[Callable[[], Any]]] | None = None,
             stop_after: str | None = None, with_heldout: bool = True) -> tuple[InputStatistics, InputStatistics | None]:
    """Run every pass with hooks summing the inputs of ``names`` (padding tokens masked out), into the
    fitted statistics or, for held-out batches, the held-out ones (``None`` when nothing is held out on
    any process). With ``reference`` ``(float layers by name, float passes)``, each batch's float pass runs
    first and the statistics also hold the float inputs and the cross products. With ``stop_after`` (the
    last of ``names`` a pass calls), the passes stop there: the rest of the block is not needed. With
    ``with_heldout=False`` the held-out batches are not run at all (the held-out statistics are ``None``)."""
    modules = reference[0] if reference is not None else None
    fit = rounder.statistics(names, modules)
    # every process reduces both (or, without held-out batches anywhere or wanted, only the fitted ones)
    heldout = rounder.statistics(names, modules) if rounder.heldout_count and with_heldout else None
    everything = [s for s in (fit, heldout, fit.reference, heldout.reference if heldout else None) if s is not None]
    stops = []
    if stop_after is not None:  # registered after the statistics hooks, so they still see the input
        stops.append(rounder.modules[stop_after].register_forward_hook(_stop_forward))
        if modules is not None:
            stops.append(modules[stop_after].register_forward_hook(_stop_forward))
    passes = [(_suppress_stop(run), mask) for run, mask in passes]
    float_passes = [_suppress_stop(run) for run in reference[1]] if reference is not None else []
    try:
        for index, ((run, mask), fitted) in enumerate(zip(passes, rounder.fitted)):
            stats, other = (fit, heldout) if fitted else (heldout, fit)
            if stats is None:  # a held-out batch, and the held-out statistics are not wanted
                continue
            mask = None if mask is None else mask.to(device)
            if other is not None:
                other.pause()
                if other.reference is not None:
                    other.reference.pause()
            if stats.reference is not None:
                stats.pause()
                stats.reference.new_batch(mask)
                float_passes[index]()
                stats.reference.active = False  # its inputs of this batch stay for the quantized pass
            stats.new_batch(mask)
            run()
    finally:
        for s in everything:
            s.remove()
        for handle in stops:
            handle.remove()
    return fit, heldout


def _suppress_stop(run: Callable[[], Any]) -> Callable[[], None]:
    def wrapped() -> None:
        with contextlib.suppress(StopForward):
            run()
    return wrapped


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Mapping[str, Any]],
                          device: torch.device) -> list[tuple[tuple, dict]]:
    """The positional and keyword inputs the model gives its first block, for every batch."""
    stored: list[tuple[tuple, dict]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stored.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(StopForward):
                model(**to_device(batch, device))
    finally:
        handle.remove()
    return stored


def _calibrate_blocks(model: nn.Module, rounder: _LayerRounder, batches: list[dict[str, Any]],
                      masks: list[torch.Tensor | None], device: torch.device, memory: MemoryMeter,
                      show: bool) -> int:
    """Quantize every layer, block by block, then the layers outside the blocks. Returns the peak bytes
    of one block's activations (its inputs and outputs)."""
    names = list(rounder.modules)
    found = find_blocks(model, names)
    blocks = list(found[1]) if found is not None else []
    prefix = f"{found[0]}." if found is not None and found[0] else ""
    in_block: list[list[str]] = [[] for _ in blocks]
    leftover: list[str] = []
    for name in names:
        if blocks and name.startswith(prefix):
            in_block[int(name[len(prefix):].split(".", 1)[0])].append(name)
        else:
            leftover.append(name)
    activation_peak = 0
    stored = _capture_block_inputs(model, blocks[0], batches, device) if blocks else []
    float_stored = stored if rounder.float_target else None  # the float model's block inputs
    tuning = rounder.block_tuning
    tune_inputs = stored if tuning is not None and tuning.target == "float" else None  # the float model's, too
    # one tick per layer (not per block), so that the estimate of the remaining time moves steadily
    bar = tqdm(total=len(names), desc=f"Calibrating ({rounder.config.rounding})", unit="layer", disable=not show)
    for index, block in enumerate(blocks):
        float_block = copy.deepcopy(block) if float_stored is not None else None  # before any layer is replaced
        targets = None
        if tuning is not None:  # the float block's outputs, before any of its layers is replaced
            source = tune_inputs if tune_inputs is not None else stored
            targets = [first_output(block(*args, **kwargs)) for args, kwargs in source]
        if in_block[index]:
            passes = [(lambda a=args, k=kwargs, b=block: b(*a, **k), mask) for (args, kwargs), mask in zip(stored, masks)]
            reference = None
            if float_block is not None:
                local = f"{prefix}{index}."
                layers = {n: float_block.get_submodule(n[len(local):]) for n in in_block[index]}
                reference = (layers, [lambda a=args, k=kwargs, f=float_block: f(*a, **k) for args, kwargs in float_stored])
            # sequentially inside the block too: each stage's inputs come from the already quantized stages
            stages = (execution_stages(in_block[index], rounder.modules, passes[0][0])
                      if rounder.accelerator.is_main_process else None)  # process 0 always holds batch 0
            norms = (stage_norms(block, stages, rounder.modules, passes[0][0])
                     if rounder.config.activation_scaling and rounder.accelerator.is_main_process else None)
            stages, norms = broadcast((stages, norms), 0, rounder.accelerator)
            for stage in stages:
                if norms and stage[0] in norms:  # scale the stage's inputs (searched on the fitted batches only)
                    fit, _ = _collect(rounder, stage, passes, device, reference, stop_after=stage[-1],
                                      with_heldout=False)
                    info = _scale_stage(rounder, block, norms[stage[0]], stage, fit)
                    rounder.scaling_report.append({"block": index, **info})
                    del fit
                # then measure the inputs the layers will see
                fit, heldout = _collect(rounder, stage, passes, device, reference, stop_after=stage[-1])
                memory.sample()
                rounder.quantize(stage, fit, heldout)
                del fit, heldout
                bar.set_postfix_str(f"block {index + 1}/{len(blocks)}", refresh=False)
                bar.update(len(stage))
            if tuning is not None:
                bar.set_postfix_str(f"block {index + 1}/{len(blocks)}: tuning", refresh=True)
                local = f"{prefix}{index}."
                report = tune_block(block, [n[len(local):] for n in in_block[index]], stored, targets, masks,
                                    rounder.global_index, rounder.fitted, tuning, rounder.accelerator, rounder.config.seed)
                rounder.block_report.append({"block": index, **report})
                logger.info(f"block {index}: tuned {report.get('layers', 0)} layers, error per token "
                            f"{report.get('fitted_before')} -> {report.get('fitted_after')} (fitted), "
                            f"{report.get('heldout_before')} -> {report.get('heldout_after')} (held out)"
                            f"{', kept the rounding' if report.get('kept_rounding') else ''}")
                memory.sample()
        if index + 1 < len(blocks):
            outputs = [with_hidden(args, kwargs, first_output(block(*args, **kwargs))) for args, kwargs in stored]
            held = tensor_bytes([hidden_of(*s) for s in stored]) + tensor_bytes([hidden_of(*s) for s in outputs])
            if float_stored is not None:
                float_stored = [with_hidden(a, k, first_output(float_block(*a, **k))) for a, k in float_stored]
                held += tensor_bytes([hidden_of(*s) for s in float_stored])
            if tune_inputs is not None:  # the float model's outputs of this block are the next block's inputs
                tune_inputs = [with_hidden(a, k, t) for (a, k), t in zip(tune_inputs, targets)]
            elif targets is not None:  # targets of the float block on the quantized inputs
                held += tensor_bytes(targets)
            if tune_inputs is not None:
                held += tensor_bytes([hidden_of(*s) for s in tune_inputs])
            activation_peak = max(activation_peak, held)  # what this block's passes held at once
            memory.sample()
            stored = outputs
        float_block = targets = None  # freed before the next block is copied
        for module in block.modules():  # drop the dequantized copies used for this block's passes
            if isinstance(module, PackedLinear):
                module.set_weight_cache(False)
        release_freed_memory()
    stored = []
    if leftover:  # layers outside the blocks, with the whole (quantized) model
        passes = [(lambda b=batch: model(**to_device(b, device)), mask) for batch, mask in zip(batches, masks)]
        fit, heldout = _collect(rounder, leftover, passes, device)
        memory.sample()
        rounder.quantize(leftover, fit, heldout)
        bar.update(len(leftover))
    bar.close()
    return activation_peak


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a per-channel weight (LayerNorm, RMSNorm and their model-specific copies)."""
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and not any(True for _ in module.children())
            and isinstance(weight, torch.Tensor) and weight.dim() == 1)


def stage_norms(block: nn.Module, stages: Sequence[Sequence[str]], modules: Mapping[str, nn.Module],
                run: Callable[[], Any]) -> dict[str, str]:
    """``{first layer of a stage: path in block of the norm whose output is that stage's input}``, for the stages
    fed directly by a normalisation layer (found by one forward pass ``run``: the very same tensor object)."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    inputs: dict[str, torch.Tensor] = {}
    def output_of(path: str):  # noqa: ANN202
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:  # returns None: the output is left alone
            if isinstance(out, torch.Tensor):
                outputs.setdefault(id(out), (path, out))
        return hook

    def input_of(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0])
        return hook

    handles = [module.register_forward_hook(output_of(path)) for path, module in block.named_modules()
               if _is_norm(module)]
    handles += [modules[stage[0]].register_forward_pre_hook(input_of(stage[0])) for stage in stages]
    try:
        with contextlib.suppress(StopForward):
            run()
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for name, x in inputs.items():
        match = outputs.get(id(x))
        if match is not None and match[1] is x:
            found[name] = match[0]
    return found


def _scale_stage(rounder: _LayerRounder, block: nn.Module, norm_path: str, stage: Sequence[str],
                 fit: InputStatistics) -> dict[str, Any]:
    """Search the input scales of ``stage`` from its fitted statistics and fold them into the norm at
    ``norm_path`` and the stage's float weights (:mod:`hf_splitquant.methods.activation_scaling`)."""
    from ..methods.activation_scaling import search_input_scale

    fit.reduce(rounder.accelerator)  # every process searches on the same exact sums
    leader = stage[0]
    weights = [float_weight(rounder.modules[n]).float().cpu() for n in stage]
    alpha, scales, errors = search_input_scale(weights, [rounder.specs[n] for n in stage], fit.hessian(leader),
                                               fit.count(leader), seed=rounder.config.seed)
    info = {"layers": list(stage), "norm": norm_path, "alpha": alpha,
            "error_ratio": errors[alpha] / errors[0.0] if errors[0.0] > 0 else 1.0}
    if alpha == 0.0:
        return info
    norm = block.get_submodule(norm_path)
    probe = torch.randn(2, scales.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight.device,
                                                                                        norm.weight.dtype)
    before = norm(probe).float()
    saved = {k: v.detach().clone() for k, v in norm.named_parameters(recurse=False)}
    with torch.no_grad():
        for param in saved:
            getattr(norm, param).div_(scales.to(norm.weight.device, getattr(norm, param).dtype))
        after = norm(probe).float() * scales.to(probe.device)
        if not torch.allclose(after, before, rtol=1e-3, atol=1e-5 * float(before.abs().max())):
            for param, value in saved.items():  # this norm does not scale its output by its weight: leave it
                getattr(norm, param).copy_(value)
            logger.warning(f"activation_scaling: {type(norm).__name__} `{norm_path}` does not scale its output by "
                           "its weight; its layers are not scaled")
            return {**info, "alpha": 0.0, "error_ratio": 1.0, "skipped": type(norm).__name__}
        for n in stage:
            module = rounder.modules[n]
            s = scales.to(module.weight.device, module.weight.dtype)
            if module_shape(module)[2] == "Conv1D":  # weight [in, out]
                module.weight.mul_(s[:, None])
            else:
                module.weight.mul_(s)
    return info


def execution_stages(names: Sequence[str], modules: Mapping[str, nn.Module],
                     run: Callable[[], Any]) -> list[list[str]]:
    """``names`` grouped into the stages a forward pass (``run``) computes them in: layers reading the very
    same input tensor (q/k/v, gate/up) form one stage, in the order of their first call. Layers the pass
    never calls come last, each alone (calibration then reports that they saw no token)."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them distinct objects

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if all(n != name for n, _ in order):
                order.append((name, args[0]))
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, x in order:
        if stages and x is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = x
    called = {name for name, _ in order}
    return stages + [[name] for name in names if name not in called]


RoundingOptions = AttentionRoundOptions | GPTQOptions


def _choose_codes(grid: ElementGrid, hessian: torch.Tensor, count: int, options: RoundingOptions,
                  seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The rounding method's codes on ``grid`` (no keep-best selection: the caller decides)."""
    if isinstance(options, GPTQOptions):
        codes, info = gptq_round(grid, hessian, damping=options.damping, block_size=options.block_size,
                                 act_order=options.act_order)
        return codes, {"damping": info["damping"], "rounding_seconds": info["seconds"]}
    codes, info = attention_round(grid, hessian, count, dataclasses.replace(options, keep_best=False), seed=seed)
    return codes, {k: v for k, v in info.items() if k not in ("iterations", "mse", "mse_rtn", "kept_rtn")}


def _layer_grid(weight: torch.Tensor, spec: LayerSpec, hessian: torch.Tensor, options: RoundingOptions,
                seed: int) -> ElementGrid:
    """The grid the codes are chosen on: the format's own, or its output-aware clipped grid."""
    if options.clip == "output" and get_format(spec).has_clipped_grids:
        return output_clip_grid(weight, spec, hessian)
    return element_grid(weight, spec, seed=seed)


def round_layer(name: str, module: nn.Module, spec: LayerSpec, fit: InputStatistics, heldout: InputStatistics | None,
                options: RoundingOptions, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Calibrated rounding of one layer from its summed input statistics: ``(packed tensors, info)``.

    The codes are fitted on ``fit``; with ``options.keep_best`` the layer keeps them only if they beat
    round-to-nearest (on the same grid) on the fitted inputs and on the held-out ones (``heldout``, when
    given). ``info`` holds both objectives (``mse``, ``mse_rtn`` and, held out, ``mse_heldout``,
    ``mse_rtn_heldout``), the layer's output MSE ``|X (W_q - W)^T|^2 / (tokens * out)``.
    """
    weight = float_weight(module).float().cpu()
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer `{name}` has NaN or Inf weights; cannot quantize it")
    count = fit.count(name)
    if count == 0:
        raise ValueError(f"layer `{name}` saw no calibration token (is it used by the model's forward pass?)")
    hessian = fit.hessian(name)
    input_power = float(torch.diagonal(hessian).sum()) / count  # mean |x|^2 of the inputs it was fitted on
    cross = fit.cross(name)
    try:
        # with the float model as the target, the codes are fitted to W* (methods/float_target.py) and the
        # fallback is round-to-nearest of the float weight on its own grid
        target = weight if cross is None else float_model_target(weight, hessian, cross, options.target_damping)
        grid = _layer_grid(target, spec, hessian, options, seed)
        plain = grid if cross is None else _layer_grid(weight, spec, hessian, options, seed)
    except ValueError as err:
        raise ValueError(f"cannot quantize layer `{name}`: {err}") from None

    matrices: dict[int, tuple[torch.Tensor, ...]] = {}

    def objective(values: torch.Tensor, on: ElementGrid, stats: InputStatistics, tokens: int) -> float:
        if id(stats) not in matrices:
            h = hessian if stats is fit else stats.hessian(name)
            matrices[id(stats)] = ((stored_hessian(h, grid),) if cross is None else
                                   (h, stats.cross(name), stats.reference.hessian(name)))
        m = matrices[id(stats)]
        if cross is None:
            return layer_objective(values, grid.weight, m[0], tokens)
        return float_model_objective(to_input_basis(values, on), weight, *m, tokens, on.input_index)  # OCS: W* may split other inputs

    codes, extra = _choose_codes(grid, stored_hessian(hessian, grid), count, options, seed)
    rtn = plain.nearest_codes()
    values, rtn_values = grid.values(codes), plain.values(rtn)
    info = {"tokens": count, "input_power": input_power, "target": "layer" if cross is None else "float",
            "mse_rtn": objective(rtn_values, plain, fit, count), "mse": objective(values, grid, fit, count), **extra}
    worse = info["mse"] > info["mse_rtn"]
    held_count = heldout.count(name) if heldout is not None else 0
    if held_count:
        info["heldout_tokens"] = held_count
        info["mse_rtn_heldout"] = objective(rtn_values, plain, heldout, held_count)
        info["mse_heldout"] = objective(values, grid, heldout, held_count)
        worse = worse or info["mse_heldout"] > info["mse_rtn_heldout"]
    info["kept_rtn"] = bool(options.keep_best and worse)
    if info["kept_rtn"]:
        grid, codes = plain, rtn
        info["mse"] = info["mse_rtn"]
        if held_count:
            info["mse_heldout"] = info["mse_rtn_heldout"]
    packed = pack_grid_codes(grid, codes, spec)
    if math.isfinite(info["mse_rtn"]) and info["mse_rtn"] > 0:
        info["mse_ratio"] = info["mse"] / info["mse_rtn"]
    return {k: v.contiguous() for k, v in packed.items()}, info


def quantize_from_file(model_class: Any, model_path: str, config: SplitQuantConfig, data_file: str | None,
                       num_samples: int = 1024, batch_size: int = DEFAULT_BATCH_SIZE,
                       max_length: int = DEFAULT_MAX_LENGTH, **load_kwargs: Any) -> nn.Module:
    """The command line's calibration path: load the float model and its tokenizer from ``model_path``,
    the samples from ``data_file`` (:func:`~hf_splitquant.calibration.data.load_calibration_file`), and
    quantize with calibration."""
    from transformers import AutoTokenizer

    if data_file is None:
        raise ValueError(f"rounding={config.rounding!r} needs --calibration-data FILE")
    data = load_calibration_file(data_file)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = model_class.from_pretrained(model_path, **load_kwargs)
    return calibrate_and_quantize(model, config, data, tokenizer=tokenizer, num_samples=num_samples,
                                  batch_size=batch_size, max_length=max_length)
