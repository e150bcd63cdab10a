"""The one place that knows transformers' internals: quantizer registration, module replacement,
on-the-fly quantization ops, save metadata and dequantization.

Checked against transformers 5.6 to 5.24 (``make test-compat``). Load order there: skeleton on the meta device ->
``_process_model_before_weight_loading`` -> weights (on-the-fly ops) -> ``_process_model_after_weight_loading``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
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
from ..config import FORMAT_VERSION, QUANT_METHOD, SplitQuantConfig, written_format_version
from ..memory import release_freed_memory
from ..methods import tensor_shapes
from ..modeling import (
    QUANTIZABLE,
    base_prefix,
    dequantize_model,
    embedding_modules,
    embedding_plan,
    has_base_prefix_module,
    iter_packed_modules,
    module_shape,
    normalise_name,
    quantize_layer,
    quantize_modules,
    resolve_name,
    select_modules,
    set_module,
)
from ..nn.packed_embedding import PackedEmbedding, TiedPackedHead
from ..nn.packed_linear import PackedLinear
from ..qat import pack_fake_quant, prepare_fake_quant
from ..saving import clear_packed_marker, guard_save_pretrained

logger = logging.get_logger(__name__)

__all__ = [
    "SplitQuantHfQuantizer",
    "register",
    "attach_quantizer",
    "quantize_model",
    "prepare_qat",
    "freeze",
    "remove_autocast_forward",
    "FORMAT_METADATA_KEY",
]



# --------------------------------------------------------------------------------------------
# Skeletons
# --------------------------------------------------------------------------------------------


def _untie_packed(model: nn.Module) -> None:
    """Drop transformers' tie entries of a packed embedding and its tied head: the head computes with the
    embedding's packed tensors (:class:`TiedPackedHead`, no tensors of its own), so there is no parameter
    for transformers to tie (it would assign the embedding's uint8 codes to the head) nor to drop on save."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    for target, source in list(tied.items()):
        for key in (target, source):
            try:
                module = model.get_submodule(key.rpartition(".")[0])
            except AttributeError:
                continue
            if isinstance(module, (PackedEmbedding, TiedPackedHead)):
                tied.pop(target, None)
                break


def _embedding_skeletons(model: nn.Module, config: SplitQuantConfig, selected: set[str]) -> dict[str, dict[str, Any]]:
    """Quantize-on-load with ``embedding_bits``: empty packed embedding (and head) skeletons; their map entries."""
    inp, out, tied, spec = embedding_plan(model, config)
    name, emb = inp
    skeleton = PackedEmbedding(spec, device="meta", dtype=emb.weight.dtype)
    skeleton._buffers["weight"] = torch.empty(emb.weight.shape, dtype=emb.weight.dtype, device="meta")
    set_module(model, name, skeleton)
    layers = {normalise_name(model, name): spec.to_dict()}
    if out is not None and tied:
        set_module(model, out[0], TiedPackedHead(skeleton))
    elif out is not None and isinstance(out[1], nn.Linear) and out[0] not in selected:
        head = out[1]
        head_spec = config.embedding_spec(head.in_features, head.out_features, "Linear", head.bias is not None)
        head_skeleton = PackedLinear(head_spec, device="meta", dtype=head.weight.dtype)
        head_skeleton._buffers["weight"] = torch.empty(head.weight.shape, dtype=head.weight.dtype, device="meta")
        set_module(model, out[0], head_skeleton)
        layers[normalise_name(model, out[0])] = head_spec.to_dict()
    return layers


def _replace_with_skeletons(model: nn.Module, config: SplitQuantConfig, pre_quantized: bool) -> dict[str, str]:
    """Swap selected modules for empty ``PackedLinear`` on the meta device; fill ``config.layers``.

    Returns the model path of every rebuilt layer by its map key (pre-quantized loads).
    """
    resolved: dict[str, str] = {}
    if pre_quantized:
        # refuse a map padded with modules the model lacks before any per-entry work
        unknown_map_entries(config.layers or {}, (n for n, _ in model.named_modules()),
                            base_prefix(model) if has_base_prefix_module(model) else "")
        specs = config.layer_specs()
        if not specs:
            raise ValueError(
                "this checkpoint's quantization_config has no `layers` map, so its packed layers cannot be "
                "rebuilt; it was not written by hf_splitquant's save_pretrained"
            )
        for key, spec in specs.items():
            name = resolve_name(model, key)
            if name is None:
                if has_base_prefix_module(model) or not base_prefix(model):
                    raise ValueError(
                        f"the checkpoint's quantization map names module `{key}`, which this "
                        f"{type(model).__name__} does not have: the checkpoint belongs to another architecture"
                    )
                logger.warning(f"Quantized module `{key}` is not part of {type(model).__name__} (a task head?); skipped.")
                continue
            old = model.get_submodule(name)
            if spec.source == "Embedding":
                if not isinstance(old, (nn.Embedding, PackedEmbedding)) or (
                        (old.num_embeddings, old.embedding_dim) != (spec.out_features, spec.in_features)):
                    raise ValueError(
                        f"the checkpoint's quantization map names `{key}` as a {spec.out_features}x{spec.in_features} "
                        f"packed embedding, but the model's module there is {type(old).__name__} "
                        f"{getattr(old, 'num_embeddings', '?')}x{getattr(old, 'embedding_dim', '?')}")
                _, out, tied = embedding_modules(model)
                dtype = old.weight.dtype if isinstance(old, nn.Embedding) else old.dtype
                new = PackedEmbedding(spec, device="meta", dtype=dtype)
                set_module(model, name, new)
                if out is not None and tied:
                    set_module(model, out[0], TiedPackedHead(new))
                resolved[key] = name
                continue
            if not isinstance(old, QUANTIZABLE + (PackedLinear,)):
                raise ValueError(f"the checkpoint's quantization map names `{key}`, which is a {type(old).__name__}, "
                                 "not a Linear layer")
            in_f, out_f, source = module_shape(old) if isinstance(old, QUANTIZABLE) else (
                old.in_features, old.out_features, old.spec.source)
            if (in_f, out_f, source) != (spec.in_features, spec.out_features, spec.source):
                raise ValueError(
                    f"module `{key}` is {source} {in_f}->{out_f} in the model but the checkpoint's quantization map "
                    f"says {spec.source} {spec.in_features}->{spec.out_features}"
                )
            dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
            set_module(model, name, PackedLinear(spec, device="meta", dtype=dtype))
            resolved[key] = name
        return resolved

    layers: dict[str, dict[str, Any]] = {}
    for name, module in select_modules(model, config):
        in_f, out_f, source = module_shape(module)
        spec = config.spec_for(in_f, out_f, module.bias is not None, source)
        dtype = module.weight.dtype
        skeleton = PackedLinear(spec, device="meta", dtype=dtype)
        # The float weight arrives under the codes' key. A float placeholder there (replaced by the quantize
        # op's output) keeps transformers before 5.23 from casting the float weight to the codes' uint8
        # before the op sees it (they cast each checkpoint tensor to the skeleton's dtype).
        skeleton._buffers["weight"] = torch.empty(module.weight.shape, dtype=module.weight.dtype, device="meta")
        set_module(model, name, skeleton)
        layers[normalise_name(model, name)] = spec.to_dict()
    if config.embedding_bits is not None:
        layers.update(_embedding_skeletons(model, config, {n for n, _ in select_modules(model, config)} | set(layers)))
    config.layers = layers
    config.format_version = max(config.format_version, written_format_version(layers))
    return resolved


def _stored_prefixes(model: nn.Module, key: str, name: str) -> list[str]:
    """Key prefixes a layer may be stored under: with or without the base-model prefix."""
    prefix = base_prefix(model)
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
        if not value.is_floating_point():
            # never quantize a weight transformers already cast to an integer dtype: it would pack garbage
            err = (f"layer `{module_name}` reached the quantize op as {value.dtype}, not as a float weight: this "
                   "transformers version casts checkpoint tensors differently; use a version in hf-splitquant's "
                   "supported range (pyproject.toml)")
            self.hf_quantizer.conversion_errors.append(err)
            raise ValueError(err)
        weight = value.t() if spec.source == "Conv1D" else value
        try:
            packed = quantize_layer(weight, spec, self.hf_quantizer.quantization_config.seed, module_name)
        except ValueError as err:
            # transformers logs conversion errors and goes on loading; keep it to raise after loading.
            self.hf_quantizer.conversion_errors.append(str(err))
            raise
        del weight, value, input_dict
        release_freed_memory()  # the float temporaries just freed (keeps the load's peak near the packed size)
        return {f"{module_name}.{suffix}": tensor for suffix, tensor in packed.items()}


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

    def update_attn_implementation(self, config: Any) -> Any:
        # The quantizer's one look at the model config before transformers resolves the weight files: drop
        # the guard that stops readers without hf_splitquant (checkpoint.mark_packed_config).
        clear_packed_marker(config)
        return super().update_attn_implementation(config)

    def update_tp_plan(self, config: Any) -> Any:
        # Older 5.x (5.6) has no update_attn_implementation; there this is the quantizer's look at the config
        # before the weight files are resolved, so the guard goes here too.
        clear_packed_marker(config)
        parent = getattr(super(), "update_tp_plan", None)
        return parent(config) if parent is not None else config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        if self.quantization_config.qat or (not self.pre_quantized and self.quantization_config.bit_allocation):
            # Bit widths (and so shapes) depend on every layer's float weights, and QAT trains float
            # weights: load in float, then act after loading.
            return
        resolved = _replace_with_skeletons(model, self.quantization_config, self.pre_quantized)
        _untie_packed(model)
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
                wanted=model_checkpoint_keys(model.state_dict(), base_prefix(model)))

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
            prepare_fake_quant(model, self.quantization_config, in_place=True)
        elif not self.pre_quantized and self.quantization_config.bit_allocation:
            quantize_modules(model, self.quantization_config, progress=True)
            _untie_packed(model)
        for name, module in iter_packed_modules(model):
            tensors = module.packed_tensors()
            for suffix, tensor in tensors.items():
                shape, dtype = tensor_shapes(module.spec)[suffix]
                if tensor.is_meta or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise CheckpointError(
                        f"packed tensor `{name}.{suffix}` was not found in the checkpoint: it is incomplete or "
                        "was not written by hf_splitquant" if self.pre_quantized else
                        f"layer `{name}` was not quantized while loading (its float weight is missing from the "
                        "checkpoint, or this transformers version did not run the quantize op)"
                    )
            if self.pre_quantized:
                check_values(name, module.spec, tensors)
        model.config.quantization_config = self.quantization_config
        _tag(model)
        guard_save_pretrained(model)
        release_freed_memory()
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        metadata = {FORMAT_METADATA_KEY: str(written_format_version(self.quantization_config.layers)),
                    "quant_method": QUANT_METHOD,
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
    """Hub tags (splitquant, the method, intN), and ``model.push_to_hub`` that writes our model card."""
    if any(True for _ in iter_packed_modules(model)):
        from .hub import bind_push_to_hub, tag_model

        tag_model(model)
        bind_push_to_hub(model)  # transformers' own push_to_hub would write its generic card


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


def quantize_model(model: nn.Module, config: SplitQuantConfig, progress: bool = True) -> nn.Module:
    """Quantize a float model in place, layer by layer, and return it (packed, ready to save)."""
    config = SplitQuantConfig.from_dict(config.to_dict())  # the caller's object stays untouched
    if any(True for _ in iter_packed_modules(model)):
        raise ValueError("this model is already quantized; load or build the float model to quantize it again")
    quantize_modules(model, config, progress)
    _untie_packed(model)
    attach_quantizer(model, config)
    return model


def prepare_qat(model: nn.Module, config: SplitQuantConfig, **kwargs: Any) -> nn.Module:
    """Swap the layers ``config`` selects for fake-quant layers (quantization-aware training) and mark
    the model as quantized with ``config``, so the stock ``Trainer`` accepts it. Keyword arguments:
    see :func:`hf_splitquant.qat.prepare_fake_quant`."""
    model = prepare_fake_quant(model, config, **kwargs)
    attach_quantizer(model, config)
    return model


def remove_autocast_forward(model: nn.Module) -> bool:
    """Undo the mixed-precision wrapper Accelerate puts around ``model.forward`` for ``Trainer(bf16=True)`` (or
    ``fp16``), which stays after ``train()``: without this, evaluating, freezing or comparing the trained model
    runs it under autocast, not in its own dtype (a frozen packed model then differs from its float32 reload).
    Returns whether a wrapper was removed. :class:`QATCallback` and :func:`hf_splitquant.freeze` call it."""
    if "_original_forward" not in getattr(model, "__dict__", {}):
        return False
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model, keep_fp32_wrapper=False)  # restores the original forward in place
    return "_original_forward" not in model.__dict__


def freeze(model: nn.Module) -> nn.Module:
    """Pack a QAT model's fake-quant layers into ``PackedLinear`` holding the same codes, ready to
    ``save_pretrained`` (reloaded with plain ``from_pretrained``). Call it after training, or let
    ``QATCallback(freeze_on_train_end=True)`` do it. A mixed-precision wrapper left on ``model.forward`` by
    ``Trainer(bf16=True)`` is removed first (the packed model computes in its own dtype)."""
    if remove_autocast_forward(model):
        logger.info("freeze: removed the mixed-precision autocast wrapper of model.forward left by training")
    attach_quantizer(model, pack_fake_quant(model))
    return model
