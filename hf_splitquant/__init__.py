"""hf_splitquant: low-bit weight quantization for Hugging Face transformers.

Importing the package registers the ``"splitquant"`` quantization method with transformers, so
``from_pretrained(..., quantization_config=SplitQuantConfig(...))`` quantizes while loading and a
packed checkpoint reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

from .config import FORMAT_VERSION, SplitQuantConfig
from .integrations.transformers import SplitQuantHfQuantizer, dequantize_model, quantize_model, register
from .nn.packed_linear import PackedLinear
from .report import QuantizationReport, format_report, quantization_report
from .spec import LayerSpec

__version__ = "0.1.0"

register()


def quantize(model, config: SplitQuantConfig, progress: bool = True):  # noqa: ANN001, ANN201
    """Quantize a float model in memory with ``config`` and return it, packed and ready to save.

    Use this when the model is already loaded (or was built from a config); to quantize while
    loading, pass ``quantization_config=config`` to ``from_pretrained`` instead.
    """
    return quantize_model(model, config, progress=progress)


__all__ = [
    "FORMAT_VERSION",
    "LayerSpec",
    "PackedLinear",
    "QuantizationReport",
    "SplitQuantConfig",
    "SplitQuantHfQuantizer",
    "dequantize_model",
    "format_report",
    "quantization_report",
    "quantize",
    "__version__",
]
