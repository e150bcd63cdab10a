"""hf_splitquant: low-bit weight quantization for Hugging Face transformers.

Importing the package registers the ``"splitquant"`` quantization method with transformers, so
``from_pretrained(..., quantization_config=SplitQuantConfig(...))`` quantizes while loading and a
packed checkpoint reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

from . import kernels
from .config import FORMAT_VERSION, SplitQuantConfig
from .integrations.transformers import SplitQuantHfQuantizer, dequantize_model, quantize_model, register
from .nn.packed_linear import PackedLinear
from .report import QuantizationReport, format_report, quantization_report
from .spec import LayerSpec

__version__ = "0.1.0"

register()


def quantize(model, config: SplitQuantConfig, calibration_data=None, tokenizer=None,  # noqa: ANN001, ANN201
             num_samples: int = 1024, progress: bool = True, **calibration_kwargs):  # noqa: ANN003
    """Quantize a float model in memory with ``config`` and return it, packed and ready to save.

    Use this when the model is already loaded (or was built from a config); to quantize while
    loading, pass ``quantization_config=config`` to ``from_pretrained`` instead. Methods that need
    data (``rounding="attention_round"``) take ``calibration_data`` (a ``datasets.Dataset``, a list
    of strings or a DataLoader), a ``tokenizer`` for text, and ``num_samples``; see
    :mod:`hf_splitquant.integrations.calibration`.
    """
    if calibration_data is not None or config.rounding is not None:
        from .integrations.calibration import calibrate_and_quantize

        return calibrate_and_quantize(model, config, calibration_data, tokenizer=tokenizer, num_samples=num_samples,
                                      progress=progress, **calibration_kwargs)
    return quantize_model(model, config, progress=progress)


def prepare_qat(model, config: SplitQuantConfig, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """Swap the layers ``config`` selects for fake-quant layers (quantization-aware training)."""
    from .qat import prepare_qat as _prepare_qat

    return _prepare_qat(model, config, **kwargs)


def freeze(model, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """Pack a QAT model's fake-quant layers into ``PackedLinear`` (ready to ``save_pretrained``)."""
    from .qat import freeze as _freeze

    return _freeze(model, **kwargs)


# Training pieces, imported on first use (they pull in transformers' Trainer machinery).
_LAZY_EXPORTS = {
    "R2Regularizer": "hf_splitquant.methods.r2_loss",
    "R2LossCallback": "hf_splitquant.integrations.trainer",
    "QATCallback": "hf_splitquant.integrations.trainer",
    "FakeQuantLinear": "hf_splitquant.nn.fake_quant",
    "push_to_hub": "hf_splitquant.integrations.hub",
    "build_model_card": "hf_splitquant.integrations.hub",
    "save_with_card": "hf_splitquant.integrations.hub",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'hf_splitquant' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "FakeQuantLinear",
    "build_model_card",
    "push_to_hub",
    "save_with_card",
    "QATCallback",
    "R2LossCallback",
    "R2Regularizer",
    "LayerSpec",
    "PackedLinear",
    "QuantizationReport",
    "SplitQuantConfig",
    "SplitQuantHfQuantizer",
    "dequantize_model",
    "format_report",
    "kernels",
    "freeze",
    "prepare_qat",
    "quantization_report",
    "quantize",
    "__version__",
]
