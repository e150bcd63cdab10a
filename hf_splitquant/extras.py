"""Optional dependencies: import them on first use, with an error that names the extra to install.

The core (quantize, save, reload) needs only torch, transformers, accelerate, safetensors,
huggingface_hub, tqdm and psutil. The rest comes with pip extras of ``hf-splitquant``:

========  ==============================  ================================================
extra     packages                        used by
========  ==============================  ================================================
``eval``  ``evaluate``, ``datasets``      :mod:`hf_splitquant.evaluation`, :mod:`hf_splitquant.metrics`,
                                          ``--calibration-data`` files
``cli``   ``optimum``                     ``optimum-cli splitquant`` (``hf-splitquant`` needs no extra)
``peft``  ``peft``                        :mod:`hf_splitquant.integrations.lora`
``plot``  ``matplotlib``                  :func:`hf_splitquant.evaluation.plot_quality_vs_bits`
========  ==============================  ================================================

(``assets``: the converters used by the in-repo test-asset package, see ``assets/README.md``.)
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

#: Extra name -> the distributions it installs.
EXTRAS = {
    "eval": ("evaluate", "datasets"),
    "cli": ("optimum",),
    "peft": ("peft",),
    "plot": ("matplotlib",),
    "assets": ("gguf", "gensim", "rdata"),
}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise an ImportError that says which extra provides it.

    Args:
        module: the module to import, e.g. ``"evaluate"`` or ``"matplotlib.pyplot"``.
        extra: the ``hf-splitquant`` extra that installs it (a key of :data:`EXTRAS`).
        purpose: what needs it, for the message (e.g. ``"the evaluation metrics"``).

    Returns:
        The imported module.

    Raises:
        ImportError: ``module`` (or one of its own dependencies) is not installed; the message
            reads ``... pip install 'hf-splitquant[<extra>]'``.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the optional package {module.split('.')[0]!r} ({err}); "
            f"install it with: pip install 'hf-splitquant[{extra}]'"
        ) from err
