"""The one place that knows transformers' internals: quantizer registration, module replacement,
on-the-fly quantization ops, save metadata and dequantization.

Checked against transformers 5.23 (see ``DESIGN.md`` section 4 for the load order).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from ..checkpoint import (
    DIGEST_METADATA_PREFIX,
    FORMAT_METADATA_KEY,
    LAYER_MAP_METADATA_KEY,
    CheckpointError,
    CheckpointReadGuard,
    check_values,
    layer_map_digest,
    model_checkpoint_keys,
    tensor_digest,
    unknown_map_entries,
)
from ..config import FORMAT_VERSION, QUANT_METHOD, SplitQuantConfig
from ..memory import release_freed_memory
from ..methods import tensor_shapes
from ..nn.packed_linear import PackedLinear
from ..patterns import compile_module_patterns, matches_any
from ..saving import guard_save_pretrained
from ..spec import LayerSpec

logger = logging.get_logger(__name__)

__all__ = [
    "SplitQuantHfQuantizer",
    "register",
    "quantize_model",
    "iter_packed_modules",
    "FORMAT_METADATA_KEY",
]

_QUANTIZABLE = (nn.Linear, Conv1D)


# --------------------------------------------------------------------------------------------
# Module selection and naming
# --------------------------------------------------------------------------------------------


def _base_prefix(model: nn.Module) -> str:
    return getattr(model, "base_model_prefix", "") or ""


def _has_prefix_module(model: nn.Module) -> bool:
    prefix = _base_prefix(model)
    return bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module) and getattr(model, prefix) is not model


def normalise_name(model: nn.Module, name: str) -> str:
    """Module path relative to the base model, so a head model and its base model share keys."""
    prefix = _base_prefix(model)
    if prefix and _has_prefix_module(model) and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def resolve_name(model: nn.Module, key: str) -> str | None:
    """The module path in ``model`` for a normalised key, or ``None`` if the model has no such module."""
    candidates = [key]
    if _has_prefix_module(model):
        candidates.insert(0, f"{_base_prefix(model)}.{key}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Output embeddings and the module owning the model's last parameter (its task head).

    transformers' own helper returns the last *parameter* name (e.g. ``classifier.bias``), which then
    matches no module; we strip the parameter name so the head really stays in float.
    """
    skip: set[str] = set()
    params = list(model.named_parameters())
    if params:
        skip.add(params[-1][0].rpartition(".")[0])
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        skip.update(name for name, module in model.named_modules() if module is out_emb)
    return sorted(s for s in skip if s)


def _tied_module_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied.keys()) | set(tied.values())
    return {n.rpartition(".")[0] for n in names}


def is_skipped(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches a ``modules_to_not_convert`` pattern.

    transformers' rules (a prefix up to a module boundary, a regex with that boundary, or a suffix),
    plus a whole run of path components anywhere: ``"intermediate"`` skips
    ``bert.encoder.layer.0.intermediate.dense`` and ``"layer.1"`` does not skip ``layer.11``.
    """
    return matches_any(name, compile_module_patterns(patterns))  # bounded cost: see hf_splitquant.patterns


def select_modules(model: nn.Module, config: SplitQuantConfig) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv1D modules that ``config`` quantizes, in model order."""
    skip = list(config.modules_to_not_convert) if config.modules_to_not_convert is not None else (
        default_modules_to_not_convert(model)
    )
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    tied = _tied_module_names(model)
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, _QUANTIZABLE) or name in tied:
            continue
        if is_skipped(name, skip):
            continue
        selected.append((name, module))
    return selected


