"""LoRA adapters on a packed base (the QLoRA workflow) with ``peft``.

peft does not know :class:`~hf_splitquant.PackedLinear`; its experimental custom-module hook
(``LoraConfig._register_custom_module({PackedLinear: PackedLoraLinear})``, peft >= 0.14) lets it
wrap one with :class:`PackedLoraLinear`. That hook is per ``LoraConfig`` object and peft has no public
global one (peft 0.21: the dispatchers are a fixed list in ``LoraModel._create_new_module``, the
default one matches ``nn.Linear`` and friends by type), so plain ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` cannot work on a packed model; their error ("Target module ... is not
supported") names the layer, and a ``PackedLinear`` names :func:`get_packed_peft_model` and
:func:`load_packed_adapter` when formatted into a message. With the hook, the frozen packed layer
computes ``x W_q^T + b`` and the adapter adds ``scaling * B(A(dropout(x)))`` in float. Only the
adapter is trained and saved.

The custom mapping is not part of ``adapter_config.json``, so register it again when loading an
adapter onto a packed base: :func:`load_packed_adapter` does that. Workflow::

    base = AutoModelForSequenceClassification.from_pretrained("packed-int4")   # PackedLinear layers
    model = get_packed_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"]))
    Trainer(model, args, train_dataset=...).train(); model.save_pretrained("adapter")
    model = load_packed_adapter(AutoModel...from_pretrained("packed-int4"), "adapter")

Merging needs float weights (a packed layer cannot absorb ``B @ A``): dequantize the base, then
merge (:func:`merge_into_float`, or by hand: ``model.base_model.model.dequantize()`` then
``model.merge_and_unload()``). The merged model is float; quantize it again if wanted.

The stock ``Trainer`` accepts a ``PeftModel`` on a packed base when the quantizer reports
``is_trainable`` (training with adapters is supported); a packed model without adapters is refused
by the Trainer (only QAT models train their own weights).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..nn.packed_linear import PackedLinear

try:  # peft is optional: only this module needs it
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.layer import Linear as _LoraLinear
except ImportError as err:  # pragma: no cover - exercised only without peft
    raise ImportError("hf_splitquant.integrations.lora needs `peft` (pip install 'hf-splitquant[peft]')") from err

__all__ = ["PackedLoraLinear", "register_packed_lora", "get_packed_peft_model", "load_packed_adapter",
           "merge_into_float"]


class PackedLoraLinear(_LoraLinear):
    """peft's LoRA ``Linear`` around a frozen :class:`PackedLinear` base layer.

    Forward, adapters, saving and loading are peft's; ``merge`` / ``unmerge`` need a float base and
    raise a clear error while the base is packed (after ``dequantize()`` they are peft's again).
    Only vanilla LoRA is supported (no DoRA or other variants, which need the base weight).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, PackedLinear):
            raise ValueError(f"PackedLoraLinear wraps PackedLinear layers, got {type(base).__name__}")
        if getattr(config, "use_dora", False):
            raise ValueError("DoRA needs the base layer's float weight; it is not supported on a packed base "
                             "(use plain LoRA, or dequantize the base first)")
        if getattr(config, "fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out must be False for PackedLinear (its weight is stored [out, in])")
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in ("gaussian",):
            raise ValueError(f"init_lora_weights={init!r} reads the base weight; use True or 'gaussian' on a "
                             "packed base")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    @property
    def lora_variants(self) -> dict:
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if isinstance(self.get_base_layer(), PackedLinear):
            raise ValueError(
                "cannot merge a LoRA adapter into a packed (PackedLinear) layer: dequantize the base model first "
                "(`peft_model.base_model.model.dequantize()`, or hf_splitquant.integrations.lora.merge_into_float), "
                "then merge_and_unload()"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if isinstance(self.get_base_layer(), PackedLinear):
            raise ValueError("no adapter is merged into a packed layer")
        super().unmerge()

    def __repr__(self) -> str:
        return "hf_splitquant." + super().__repr__()


def register_packed_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`PackedLoraLinear` for :class:`PackedLinear` targets on ``config`` (in place)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"expected a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({PackedLinear: PackedLoraLinear})
    return config


def _check_packed(model: nn.Module) -> None:
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("the model has no PackedLinear layer: load or quantize a packed model first "
                         "(plain peft.get_peft_model works on float models)")


def _all_linear(model: nn.Module) -> set[str]:
    """peft's ``target_modules="all-linear"`` for a packed model: the names of every ``PackedLinear`` and
    float ``nn.Linear`` layer but the output layer (peft itself only looks for ``nn.Linear``)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rpartition(".")[2] for name, module in model.named_modules()
            if isinstance(module, (PackedLinear, nn.Linear)) and module is not output}


def get_packed_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                          **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` for a packed model: LoRA adapters on its ``PackedLinear`` layers.

    The packed weights stay frozen (they are buffers); the adapters are the only trainable
    parameters besides any float module listed in ``modules_to_save``. ``target_modules="all-linear"``
    means every ``PackedLinear`` and float ``Linear`` but the output layer, as it does in peft.
    """
    _check_packed(model)
    if isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        config.target_modules = _all_linear(model)
    return get_peft_model(model, register_packed_lora(config), adapter_name=adapter_name, **kwargs)


def load_packed_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """Load an adapter saved from :func:`get_packed_peft_model` onto a packed base model."""
    _check_packed(model)
    config = LoraConfig.from_pretrained(os.fspath(adapter_dir))
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, os.fspath(adapter_dir), adapter_name=adapter_name,
                                     is_trainable=is_trainable, config=register_packed_lora(config), **kwargs)


def merge_into_float(peft_model: PeftModel, dtype: torch.dtype | None = None) -> nn.Module:
    """Dequantize the packed base of ``peft_model`` and merge the adapters into it: a float model.

    Equivalent to ``peft_model.base_model.model.dequantize()`` followed by ``merge_and_unload()``.
    ``peft_model`` is consumed (its base is modified in place).
    """
    base = peft_model.get_base_model()
    if not any(isinstance(m, PackedLinear) for m in base.modules()):
        return peft_model.merge_and_unload()
    if getattr(base, "hf_quantizer", None) is not None:
        base.dequantize(dtype=dtype)  # also drops the quantization config
    else:
        from ..modeling import dequantize_model

        dequantize_model(base, dtype)
    return peft_model.merge_and_unload()
