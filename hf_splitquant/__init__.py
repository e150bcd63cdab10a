"""hf_splitquant: low-bit weight quantization for Hugging Face transformers.

Importing the package registers the ``"splitquant"`` quantization method with transformers, so
``from_pretrained(..., quantization_config=SplitQuantConfig(...))`` quantizes while loading and a
packed checkpoint reloads with plain ``from_pretrained``.

The package's rooms and what each may import (checked by ``tests/test_layering.py``):

* core: ``quant/`` (pure tensor math), ``spec``, ``methods/`` (the format registry and the methods),
  ``nn/``, ``kernels/``, ``config``, ``modeling`` (module selection and surgery), ``qat``, ``report``,
  ``checkpoint``, ``saving``, ``memory``: never the rooms below;
* ``integrations/`` (transformers' quantizer glue, Trainer callbacks, Hub, peft) and ``calibration/``
  (data, statistics, processes, the block loop): the core and each other's public functions;
* ``evaluation``, ``cli``, ``commands/``: anything above; this module re-exports the public API.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import kernels
from .checkpoint import CheckpointError
from .config import FORMAT_VERSION, SplitQuantConfig
from .integrations.transformers import freeze, prepare_qat, quantize_model, register, remove_autocast_forward
from .kernels import kernel_mode
from .methods.attention_round import AttentionRoundOptions
from .modeling import dequantize_model
from .nn.packed_linear import PackedLinear
from .report import QuantizationReport, format_report, quantization_report
from .saving import save_quantized
from .spec import LayerSpec
from .version import __version__

register()


def quantize(model: nn.Module, config: SplitQuantConfig, calibration_data: Any = None, tokenizer: Any = None,
             num_samples: int = 1024, progress: bool = True, **calibration_kwargs: Any) -> nn.Module:
    """Quantize a float model in memory with ``config`` and return it, packed and ready to save.

    Use this when the model is already loaded (or was built from a config); to quantize while
    loading, pass ``quantization_config=config`` to ``from_pretrained`` instead. Methods that need
    data (``rounding="attention_round"``) take ``calibration_data`` (a ``datasets.Dataset``, a list
    of strings, a 2-D tensor of token ids or a DataLoader), a ``tokenizer`` for text, and
    ``num_samples``; see :func:`hf_splitquant.calibrate`.
    """
    if calibration_data is not None or config.rounding is not None:
        from .calibration import calibrate

        return calibrate(model, config, calibration_data, tokenizer=tokenizer, num_samples=num_samples,
                         progress=progress, **calibration_kwargs)
    return quantize_model(model, config, progress=progress)


# Pieces with heavier or optional dependencies (Trainer machinery, huggingface_hub cards, peft,
# evaluate), imported on first use.
_LAZY_EXPORTS = {
    "calibrate": "hf_splitquant.calibration",
    "R2Regularizer": "hf_splitquant.methods.r2_loss",
    "R2LossCallback": "hf_splitquant.integrations.trainer",
    "QATCallback": "hf_splitquant.integrations.trainer",
    "FakeQuantLinear": "hf_splitquant.nn.fake_quant",
    "push_to_hub": "hf_splitquant.integrations.hub",
    "build_model_card": "hf_splitquant.integrations.hub",
    "save_with_card": "hf_splitquant.integrations.hub",
    "get_packed_peft_model": "hf_splitquant.integrations.lora",
    "load_packed_adapter": "hf_splitquant.integrations.lora",
    "merge_into_float": "hf_splitquant.integrations.lora",
    "compile_for_decoding": "hf_splitquant.integrations.decoding",
    "evaluate_model": "hf_splitquant.evaluation",
    "distillation_loss": "hf_splitquant.distillation",
    "DistillationLoss": "hf_splitquant.distillation",
    "qat_parameter_groups": "hf_splitquant.qat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_splitquant' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "AttentionRoundOptions",
    "CheckpointError",
    "DistillationLoss",
    "FakeQuantLinear",
    "LayerSpec",
    "PackedLinear",
    "QATCallback",
    "QuantizationReport",
    "R2LossCallback",
    "R2Regularizer",
    "SplitQuantConfig",
    "remove_autocast_forward",
    "build_model_card",
    "calibrate",
    "compile_for_decoding",
    "dequantize_model",
    "distillation_loss",
    "evaluate_model",
    "format_report",
    "freeze",
    "get_packed_peft_model",
    "kernel_mode",
    "kernels",
    "load_packed_adapter",
    "merge_into_float",
    "prepare_qat",
    "push_to_hub",
    "qat_parameter_groups",
    "quantization_report",
    "quantize",
    "save_quantized",
    "save_with_card",
    "__version__",
]