def _shape_of(module: nn.Module) -> tuple[int, int, str]:
    """(in_features, out_features, source) of a float Linear-like module."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f), "Conv1D"
    return int(module.in_features), int(module.out_features), "Linear"


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float weight of a Linear or Conv1D."""
    w = module.weight.detach()
    return w.t() if isinstance(module, Conv1D) else w


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def iter_packed_modules(model: nn.Module) -> Iterator[tuple[str, PackedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield name, module


# --------------------------------------------------------------------------------------------
# Skeletons
# --------------------------------------------------------------------------------------------


def _replace_with_skeletons(model: nn.Module, config: SplitQuantConfig, pre_quantized: bool) -> dict[str, str]:
    """Swap selected modules for empty ``PackedLinear`` on the meta device; fill ``config.layers``.

    Returns the model path of every rebuilt layer by its map key (pre-quantized loads).
    """
    resolved: dict[str, str] = {}
    if pre_quantized:
        # refuse a map padded with modules the model lacks before any per-entry work
        unknown_map_entries(config.layers or {}, (n for n, _ in model.named_modules()),
                            _base_prefix(model) if _has_prefix_module(model) else "")
        specs = config.layer_specs()
        if not specs:
            raise ValueError(
                "this checkpoint's quantization_config has no `layers` map, so its packed layers cannot be "
                "rebuilt; it was not written by hf_splitquant's save_pretrained"
            )
        for key, spec in specs.items():
            name = resolve_name(model, key)
            if name is None:
                if _has_prefix_module(model) or not _base_prefix(model):
                    raise ValueError(
                        f"the checkpoint's quantization map names module `{key}`, which this "
                        f"{type(model).__name__} does not have: the checkpoint belongs to another architecture"
                    )
                logger.warning(f"Quantized module `{key}` is not part of {type(model).__name__} (a task head?); skipped.")
                continue
            old = model.get_submodule(name)
            if not isinstance(old, _QUANTIZABLE + (PackedLinear,)):
                raise ValueError(f"the checkpoint's quantization map names `{key}`, which is a {type(old).__name__}, "
                                 "not a Linear layer")
            in_f, out_f, source = _shape_of(old) if isinstance(old, _QUANTIZABLE) else (
                old.in_features, old.out_features, old.spec.source)
            if (in_f, out_f, source) != (spec.in_features, spec.out_features, spec.source):
                raise ValueError(
                    f"module `{key}` is {source} {in_f}->{out_f} in the model but the checkpoint's quantization map "
                    f"says {spec.source} {spec.in_features}->{spec.out_features}"
                )
            dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
            _set_module(model, name, PackedLinear(spec, device="meta", dtype=dtype))
            resolved[key] = name
        return resolved

    layers: dict[str, dict[str, Any]] = {}
    for name, module in select_modules(model, config):
        in_f, out_f, source = _shape_of(module)
        spec = config.spec_for(in_f, out_f, module.bias is not None, source)
        dtype = module.weight.dtype
        _set_module(model, name, PackedLinear(spec, device="meta", dtype=dtype))
        layers[normalise_name(model, name)] = spec.to_dict()
    config.layers = layers
    return resolved


def _stored_prefixes(model: nn.Module, key: str, name: str) -> list[str]:
    """Key prefixes a layer may be stored under: with or without the base-model prefix."""
    prefix = _base_prefix(model)
    candidates = [name, key] + ([f"{prefix}.{key}"] if prefix else [])
    return list(dict.fromkeys(candidates))


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


class SplitQuantQuantize(ConversionOps):
    """On-the-fly op: one float checkpoint weight in, the packed tensors of its module out."""

    def __init__(self, hf_quantizer: SplitQuantHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        module_name = target_key.rpartition(".")[0]
        module = model.get_submodule(module_name)
        spec = module.spec
        weight = value.t() if spec.source == "Conv1D" else value
        try:
            packed = module_quantize(weight, spec, self.hf_quantizer.quantization_config.seed, module_name)
        except ValueError as err:
            # transformers logs conversion errors and goes on loading; keep it to raise after loading.
            self.hf_quantizer.conversion_errors.append(str(err))
            raise
        del weight, value, input_dict
        release_freed_memory()  # the float temporaries just freed (keeps the load's peak near the packed size)
        return {f"{module_name}.{suffix}": tensor for suffix, tensor in packed.items()}


def module_quantize(weight: torch.Tensor, spec: LayerSpec, seed: int, name: str) -> dict[str, torch.Tensor]:
    from ..methods import quantize_weight

    try:
        return quantize_weight(weight, spec, seed=seed)
    except ValueError as err:
        raise ValueError(f"cannot quantize layer `{name}`: {err}") from None


class SplitQuantHfQuantizer(HfQuantizer):
    """transformers quantizer for :class:`~hf_splitquant.SplitQuantConfig`."""

    requires_calibration = False
    quantization_config: SplitQuantConfig

    def __init__(self, quantization_config: SplitQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.conversion_errors: list[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.rounding is not None:
            raise ValueError(
                f"rounding={self.quantization_config.rounding!r} optimises the codes on calibration data, which "
                "from_pretrained does not have: load the float model, then call "
                "hf_splitquant.quantize(model, config, calibration_data=..., tokenizer=...)"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values() and not self.pre_quantized:
            raise ValueError(
                "quantizing while loading cannot offload layers to disk; quantize first with enough memory, "
                "save, then load the packed checkpoint with device_map"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        if self.quantization_config.qat or (not self.pre_quantized and self.quantization_config.bit_allocation):
            # Bit widths (and so shapes) depend on every layer's float weights, and QAT trains float
            # weights: load in float, then act after loading.
            return
        resolved = _replace_with_skeletons(model, self.quantization_config, self.pre_quantized)
        if self.pre_quantized and checkpoint_files:
            # Headers only: refuse a mismatched or corrupt checkpoint before any tensor is read.
            device_map = kwargs.get("device_map")
            self._read_guard = CheckpointReadGuard(checkpoint_files, getattr(model.config, "_name_or_path", None),
                                                   pin=not (isinstance(device_map, dict) and "disk" in device_map.values()))
            specs = self.quantization_config.layer_specs()
            self._read_guard.verify(
                FORMAT_VERSION, self.quantization_config.layers,
                {key: (specs[key], _stored_prefixes(model, key, name)) for key, name in resolved.items()},
                required=[p for key, name in resolved.items() for p in _stored_prefixes(model, key, name)],
                tied=getattr(model, "all_tied_weights_keys", None) or {},
                wanted=model_checkpoint_keys(model.state_dict(), _base_prefix(model)))

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, PackedLinear) and tensor_name in tensor_shapes(module.spec)

    def get_quantize_ops(self) -> SplitQuantQuantize:
        return SplitQuantQuantize(self)

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        # Packed tensors keep their stored dtype (fp16 scales must not be cast to a bf16 model dtype).
        targets = getattr(converter, "target_patterns", None) or []
        if targets and targets[0].rpartition(".")[2].startswith("weight_"):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if getattr(self, "_read_guard", None) is not None:
            self._read_guard.finish(self.quantization_config.layers)  # the files read are the files verified
        if self.conversion_errors:
            more = f" (and {len(self.conversion_errors) - 1} more layers)" if len(self.conversion_errors) > 1 else ""
            raise ValueError(self.conversion_errors[0] + more)
        if self.quantization_config.qat:
            # a QAT checkpoint (saved before freeze) holds float weights: rebuild the fake-quant layers
            from ..qat import prepare_qat

            prepare_qat(model, self.quantization_config, in_place=True)
        elif not self.pre_quantized and self.quantization_config.bit_allocation:
            _quantize_in_place(model, self.quantization_config, progress=True)
        for name, module in iter_packed_modules(model):
            tensors = module.packed_tensors()
            for suffix, tensor in tensors.items():
                if tensor.is_meta:
                    raise CheckpointError(
                        f"packed tensor `{name}.{suffix}` was not found in the checkpoint: it is incomplete or "
                        "was not written by hf_splitquant"
                    )
            if self.pre_quantized:
                check_values(name, module.spec, tensors)
        model.config.quantization_config = self.quantization_config
        _tag(model)
        guard_save_pretrained(model)
        release_freed_memory()
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        metadata = {FORMAT_METADATA_KEY: str(FORMAT_VERSION), "quant_method": QUANT_METHOD,
                    LAYER_MAP_METADATA_KEY: layer_map_digest(self.quantization_config.layers)}
        # A digest of every tensor as it will be written, checked on load (see checkpoint.verify_digests).
        for key, tensor in model.state_dict().items():
            metadata[DIGEST_METADATA_PREFIX + key] = tensor_digest(tensor)
        return None, metadata

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model, dtype)

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Packed models train through adapters (LoRA on PackedLinear, integrations/lora.py), QAT models their
        # float weights; Trainer still refuses a packed model without adapters (is_qat_trainable below).
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Trainer accepts the model only for QAT: fake-quant layers keep float weights and gradients.
        return bool(self.quantization_config.qat)

    @property
    def is_compileable(self) -> bool:
        return True


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``PackedLinear`` by the float module it came from (``nn.Linear`` or ``Conv1D``)."""
    for name, module in list(iter_packed_modules(model)):
        spec = module.spec
        w_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        weight = module.dequantize_weight(w_dtype)
        device = weight.device
        if spec.source == "Conv1D":
            new: nn.Module = Conv1D(spec.out_features, spec.in_features)
            new.weight = nn.Parameter(weight.t().contiguous())
        else:
            new = nn.Linear(spec.in_features, spec.out_features, bias=spec.has_bias, device=device, dtype=w_dtype)
            new.weight = nn.Parameter(weight)
        if spec.has_bias:
            new.bias = nn.Parameter(module.bias.detach().to(w_dtype).clone())
        _set_module(model, name, new.to(device))
    return model


def register() -> None:
    """Register ``"splitquant"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SplitQuantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(SplitQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SplitQuantHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(SplitQuantHfQuantizer)


# --------------------------------------------------------------------------------------------
# Quantizing a model already in memory
# --------------------------------------------------------------------------------------------


def _tag(model: nn.Module) -> None:
    """Hub tags (splitquant, the method, intN) so transformers' own push_to_hub carries them."""
    if any(True for _ in iter_packed_modules(model)):
        from .hub import tag_model

        tag_model(model)


def attach_quantizer(model: nn.Module, config: SplitQuantConfig) -> None:
    """Mark ``model`` as quantized with ``config`` so ``save_pretrained`` writes the packed format."""
    quantizer = SplitQuantHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _tag(model)
    guard_save_pretrained(model)
    if hasattr(model, "config"):
        model.config.quantization_config = config
        for module in model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_is_quantized"):
                module.config._is_quantized = True


def search_bit_widths(selected: list[tuple[str, nn.Module]], config: SplitQuantConfig,
                      progress: bool = True) -> dict[str, int]:
    """Per-layer bit widths for ``config.bit_allocation`` (MixQuant or coding length), by module name."""
    from ..methods.mixquant import allocate_by_budget, allocate_by_qem, roundoff_error, spec_bits

    # Round-off errors are only needed by MixQuant; coding length needs only the stored costs.
    measure = config.bit_allocation == "mixquant"
    widths = sorted(set(config.mixquant_candidates) | ({config.mixquant_reference_bits} if measure else set()))
    errors: dict[str, dict[int, float]] = {}
    relative: dict[str, dict[int, float]] = {}
    reference: dict[str, float] = {}
    costs: dict[str, dict[int, int]] = {}
    sizes: dict[str, int] = {}
    for name, module in tqdm(selected, desc="Bit-width search", unit="layer",
                             disable=not progress or not logging.is_progress_bar_enabled()):
        in_f, out_f, source = _shape_of(module)
        weight = _float_weight(module).float()
        if not torch.isfinite(weight).all():
            raise ValueError(f"layer `{name}` has NaN or Inf weights; cannot quantize it")
        sizes[name] = in_f * out_f
        cache: dict = {}
        by_bits = {}
        for bits in widths:
            spec = config.spec_for(in_f, out_f, module.bias is not None, source, bits=bits)
            if bits in config.mixquant_candidates:
                costs.setdefault(name, {})[bits] = spec_bits(spec)
            if measure:
                by_bits[bits] = roundoff_error(weight, spec, config.mixquant_error, config.seed, cache)
        if measure:
            reference[name] = by_bits[config.mixquant_reference_bits]
            errors[name] = {b: e for b, e in by_bits.items() if b in config.mixquant_candidates}
            scale = float(weight.pow(2).mean() if config.mixquant_error == "mse" else weight.abs().mean())
            # error relative to the layer's own scale, times its weights: layers of any scale and size
            # compare, and a bit spent anywhere buys the same kind of error reduction
            relative[name] = {b: sizes[name] * e / max(scale, 1e-30) for b, e in errors[name].items()}
    if config.bit_allocation == "coding_length":
        from ..methods.coding_length import allocate_by_coding_length

        weights = {name: _float_weight(module) for name, module in selected}
        return allocate_by_coding_length(weights, costs, sizes, config.target_bits, config.coding_length_eps)
    if config.target_bits is None:
        return allocate_by_qem(errors, reference, config.mixquant_qem)
    return allocate_by_budget(relative, costs, sizes, config.target_bits)


def _quantize_in_place(model: nn.Module, config: SplitQuantConfig, progress: bool) -> None:
    """Replace the selected float layers by packed ones and write ``config.layers``."""
    selected = select_modules(model, config)
    if not selected:
        raise ValueError(
            "no Linear layer to quantize: every Linear/Conv1D is listed in `modules_to_not_convert` or tied"
        )
    bit_widths = search_bit_widths(selected, config, progress) if config.bit_allocation else {}
    # Build every packed layer first and swap them in at the end: an error leaves the model untouched.
    replacements: list[tuple[str, PackedLinear]] = []
    layers: dict[str, dict[str, Any]] = {}
    for name, module in tqdm(selected, desc="Quantizing", unit="layer",
                             disable=not progress or not logging.is_progress_bar_enabled()):
        in_f, out_f, source = _shape_of(module)
        spec = config.spec_for(in_f, out_f, module.bias is not None, source, bits=bit_widths.get(name))
        weight = _float_weight(module)
        packed = module_quantize(weight, spec, config.seed, name)
        release_freed_memory()
        new = PackedLinear(spec, device=weight.device, dtype=module.bias.dtype if module.bias is not None else None)
        new.load_packed(packed)
        if module.bias is not None:
            with torch.no_grad():
                new.bias.copy_(module.bias.detach())
        replacements.append((name, new))
        layers[normalise_name(model, name)] = spec.to_dict()
    for name, new in replacements:
        _set_module(model, name, new)
    config.layers = layers


def quantize_model(model: nn.Module, config: SplitQuantConfig, progress: bool = True) -> nn.Module:
    """Quantize a float model in place, layer by layer, and return it (packed, ready to save)."""
    config = SplitQuantConfig.from_dict(config.to_dict())  # the caller's object stays untouched
    if any(True for _ in iter_packed_modules(model)):
        raise ValueError("this model is already quantized; load or build the float model to quantize it again")
    _quantize_in_place(model, config, progress)
    attach_quantizer(model, config)
    return model
