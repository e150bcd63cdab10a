"""Quantization-aware training: ``prepare_qat`` swaps layers for :class:`FakeQuantLinear`, the stock
``transformers.Trainer`` trains them, ``freeze`` packs them into :class:`PackedLinear`.

Lifecycle::

    config = SplitQuantConfig(bits=2, group_size=64, transform="splitquant", qat=True)
    model = AutoModelForSequenceClassification.from_pretrained(float_dir, quantization_config=config)
    # (or: model = hf_splitquant.prepare_qat(float_model, config))
    Trainer(model, args, train_dataset=..., callbacks=[QATCallback(...)]).train()   # float checkpoints
    hf_splitquant.freeze(model)           # FakeQuantLinear -> PackedLinear, config flipped to qat=False
    model.save_pretrained("out")          # the packed format; plain from_pretrained("out") reloads it

While training, ``save_pretrained`` (and so every Trainer checkpoint) writes the float weights under
their float keys (plus ``weight_qat_scale`` / ``weight_qat_min`` with learned scales) and
``resume_from_checkpoint`` restores them. Such a folder is a training checkpoint, not the packed
format: load it by building the QAT model again and resuming, or freeze and save the packed form.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers.utils import logging

from .config import SplitQuantConfig, written_format_version
from .methods import get_format
from .modeling import (
    dequantize_model,
    float_weight,
    iter_packed_modules,
    module_shape,
    normalise_name,
    resolve_name,
    search_bit_widths,
    select_modules,
    set_module,
)
from .nn.fake_quant import FakeQuantLinear
from .spec import LayerSpec

logger = logging.get_logger(__name__)

__all__ = [
    "prepare_fake_quant",
    "pack_fake_quant",
    "unprepare_qat",
    "iter_fake_quant_modules",
    "set_fake_quant",
    "freeze_scales",
    "qat_parameter_groups",
    "FakeQuantLinear",
]


def iter_fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    """``(name, module)`` of every :class:`FakeQuantLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            yield name, module


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every QAT layer (off: the layers compute in float).

    Turning it on for the first time re-initialises learned scales from the current weights.
    """
    for _, module in iter_fake_quant_modules(model):
        module.set_fake_quant(enabled)


def freeze_scales(model: nn.Module) -> None:
    """Keep every QAT layer's current grid fixed for the rest of training (see ``freeze_grid``)."""
    for _, module in iter_fake_quant_modules(model):
        module.freeze_grid()


def _layer_specs(model: nn.Module, config: SplitQuantConfig,
                 packed_specs: dict[str, LayerSpec]) -> list[tuple[str, nn.Module, LayerSpec]]:
    """The (name, float module, spec) of every layer to prepare."""
    chosen: list[tuple[str, nn.Module, LayerSpec]] = []
    if config.layers:
        for key, spec in config.layer_specs().items():
            name = resolve_name(model, key)
            if name is None:
                raise ValueError(f"config.layers names module `{key}`, which {type(model).__name__} does not have")
            module = model.get_submodule(name)
            in_f, out_f, source = module_shape(module)
            if (in_f, out_f, source) != (spec.in_features, spec.out_features, spec.source):
                raise ValueError(f"config.layers[{key!r}] is {spec.source} {spec.in_features}->{spec.out_features} "
                                 f"but the model's module is {source} {in_f}->{out_f}")
            chosen.append((name, module, spec))
        return chosen
    if packed_specs:
        return [(name, model.get_submodule(name), spec) for name, spec in packed_specs.items()]
    selected = select_modules(model, config)
    if not selected:
        raise ValueError("no Linear layer to prepare for QAT: every Linear/Conv1D is listed in "
                         "`modules_to_not_convert` or tied")
    bit_widths = search_bit_widths(selected, config, progress=False) if config.bit_allocation else {}
    for name, module in selected:
        in_f, out_f, source = module_shape(module)
        spec = config.spec_for(in_f, out_f, module.bias is not None, source, bits=bit_widths.get(name))
        chosen.append((name, module, spec))
    return chosen


def prepare_fake_quant(model: nn.Module, config: SplitQuantConfig, in_place: bool = True,
                kmeans_refresh_every: int | None = 100, ste: str = "identity",
                lsq_grad_scale: bool = True, init_from: nn.Module | None = None) -> nn.Module:
    """Swap the layers ``config`` selects for :class:`FakeQuantLinear` and return the model.

    Works on a float model and on a packed one (its packed layers are dequantized first and keep
    their specs, e.g. MixQuant's per-layer bits). Starting from a packed model is how QAT starts from
    the best post-training result (a calibrated rounding such as GPTQ, or ``clip="mse"``): with
    ``qat_learn_scales`` its RTN layers keep their stored scales and zero points, so before any
    training step the fake-quant model computes exactly what the packed model computes. Which layers and specs: ``config.layers`` if set,
    else the packed model's layers, else the layers ``config`` selects (``bit_allocation`` runs on
    the float weights for per-layer bits). ``config`` is updated in place: ``qat=True`` and
    ``layers`` filled; the model is marked as quantized with it, so the stock ``Trainer`` accepts it
    (``is_qat_trainable``) and ``save_pretrained`` records it: that marking is done by
    :func:`hf_splitquant.prepare_qat`, which calls this function.

    Args:
        model: a transformers model (or any module with Linear / Conv1D layers).
        config: the quantization to train for (bits, groups, transform, ``qat_learn_scales``).
        in_place: modify ``model`` (default) or a deep copy of it.
        kmeans_refresh_every / ste / lsq_grad_scale: see :class:`FakeQuantLinear`.
        init_from: with ``qat_learn_scales``: a packed model of the same architecture whose RTN grids
            (scales, zero points) the learned scales start from, while the latent weights stay this
            model's float weights (e.g. a saved ``clip="mse"`` model, to skip the clip search).
    """
    if not isinstance(config, SplitQuantConfig):
        raise ValueError(f"`config` must be a SplitQuantConfig, got {type(config).__name__}")
    if config.rounding is not None:
        raise ValueError("`rounding` optimises codes after training; it cannot be combined with QAT")
    if any(True for _ in iter_fake_quant_modules(model)):
        raise ValueError("this model is already prepared for QAT (it has FakeQuantLinear layers)")
    if not in_place:
        model = copy.deepcopy(model)
    if not config.qat:
        logger.info("prepare_qat: setting `qat=True` on the config")
        config.qat = True
    packed_specs = {name: module.spec for name, module in iter_packed_modules(model)}
    # a packed (post-training, possibly calibrated) RTN layer: the learned scales start from its stored
    # grid, so the fake-quant model computes exactly what the packed model computed
    packed_grids = {name: module.packed_tensors() for name, module in iter_packed_modules(model)
                    if config.qat_learn_scales and get_format(module.spec).name == "rtn"}
    init_specs: dict[str, Any] = {}
    if init_from is not None:
        if not config.qat_learn_scales:
            raise ValueError("`init_from` sets the initial learned scales: it needs SplitQuantConfig(qat_learn_scales=True)")
        init_specs = {name: module.spec for name, module in iter_packed_modules(init_from)
                      if get_format(module.spec).name == "rtn"}
        packed_grids.update({name: module.packed_tensors() for name, module in iter_packed_modules(init_from)
                             if name in init_specs})
        if not packed_grids:
            raise ValueError("`init_from` has no packed RTN layer to take the grids from")
    if packed_specs:
        logger.info(f"prepare_qat: dequantizing {len(packed_specs)} packed layers before QAT")
        dequantize_model(model)
    layers: dict[str, dict[str, Any]] = {}
    for name, module, spec in _layer_specs(model, config, packed_specs):
        start = init_specs.get(name)
        if start is not None and start.input_rotation != spec.input_rotation:
            raise ValueError(f"`init_from` stores layer `{name}` with input_rotation={start.input_rotation} but the QAT "
                             f"config gives it input_rotation={spec.input_rotation}: its grids belong to another "
                             f"basis; use SplitQuantConfig(input_rotation={start.input_rotation}, ...)")
        weight = module.weight.detach()
        if not float_weight(module).isfinite().all():
            raise ValueError(f"layer `{name}` has NaN or Inf weights; cannot prepare it for QAT")
        new = FakeQuantLinear(spec, weight, module.bias.detach() if module.bias is not None else None,
                              seed=config.seed, learn_scales=config.qat_learn_scales,
                              kmeans_refresh_every=kmeans_refresh_every, ste=ste,
                              lsq_grad_scale=lsq_grad_scale, init_state=packed_grids.get(name)).to(weight.device)
        set_module(model, name, new)
        layers[normalise_name(model, name)] = spec.to_dict()
    config.layers = layers
    config.format_version = max(config.format_version, written_format_version(layers))
    return model


def _model_config(model: nn.Module) -> SplitQuantConfig | None:
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if isinstance(config, SplitQuantConfig):
        return config
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config if isinstance(config, SplitQuantConfig) else None


def pack_fake_quant(model: nn.Module) -> SplitQuantConfig:
    """Pack every :class:`FakeQuantLinear` into a :class:`PackedLinear` holding the same codes and
    return the model's quantization config flipped to ``qat=False`` with the per-layer map.

    The packed layers compute what the fake-quant layers computed (the same grid and codes).
    :func:`hf_splitquant.freeze` calls this and marks the model with the returned config, so
    ``save_pretrained`` writes the packed format and plain ``from_pretrained`` reloads it.
    """
    modules = list(iter_fake_quant_modules(model))
    if not modules:
        raise ValueError("freeze: the model has no FakeQuantLinear layer; call prepare_qat (or load with "
                         "SplitQuantConfig(qat=True)) and train first")
    old = _model_config(model)
    config = SplitQuantConfig.from_dict(old.to_dict()) if old is not None else SplitQuantConfig()
    layers = dict(config.layers or {})
    for name, module in modules:
        set_module(model, name, module.to_packed())
        layers[normalise_name(model, name)] = module.spec.to_dict()
    config.qat = False
    config.qat_learn_scales = False
    config.layers = layers
    return config


def unprepare_qat(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` by its float module (current float weights, not
    quantized) and drop the quantization marks: back to a plain float model."""
    modules = list(iter_fake_quant_modules(model))
    if not modules:
        raise ValueError("unprepare_qat: the model has no FakeQuantLinear layer")
    for name, module in modules:
        set_module(model, name, module.to_float())
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    model.is_quantized = False
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    return model


#: what :func:`qat_parameter_groups` trains
TRAINABLE = ("scales", "quantized", "all")


def qat_parameter_groups(model: nn.Module, scale_lr: float, weight_lr: float | None = None,
                         other_lr: float | None = None, weight_decay: float = 0.0,
                         per_grid_step: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups for QAT with learned scales, and ``requires_grad`` set to match.

    * the learned grid parameters (``weight_qat_scale`` / ``weight_qat_min``) train at ``scale_lr``;
    * the quantized layers' float weights and biases at ``weight_lr`` (``None``: frozen; training only
      the step sizes is EfficientQAT's end-to-end stage: cheap in optimizer memory, and the codes can
      still change as the scales move);
    * every other parameter (embeddings, norms, an unquantized head) at ``other_lr`` (``None``: frozen).

    Adam-type optimizers move each parameter by about its learning rate per step whatever the
    gradient's size, so scales (about ``max|w| / 2^bits``) usually want a learning rate of their own.
    Use with the stock Trainer as ``Trainer(..., optimizers=(torch.optim.AdamW(groups), None))`` (the
    Trainer still builds the learning-rate schedule, which scales every group alike).

    With ``per_grid_step=True``, ``scale_lr`` and ``weight_lr`` are in units of each layer's own grid step
    (its mean learned scale at the start): one group per layer, so ``scale_lr=0.01`` moves every layer's
    scales by about 1% per step and ``weight_lr=0.05`` its weights by about 5% of a grid step, whatever the
    layer's range. (One absolute rate cannot fit every layer: on SmolLM2 INT3 g128 the scales span
    0.005-0.03; ``benchmarks/results/qat_lm.md``.)
    """
    modules = list(iter_fake_quant_modules(model))
    if not modules:
        raise ValueError("qat_parameter_groups: the model has no FakeQuantLinear layer; call prepare_qat first")
    scales, weights = [], []
    for _, module in modules:
        if not module.learn_scales:
            raise ValueError("qat_parameter_groups needs learned scales: prepare with "
                             "SplitQuantConfig(..., qat_learn_scales=True)")
        scales += [p for p in (module.weight_qat_scale, module.weight_qat_min) if p is not None]
        weights += [p for p in (module.weight, module.bias) if p is not None]
    taken = {id(p) for p in scales + weights}
    others = [p for p in model.parameters() if id(p) not in taken]
    plan: list[tuple[list[nn.Parameter], float | None, float]] = []
    if per_grid_step:
        for _, module in modules:
            step = max(float(module.weight_qat_scale.detach().abs().mean()), 1e-12)  # an all-zero layer too
            grid = [p for p in (module.weight_qat_scale, module.weight_qat_min) if p is not None]
            float_params = [p for p in (module.weight, module.bias) if p is not None]
            plan += [(grid, None if scale_lr is None else scale_lr * step, 0.0),
                     (float_params, None if weight_lr is None else weight_lr * step, weight_decay)]
    else:
        plan += [(scales, scale_lr, 0.0), (weights, weight_lr, weight_decay)]
    plan.append((others, other_lr, 0.0))
    groups = []
    for params, lr, decay in plan:
        for p in params:
            p.requires_grad_(lr is not None)
        if lr is not None and params:
            if not lr > 0:
                raise ValueError(f"learning rates must be positive (or None to freeze), got {lr!r}")
            groups.append({"params": params, "lr": float(lr), "weight_decay": decay})
    return groups
